"""What the loop needs to know about ranks and engines, and nothing about the model's maths.

Launch modes: one process, DDP, FSDP (accelerate's FSDP2) and DeepSpeed ZeRO. The loop calls the
same functions in each; the differences live here:
- FSDP and DeepSpeed split weights, gradients or optimizer states over ranks (`shards_state`),
  so a full state is gathered from every rank before rank 0 writes a checkpoint, and every
  forward is collective;
- DeepSpeed owns accumulation, clipping and the optimizer step (`configure_deepspeed`,
  `backward`), with its values taken from the stage config.
"""
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .config import ConfigError, RunConfig, StageConfig


def global_sum(acc: Accelerator, value) -> float:
    t = torch.as_tensor(value, dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        t = acc.reduce(t, reduction="sum")
    return float(t)


def shards_state(acc: Accelerator) -> bool:
    """FSDP and DeepSpeed split weights, gradients or optimizer states over ranks."""
    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def mixed_precision(cfg: RunConfig) -> str:
    """accelerate's `mixed_precision` for a run. One process holds one accelerate state, so every
    training stage of a pipeline shares one precision."""
    precisions = {str(cfg.stages[name].precision) for name in cfg.pipeline if name in cfg.stages}
    if len(precisions) > 1:
        raise ConfigError(
            f"the pipeline's stages mix precisions {sorted(precisions)}; accelerate sets one per process: "
            "give every stage the same precision, or run the stages as separate commands (init_from=...)"
        )
    return "bf16" if precisions == {"bf16"} else "no"


def check_world_size(acc: Accelerator) -> None:
    """Batch sharding and loss scaling trust acc.num_processes. Some launches start several
    processes while accelerate counts one in each (on a machine without GPUs: `--cpu`, a MULTI_CPU
    config, DeepSpeed without a process-group backend); each would then train on the whole batch
    and all would write the same run directory."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch / deepspeed
    if launched != acc.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but accelerate counts "
            f"num_processes={acc.num_processes} ({acc.distributed_type}); use a launch command from "
            "docs/launch.md (on CPU: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...)"
        )


def configure_deepspeed(acc: Accelerator, cfg: StageConfig) -> None:
    """DeepSpeed owns micro-batching, accumulation and clipping; the stage config sets them
    (launch/deepspeed/*.json leave them "auto"), so every launch mode trains the same recipe."""
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return
    if cfg.optim.grad_clip <= 0:
        raise ValueError("DeepSpeed reports the gradient norm only when it clips: set optim.grad_clip > 0")
    if acc.state.deepspeed_plugin.zero_stage == 3:
        raise ConfigError(
            "checkpoints of DeepSpeed ZeRO-3 are not supported (their partitions are not gathered yet); "
            "launch with launch/accelerate/deepspeed_zero2.yaml or fsdp.yaml, which shards the weights too"
        )
    acc.state.deepspeed_plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        train_batch_size=cfg.micro_batch_size * cfg.grad_accum * acc.num_processes,
        gradient_clipping=cfg.optim.grad_clip,
    )


def backward(acc: Accelerator, wrapped, loss: torch.Tensor, last_micro_batch: bool) -> None:
    if acc.distributed_type != DistributedType.DEEPSPEED:
        acc.backward(loss)
        return
    # The DeepSpeed engine reduces and steps at the boundary we mark. Our loss is already scaled
    # for the whole global batch, so DeepSpeed must not divide it by its accumulation steps again.
    wrapped.set_gradient_accumulation_boundary(last_micro_batch)
    wrapped.backward(loss, scale_wrt_gas=False)
    if last_micro_batch:
        wrapped.step()  # reduce, clip to optim.grad_clip, AdamW step, zero the gradients


def finite_on_every_rank(acc: Accelerator, model: torch.nn.Module) -> bool:
    """Every weight is finite. Each rank checks the part it holds (FSDP2's DTensor parameters
    locally) and all ranks reach the same verdict, so none of them goes on into a collective save
    that the others refuse."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = sum(int(not torch.isfinite(t).all()) for t in local)
    return global_sum(acc, bad) == 0


def without_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """A gathered state dict holds tied weights once per name (lm_head = embed_tokens); keep the
    first name only, so the file is the one a single-process run writes."""
    return {k: v for k, v in state_dict.items() if k not in tied_copies(model)}


def with_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """The inverse: every name of a tied weight, as a strict load expects."""
    return {**state_dict, **{copy: state_dict[first] for copy, first in tied_copies(model).items()}}


def tied_copies(model: torch.nn.Module) -> dict[str, str]:
    """Second and later names of a shared parameter -> its first name."""
    first: dict[int, str] = {}
    names = {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}
    return {name: kept for name, kept in names.items() if name != kept}


def evaluation_model(acc: Accelerator, wrapped) -> torch.nn.Module:
    """What validation runs: a sharded model's forward is collective, so every rank runs the
    wrapped one; DDP's wrapper would sync buffers on each forward, and ranks run unequal numbers
    of validation batches, so the others run the bare model."""
    return wrapped if shards_state(acc) else acc.unwrap_model(wrapped)


# The full (unsharded) training state, keyed by parameter name, is the checkpoint format of every
# launch mode, so a run resumes on any rank count and engine. Gathering is collective; rank 0
# receives the tensors (on the CPU), the other ranks may receive empty dicts.
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(acc: Accelerator, wrapped) -> dict:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return deepspeed_full_weights(acc, wrapped)
    return get_model_state_dict(wrapped, options=GATHER)


def full_optimizer_state(acc: Accelerator, wrapped, optimizer) -> dict:
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return deepspeed_full_optimizer_state(acc, wrapped)
    return get_optimizer_state_dict(wrapped, optimizer, options=GATHER)


def load_full_state(acc: Accelerator, wrapped, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Every rank passes the full state read from a checkpoint; each keeps its own part."""
    model_state = with_tied_copies(acc.unwrap_model(wrapped), model_state)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return load_deepspeed_state(wrapped, model_state, optimizer_state)
    # torch splits a full state over the process group; a single process takes it as it is.
    options = StateDictOptions(full_state_dict=dist.is_initialized())
    set_model_state_dict(wrapped, model_state, options=options)
    set_optimizer_state_dict(wrapped, optimizer, optimizer_state, options=options)


# ZeRO keeps the fp32 weights and AdamW moments as flat partitions, one per parameter group and
# rank; DeepSpeed's safe_get/set_full_* gather or scatter one parameter at a time (every rank takes
# part). The optimizer state is laid out as torch's get_optimizer_state_dict lays it out, so the
# checkpoint is the one other modes write. Tested with ZeRO-2 (tests/test_distributed.py).
MOMENTS = ("exp_avg", "exp_avg_sq")


def deepspeed_full_weights(acc: Accelerator, engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {name: safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()}
    return {name: w.detach().cpu() for name, w in weights.items()} if acc.is_main_process else {}


def deepspeed_full_optimizer_state(acc: Accelerator, engine) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    link_deepspeed_moments(engine)
    step = max(float(s["step"]) for s in engine.optimizer.optimizer.state.values())
    state = {  # a step tensor per parameter: AdamW counts each one up in place
        name: {"step": torch.tensor(step), **{k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}}
        for name, p in engine.module.named_parameters()
    }
    if not acc.is_main_process:
        return {}
    state = {name: {k: v.detach().cpu() for k, v in s.items()} for name, s in state.items()}
    return {"state": state, "param_groups": deepspeed_param_groups(engine)}


def load_deepspeed_state(engine, model_state: dict, optimizer_state: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    engine.module.load_state_dict(model_state)  # the weights the forward reads (replicated under ZeRO-1/2)
    zero = engine.optimizer
    step = float(next(iter(optimizer_state["state"].values()))["step"])
    for flat in zero.single_partition_of_fp32_groups:  # AdamW makes its state at its first step: make it now
        zero.optimizer.state[flat] = {"step": torch.tensor(step), "exp_avg": torch.zeros_like(flat),
                                      "exp_avg_sq": torch.zeros_like(flat)}
    link_deepspeed_moments(engine)
    for name, p in engine.module.named_parameters():
        safe_set_full_fp32_param(p, model_state[name].to(p.device))
        for k in MOMENTS:
            safe_set_full_optimizer_state(p, optimizer_state["state"][name][k].to(p.device), k)


def link_deepspeed_moments(engine) -> None:
    """DeepSpeed (0.19) links parameters to their AdamW moments once, right after the first
    parameter group's first step, so the other groups' parameters stay unlinked and
    safe_get_full_optimizer_state fails for them: link every group again."""
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()


def deepspeed_param_groups(engine) -> list[dict]:
    """The AdamW parameter groups with parameter names, as torch's full optimizer state has them."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    zero = engine.optimizer
    return [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in params]}
        for group, params in zip(zero.optimizer.param_groups, zero.bit16_groups)
    ]
