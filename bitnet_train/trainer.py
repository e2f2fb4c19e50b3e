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
"""
import logging
import math
import signal
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import Checkpointer, CheckpointError, atomic_directory
from .config import LoggingConfig, StageConfig
from .data.stream import BatchStream
from .metrics import MetricsLogger
from .plot import plot_training
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
    """The run stopped early on purpose (signal, too many non-finite steps); a checkpoint was saved."""


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


class StopFlag:
    """SIGTERM/SIGINT (a scheduler's preemption notice) finish the step, save, then stop."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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
    wrapped, optimizer = acc.prepare(model, optimizer)
    model = acc.unwrap_model(wrapped)
    if hasattr(stage, "bind_model"):
        stage.bind_model(model)
    ckpt = Checkpointer(ctx.stage_dir / "checkpoints", cfg.keep_checkpoints)
    logger = MetricsLogger(
        ctx.stage_dir / "metrics.jsonl", ctx.logging, ctx.run_name, ctx.run_config, enabled=acc.is_main_process
    )
    state = {"nonfinite_skips": 0}
    start = 0
    resume_from = ckpt.latest_valid()
    if resume_from is not None:
        saved = Checkpointer.load(resume_from, model, optimizer)
        stream.load_state_dict(saved["stream"])
        state["nonfinite_skips"] = saved["nonfinite_skips"]
        start = saved["step"]
        logger.truncate_after(start)
        log.info("resumed %s from %s (step %d of %d)", stage.kind, resume_from, start, steps)

    def save(step: int) -> None:
        if not all_finite(model):
            raise CheckpointError("refusing to save non-finite weights; the last good checkpoint is kept")
        if acc.is_main_process:
            ckpt.save(step, model, optimizer, {"stream": stream.state_dict(), **state, "total_steps": steps})
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
                acc.backward(out.loss_sum * (acc.num_processes / normalizer))
                for k, v in {"loss": out.loss_sum, **out.metrics}.items():
                    totals[k] = totals.get(k, 0.0) + v.detach().float()
            grad_norm = acc.clip_grad_norm_(wrapped.parameters(), cfg.optim.grad_clip)
            record = {k: global_sum(acc, v) / units for k, v in totals.items()}
            finite = math.isfinite(record["loss"]) and math.isfinite(float(grad_norm))
            if finite:
                optimizer.step()
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
                    f"in stage {stage.kind}; saved step {done}. Lower the LR or check the data, then resume."
                )
            if done % cfg.eval_every == 0 or done == steps:
                val = evaluate(stage, model, cfg, acc, autocast)
                logger.log({"step": done, **val})
                wrapped.train()
            if done % cfg.save_every == 0 or done == steps:
                save(done)
            if stop.signum is not None:
                if done % cfg.save_every != 0 and done != steps:
                    save(done)
                raise TrainingStopped(
                    f"stopped by signal {stop.signum} at step {done}; run the same command to resume"
                )
    bar.close()
    if acc.is_main_process:
        final = stage.final_metrics(model)
        if final:
            logger.log({"step": steps, **final})
        save_final(model, ctx.tokenizer, ctx.stage_dir / "final")
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
    record["val/ppl"] = math.exp(min(record["val/loss"], 50.0))
    return record


def save_final(model, tokenizer, path: Path) -> None:
    """The stage's output: a transformers checkpoint directory with the tokenizer beside it."""

    def fill(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_directory(path, fill)
