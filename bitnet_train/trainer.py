"""The one training loop, shared by every stage (pretrain, SFT, DPO).

A stage brings its data and its loss (stages/base.py); the loop does the rest once: AdamW with
the two-stage LR/WD schedules, gradient accumulation over ranks, clipping, non-finite step
skipping, validation, checkpoints with exact resume (checkpoint.py), logging (metrics.py).
Ranks and engines are distributed.py's business; mixed precision is accelerate's (`autocast`).

Reduction. A stage's loss returns the *sum* of its per-unit losses (tokens, or preference
pairs) and the number of units. The update for one global batch is the gradient of
    sum over every unit of the global batch of loss / N
with N = the global number of units for `mean` and N = 1 for `sum`. N is counted before the
forward, over all micro-batches and ranks, so the update does not depend on how the global
batch is split into micro-batches or ranks.
"""
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import Checkpointer, CheckpointError, save_final
from .config import LoggingConfig, StageConfig
from .data.stream import BatchStream
from .distributed import (
    backward,
    check_world_size,
    configure_deepspeed,
    evaluation_model,
    finite_on_every_rank,
    full_model_state,
    global_sum,
    shards_state,
)
from .metrics import MetricsLogger
from .preemption import StopFlag
from .quant import BitLinear
from .schedules import two_stage_lr, two_stage_wd, validate
from .stages.base import Stage

log = logging.getLogger(__name__)


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


def train(stage: Stage, model: torch.nn.Module, cfg: StageConfig, ctx: RunContext) -> torch.nn.Module:
    acc = ctx.accelerator
    validate(cfg.schedule)
    check_world_size(acc)
    if hasattr(stage, "batch_stream"):  # a stage that orders its own examples (a data stream)
        stream = stage.batch_stream(cfg.micro_batch_size, cfg.grad_accum, acc.num_processes, ctx.seed)
    else:
        stream = BatchStream(stage.train_size, cfg.micro_batch_size, cfg.grad_accum, acc.num_processes, ctx.seed)
    steps = total_steps(cfg, stream)
    wrapped, optimizer = prepare(stage, model, cfg, acc)
    model = acc.unwrap_model(wrapped)
    ckpt = Checkpointer(ctx.stage_dir / "checkpoints", cfg.keep_checkpoints, acc)
    logger = MetricsLogger(ctx.stage_dir / "metrics.jsonl", ctx.logging, ctx.run_name, ctx.run_config,
                           enabled=acc.is_main_process)
    counters = {"nonfinite_skips": 0}
    start = resume(stage, ckpt, wrapped, optimizer, stream, counters)
    # Records past the resumed step are redone below; without a checkpoint that is all of them.
    logger.truncate_after(start)

    def save(step: int) -> None:
        if not finite_on_every_rank(acc, model):
            raise CheckpointError("refusing to save non-finite weights; the last good checkpoint is kept")
        state = {"stream": stream.state_dict(), **counters, "total_steps": steps}
        if hasattr(stage, "state_dict"):
            state["stage"] = stage.state_dict()
        ckpt.save(step, wrapped, optimizer, state)

    bar = tqdm(total=steps, initial=start, desc=stage.kind,
               disable=not (acc.is_main_process and ctx.logging.progress_bar))
    wrapped.train()
    with StopFlag() as stop:
        for step in range(start, steps):
            done = step + 1
            record, finite = train_step(stage, wrapped, optimizer, stream, cfg, acc, step, steps)
            bar.update(1)
            if not finite:
                counters["nonfinite_skips"] += 1
                log.warning("step %d: non-finite loss or gradient; skipped (%d so far)", done,
                            counters["nonfinite_skips"])
            if done % ctx.logging.log_every == 0 or done == steps or not finite:
                logger.log({"step": done, **record})
                bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['lr']:.2e}")
            if counters["nonfinite_skips"] > cfg.max_nonfinite_steps:
                save(done)
                raise TrainingStopped(
                    f"{counters['nonfinite_skips']} non-finite steps (max_nonfinite_steps={cfg.max_nonfinite_steps}) "
                    f"in stage {stage.kind}; saved step {done}. Lower the LR or check the data, then resume.",
                    exit_code=3,
                )
            if done % cfg.eval_every == 0 or done == steps:
                logger.log({"step": done, **evaluate(stage, evaluation_model(acc, wrapped), cfg, acc)})
                wrapped.train()
            saved = done % cfg.save_every == 0 or done == steps
            if saved:
                save(done)
            if stop.should_stop(acc):
                if not saved:
                    save(done)
                raise TrainingStopped(f"stopped by signal {stop.signum} at step {done}; run the same command to resume",
                                      exit_code=128 + stop.signum)
    bar.close()
    finish(model, full_model_state(acc, wrapped), logger, stage, ctx)
    return model


def prepare(stage: Stage, model: torch.nn.Module, cfg: StageConfig, acc: Accelerator):
    """(wrapped model, optimizer) ready for this stage's engine."""
    optimizer = torch.optim.AdamW(
        decay_mask_groups(model), lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=0.0
    )
    # One Accelerator serves every stage: drop the previous stage's model and optimizer.
    acc.free_memory()
    configure_deepspeed(acc, cfg)
    if hasattr(stage, "bind_model"):
        # Before prepare: a sharding engine would hand the stage a sharded model to copy.
        stage.bind_model(model.to(acc.device))
    return acc.prepare(model, optimizer)


def resume(stage: Stage, ckpt: Checkpointer, wrapped, optimizer, stream: BatchStream, counters: dict) -> int:
    """Load the newest valid checkpoint, if any, into everything that moves; the step to go on from."""
    ckpt.remove_partial()
    path = ckpt.latest_valid()
    if path is None:
        return 0
    saved = ckpt.load(path, wrapped, optimizer)
    stream.load_state_dict(saved["stream"])
    counters["nonfinite_skips"] = saved["nonfinite_skips"]
    if hasattr(stage, "load_state_dict"):
        stage.load_state_dict(saved.get("stage", {}))
    log.info("resumed %s from %s (step %d of %d)", stage.kind, path, saved["step"], saved["total_steps"])
    return saved["step"]


def train_step(stage: Stage, wrapped, optimizer, stream: BatchStream, cfg: StageConfig, acc: Accelerator,
               step: int, steps: int) -> tuple[dict, bool]:
    """One optimizer step over one global batch: its log record, and whether it was finite (a
    non-finite step is not applied)."""
    lr, wd = two_stage_lr(step, steps, cfg.schedule), two_stage_wd(step, steps, cfg.schedule)
    if hasattr(stage, "begin_step"):
        stage.begin_step(step, steps)
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = lr, (wd if group["decay"] else 0.0)
    batches = [stage.batch("train", idx) for idx in stream.next_step(acc.process_index)]
    units = global_sum(acc, sum(stage.units(b) for b in batches))
    normalizer = units if cfg.loss_reduction == "mean" else 1.0
    totals: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if last else acc.no_sync(wrapped), acc.autocast():
            out = stage.loss(wrapped, batch)
        # DDP averages gradients over ranks; scaling by the rank count makes that a sum.
        backward(acc, wrapped, out.loss_sum * (acc.num_processes / normalizer), last)
        for k, v in {"loss": out.loss_sum, **out.metrics}.items():
            totals[k] = totals.get(k, 0.0) + v.detach().float()
    grad_norm = float(acc.clip_grad_norm_(wrapped.parameters(), cfg.optim.grad_clip))
    record = {f"train/{k}": global_sum(acc, v) / units for k, v in totals.items()}
    finite = math.isfinite(record["train/loss"]) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()  # a no-op under DeepSpeed, which stepped in backward(); skips are counted only
    optimizer.zero_grad(set_to_none=True)
    return {**record, "grad_norm": grad_norm, "lr": lr, "wd": wd}, finite


@torch.no_grad()
def evaluate(stage: Stage, model, cfg: StageConfig, acc: Accelerator) -> dict:
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
        with acc.autocast():
            out = stage.loss(model, stage.batch("validation", idx))
        units += out.units
        for k, v in {"loss": out.loss_sum, **out.metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    units = global_sum(acc, units)
    record = {f"val/{k}": global_sum(acc, v) / units for k, v in totals.items()}
    if stage.token_loss:
        record["val/ppl"] = math.exp(min(record["val/loss"], 50.0))
    return record


def finish(model: torch.nn.Module, weights: dict, logger: MetricsLogger, stage: Stage, ctx: RunContext) -> None:
    """Write the stage's output (rank 0, from the gathered `weights`) and its plot."""
    acc = ctx.accelerator
    if acc.is_main_process:
        save_final(model, ctx.tokenizer, ctx.stage_dir / "final", weights)
        if ctx.logging.plot:
            from .plot import plot_training  # here: matplotlib costs every run's start-up otherwise

            plot_training(ctx.stage_dir / "metrics.jsonl", ctx.stage_dir / "loss.png", f"{ctx.run_name}: {stage.kind}")
    logger.finish()
    acc.wait_for_everyone()
