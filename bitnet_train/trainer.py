"""The one training loop, shared by every stage (pretrain, SFT, DPO).

A stage brings its data and its loss (`Stage` below); everything else lives here once:
AdamW with the two-stage LR/WD schedules, gradient accumulation over ranks, clipping,
precision, non-finite step skipping, validation, checkpoints with exact resume, logging.

Reduction. A stage's loss returns the *sum* of its per-unit losses (tokens, or preference
pairs) and the number of units. The update for one global batch is the gradient of
    sum over every unit of the global batch of loss / N
with N = the global number of units for `mean` and N = 1 for `sum`. N is counted before the
forward, over all micro-batches and ranks, so the update does not depend on how the global
batch is split into micro-batches or ranks.

Sharded engines (FSDP, DeepSpeed ZeRO; launch/accelerate/*.yaml). The loop is the same; three
things differ, each behind `shards_state(acc)`: checkpoints are written and read by every rank
through accelerate (which knows each engine's format), the final model is gathered into a full
state dict first, and DeepSpeed owns accumulation, clipping and the optimizer step, with its
values taken from the stage config. Single-process and DDP runs take none of these paths.
"""
import json
import logging
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm

from .checkpoint import PREFIX, Checkpointer, CheckpointError, atomic_directory, write_manifest
from .config import LoggingConfig, StageConfig
from .data.stream import BatchStream
from .metrics import MetricsLogger
from .plot import plot_training
from .preemption import StopFlag
from .quant import BitLinear
from .schedules import two_stage_lr, two_stage_wd, validate

log = logging.getLogger(__name__)


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed over the batch's units; carries the graph
    units: float  # tokens or pairs in this batch
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # also sums over units


class Stage(Protocol):
    kind: str
    token_loss: bool  # the loss is a next-token NLL, so exp(val loss) is a perplexity
    train_size: int
    eval_size: int

    def batch(self, split: str, indices: torch.Tensor) -> dict: ...

    def units(self, batch: dict) -> float: ...

    def loss(self, model, batch: dict) -> LossOutput: ...

    def final_metrics(self, model) -> dict: ...

    # Optional: `bind_model(model)` receives the starting weights, already on the training device
    # and before a resume overwrites them (DPO copies its frozen reference from them).


@dataclass
class RunContext:
    stage_dir: Path
    accelerator: Accelerator
    logging: LoggingConfig
    seed: int
    run_name: str
    run_config: dict
    tokenizer: object


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (signal, too many non-finite steps); a checkpoint was saved.

    `exit_code` follows the shell's convention: 128 + signal number after a signal.
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def decay_mask_groups(model: torch.nn.Module) -> list[dict]:
    """Weight decay applies to the BitLinear weights only (norms, embedding and head: none)."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decay_ids], "decay": True},
        {"params": [p for p in params if id(p) not in decay_ids], "decay": False},
    ]


def total_steps(cfg: StageConfig, stream: BatchStream) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * stream.steps_per_epoch))


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(stage: Stage, model: torch.nn.Module, cfg: StageConfig, ctx: RunContext) -> torch.nn.Module:
    validate(cfg.schedule)
    acc = ctx.accelerator
    stream = BatchStream(stage.train_size, cfg.micro_batch_size, cfg.grad_accum, acc.num_processes, ctx.seed)
    steps = total_steps(cfg, stream)
    optimizer = torch.optim.AdamW(
        decay_mask_groups(model), lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=0.0
    )
    check_world_size(acc)
    sharded = shards_state(acc)
    if sharded:
        # One Accelerator serves every stage; drop the previous stage's model and optimizer so
        # this stage's checkpoints (accelerate's save_state) hold this stage's objects only.
        acc.free_memory()
    if acc.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(acc, cfg)
    if hasattr(stage, "bind_model"):
        # Before prepare: a sharding engine would hand the stage a sharded model to copy.
        stage.bind_model(model.to(acc.device))
    wrapped, optimizer = acc.prepare(model, optimizer)
    model = acc.unwrap_model(wrapped)
    ckpt = Checkpointer(ctx.stage_dir / "checkpoints", cfg.keep_checkpoints)
    if acc.is_main_process:
        ckpt.remove_partial()
    logger = MetricsLogger(
        ctx.stage_dir / "metrics.jsonl", ctx.logging, ctx.run_name, ctx.run_config, enabled=acc.is_main_process
    )
    state = {"nonfinite_skips": 0}
    start = 0
    resume_from = ckpt.latest_valid()
    if resume_from is not None:
        saved = load_sharded_checkpoint(acc, resume_from) if sharded else Checkpointer.load(resume_from, model, optimizer)
        stream.load_state_dict(saved["stream"])
        state["nonfinite_skips"] = saved["nonfinite_skips"]
        start = saved["step"]
        logger.truncate_after(start)
        log.info("resumed %s from %s (step %d of %d)", stage.kind, resume_from, start, steps)

    def save(step: int) -> None:
        if not (all_finite_on_every_rank(acc, model) if sharded else all_finite(model)):
            raise CheckpointError("refusing to save non-finite weights; the last good checkpoint is kept")
        trainer_state = {"stream": stream.state_dict(), **state, "total_steps": steps}
        if sharded:
            save_sharded_checkpoint(acc, ckpt, step, trainer_state)
        elif acc.is_main_process:
            ckpt.save(step, model, optimizer, trainer_state)
        acc.wait_for_everyone()

    autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    bar = tqdm(
        total=steps, initial=start, desc=stage.kind, disable=not (acc.is_main_process and ctx.logging.progress_bar)
    )
    wrapped.train()
    with StopFlag() as stop:
        for step in range(start, steps):
            lr, wd = two_stage_lr(step, steps, cfg.schedule), two_stage_wd(step, steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = lr, (wd if group["decay"] else 0.0)
            batches = [stage.batch("train", idx) for idx in stream.next_step(acc.process_index)]
            units = global_sum(acc, sum(stage.units(b) for b in batches))
            normalizer = units if cfg.loss_reduction == "mean" else 1.0
            totals: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(batches):
                sync = nullcontext() if i == len(batches) - 1 else acc.no_sync(wrapped)
                with sync, autocast:
                    out = stage.loss(wrapped, batch)
                # DDP averages gradients over ranks; scaling by the rank count makes that a sum.
                backward(acc, wrapped, out.loss_sum * (acc.num_processes / normalizer), i == len(batches) - 1)
                for k, v in {"loss": out.loss_sum, **out.metrics}.items():
                    totals[k] = totals.get(k, 0.0) + v.detach().float()
            grad_norm = acc.clip_grad_norm_(wrapped.parameters(), cfg.optim.grad_clip)
            record = {k: global_sum(acc, v) / units for k, v in totals.items()}
            finite = math.isfinite(record["loss"]) and math.isfinite(float(grad_norm))
            if finite:
                optimizer.step()  # a no-op under DeepSpeed, which stepped in backward(); skips are counted only
            else:
                state["nonfinite_skips"] += 1
                log.warning("step %d: non-finite loss or gradient; skipped (%d so far)", step, state["nonfinite_skips"])
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            bar.update(1)
            if done % ctx.logging.log_every == 0 or done == steps or not finite:
                logger.log({"step": done, **{f"train/{k}": v for k, v in record.items()},
                            "grad_norm": float(grad_norm), "lr": lr, "wd": wd})
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            if state["nonfinite_skips"] > cfg.max_nonfinite_steps:
                save(done)
                raise TrainingStopped(
                    f"{state['nonfinite_skips']} non-finite steps (max_nonfinite_steps={cfg.max_nonfinite_steps}) "
                    f"in stage {stage.kind}; saved step {done}. Lower the LR or check the data, then resume.",
                    exit_code=3,
                )
            if done % cfg.eval_every == 0 or done == steps:
                val = evaluate(stage, wrapped if sharded else model, cfg, acc, autocast)
                logger.log({"step": done, **val})
                wrapped.train()
            if done % cfg.save_every == 0 or done == steps:
                save(done)
            if stop.signum is not None:
                if done % cfg.save_every != 0 and done != steps:
                    save(done)
                raise TrainingStopped(
                    f"stopped by signal {stop.signum} at step {done}; run the same command to resume",
                    exit_code=128 + stop.signum,
                )
    bar.close()
    # Sharded weights are gathered by every rank together; the others pass None and save nothing.
    full_state = acc.get_state_dict(wrapped) if sharded else None
    if acc.is_main_process:
        final = stage.final_metrics(model)
        if final:
            logger.log({"step": steps, **final})
        save_final(model, ctx.tokenizer, ctx.stage_dir / "final", full_state)
        if ctx.logging.plot:
            plot_training(ctx.stage_dir / "metrics.jsonl", ctx.stage_dir / "loss.png", f"{ctx.run_name}: {stage.kind}")
    logger.finish()
    acc.wait_for_everyone()
    return model


def global_sum(acc: Accelerator, value) -> float:
    t = torch.as_tensor(value, dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        t = acc.reduce(t, reduction="sum")
    return float(t)


@torch.no_grad()
def evaluate(stage: Stage, model, cfg: StageConfig, acc: Accelerator, autocast) -> dict:
    """Validation loss (and perplexity) over the first eval_batches micro-batches, sharded over ranks."""
    model.eval()
    n_batches = min(cfg.eval_batches, math.ceil(stage.eval_size / cfg.micro_batch_size))
    if shards_state(acc):
        # Every forward of a sharded model is collective: each rank must run as many as the others.
        n_batches -= n_batches % acc.num_processes
        if n_batches == 0:
            raise ValueError(
                f"eval_batches={cfg.eval_batches} (or the validation split) gives fewer micro-batches than the "
                f"{acc.num_processes} ranks of a sharded run; raise eval_batches to at least {acc.num_processes}"
            )
    totals: dict[str, float] = {}
    units = 0.0
    for b in range(acc.process_index, n_batches, acc.num_processes):
        idx = torch.arange(b * cfg.micro_batch_size, min(stage.eval_size, (b + 1) * cfg.micro_batch_size))
        batch = stage.batch("validation", idx)
        with autocast:
            out = stage.loss(model, batch)
        units += out.units
        for k, v in {"loss": out.loss_sum, **out.metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    units = global_sum(acc, units)
    record = {f"val/{k}": global_sum(acc, v) / units for k, v in totals.items()}
    if stage.token_loss:
        record["val/ppl"] = math.exp(min(record["val/loss"], 50.0))
    return record


def save_final(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """The stage's output: a transformers checkpoint directory with the tokenizer beside it.
    `state_dict`: the full weights of a sharded model (its own parameters hold one shard)."""

    if state_dict is not None:
        state_dict = without_tied_copies(model, state_dict)

    def fill(tmp: Path):
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)

    atomic_directory(path, fill)


def all_finite_on_every_rank(acc: Accelerator, model: torch.nn.Module) -> bool:
    """all_finite for sharded weights: each rank checks the part it holds (FSDP2's DTensor
    parameters are checked locally), and all ranks reach the same verdict, so none of them
    goes on into a collective save that the others refuse."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = sum(int(not torch.isfinite(t).all()) for t in local)
    return global_sum(acc, bad) == 0


def without_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """A gathered state dict holds tied weights once per name (lm_head = embed_tokens); keep the
    first name only, so the file is the one a single-process run writes."""
    first: dict[int, str] = {}
    copies = {name for name, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), name) != name}
    return {k: v for k, v in state_dict.items() if k not in copies}


def shards_state(acc: Accelerator) -> bool:
    """FSDP and DeepSpeed split weights, gradients or optimizer states over ranks, so saving,
    loading and evaluating are collective."""
    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


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
    if cfg.optim.grad_clip <= 0:
        raise ValueError("DeepSpeed reports the gradient norm only when it clips: set optim.grad_clip > 0")
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


def save_sharded_checkpoint(acc: Accelerator, ckpt: Checkpointer, step: int, trainer_state: dict) -> Path:
    """Every rank writes its part with accelerate's save_state (FSDP: the full state, gathered;
    DeepSpeed: its ZeRO partitions); rank 0 adds the trainer state and the manifest and renames
    the directory, so, as in Checkpointer.save, a checkpoint exists completely or not at all."""
    final = ckpt.dir / f"{PREFIX}{step:08d}"
    tmp = final.with_name(f"{final.name}.tmp-sharded")  # one name for all ranks (not a pid)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        write_manifest(tmp)  # checksums the top-level files; engine sub-directories are not listed
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in ckpt.steps()[: -ckpt.keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_sharded_checkpoint(acc: Accelerator, path: Path) -> dict:
    acc.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text())
