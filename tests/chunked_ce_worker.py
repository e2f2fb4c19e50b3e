"""One rank of tests/test_chunked_ce.py's distributed check (started with torchrun, gloo, CPU).

The chunked loss runs inside the wrapped model's forward: under DDP, and under FSDP2 (torch's
fully_shard, what accelerate's FSDP2 plugin calls), where the tied head/embedding weight is whole
only during that forward. Every rank takes the same batch, so the gradients averaged over ranks
are one process's. Rank 0 writes each wrapper's full gradients.

    torchrun --nproc_per_node 2 tests/chunked_ce_worker.py OUT_DIR
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM

ARCH = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1)
CHUNK_TOKENS = 5


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, ARCH["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100  # SFT's masked prompts
    return ids, labels


def fresh_model(chunk_tokens: int) -> BitNetTrainForCausalLM:
    torch.manual_seed(0)
    model = BitNetTrainForCausalLM(BitNetTrainConfig(**ARCH))
    model.loss_chunk_tokens = chunk_tokens
    return model


def wrapped(kind: str) -> torch.nn.Module:
    model = fresh_model(CHUNK_TOKENS)
    if kind == "ddp":
        return DistributedDataParallel(model)
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ids, labels = batch()
    model(ids, labels=labels, loss_reduction="sum").loss.backward()
    return {name.removeprefix("module."): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
            for name, p in model.named_parameters()}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    for kind in ("ddp", "fsdp2"):
        g = grads(wrapped(kind))
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in g.items()}, out / f"{kind}.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
