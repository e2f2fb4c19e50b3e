"""One rank of tests/test_checkpoint.py's FSDP2 check (started with torchrun, gloo, CPU).

accelerate's FSDP does not run without GPUs, so this shards our model with torch's own
fully_shard (what accelerate's FSDP2 plugin calls) and drives checkpoint.py and distributed.py
with a stand-in for the accelerator. Every rank trains on the same batch, so the run is the
1-process run. Steps: train 2 steps, save a checkpoint, take a 3rd step; then a freshly built
sharded model loads the checkpoint and takes the 3rd step again. Rank 0 writes both results.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate import DistributedType
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from bitnet_train.checkpoint import Checkpointer
from bitnet_train.distributed import full_model_state
from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM
from bitnet_train.trainer import decay_mask_groups

ARCH = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)


def sharded_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = BitNetTrainForCausalLM(BitNetTrainConfig(**ARCH))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(decay_mask_groups(model), lr=1e-2, weight_decay=0.1)


def step(model, optimizer, ids: torch.Tensor) -> None:
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=dist.get_rank() == 0,
                          num_processes=dist.get_world_size(), wait_for_everyone=dist.barrier,
                          unwrap_model=lambda m: m)
    ids = torch.randint(0, ARCH["vocab_size"], (3, 3, 16), generator=torch.Generator().manual_seed(0))
    ckpt = Checkpointer(out / "checkpoints", keep=1, accelerator=acc)

    model, optimizer = sharded_model(seed=0)
    step(model, optimizer, ids[0])
    step(model, optimizer, ids[1])
    ckpt.save(2, model, optimizer, {"total_steps": 3})
    step(model, optimizer, ids[2])
    uninterrupted = full_model_state(acc, model)

    resumed, resumed_optimizer = sharded_model(seed=1)  # other weights: the checkpoint must replace them
    ckpt.load(ckpt.latest_valid(), resumed, resumed_optimizer)
    step(resumed, resumed_optimizer, ids[2])
    after_resume = full_model_state(acc, resumed)
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in uninterrupted.items() if k != "lm_head.weight"},
                  out / "uninterrupted.safetensors")
        save_file({k: v.contiguous() for k, v in after_resume.items() if k != "lm_head.weight"},
                  out / "resumed.safetensors")
        torch.save(ids, out / "ids.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
