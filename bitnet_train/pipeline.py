"""Runs the configured pipeline in order: training stages, each starting from the previous
stage's output, then steps that read the finished checkpoints (the report; export plugs in
the same way, through `AFTER_TRAINING`).

Re-running the same command resumes: finished stages (their `final/` checkpoint verifies) are
skipped and an interrupted one continues from its last checkpoint.
"""
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from .checkpoint import CheckpointError, verify_manifest
from .config import ConfigError, RunConfig, require
from .data.chat import check_wrong_reply_fraction
from .data.preflight import check_stage_data
from .data.tokenizer import load_tokenizer
from .distributed import mixed_precision
from .kernels.triton_support import triton_unavailable_reason
from .scoring.report import write_report
from .model_factory import build_model, load_checkpoint_model
from .quant import set_bitlinear_kernel
from .schedules import validate as validate_schedule
from .stages import build_stage
from .trainer import RunContext, train

log = logging.getLogger(__name__)

# Steps after training, run on the main process: fn(cfg, outputs, tokenizer, run_dir, device) -> str
# to print. `outputs` maps each finished stage to its final checkpoint.
AFTER_TRAINING = {"report": write_report}


def validate_run(cfg: RunConfig) -> None:
    """Everything that can be checked before compute is spent, for every stage of the pipeline
    (a bad SFT file must not wait for pretraining to finish to be named)."""
    if cfg.model.bitlinear_kernel == "triton" and (reason := triton_unavailable_reason()):
        raise ConfigError(f"model.bitlinear_kernel=triton: {reason}")
    require(cfg.model.loss_chunk_tokens >= 0, "model", "loss_chunk_tokens", cfg.model.loss_chunk_tokens,
            "must be >= 0 (0: the loss from the full logits)")
    for i, name in enumerate(cfg.pipeline):
        if name in AFTER_TRAINING:
            if any(later in cfg.stages for later in cfg.pipeline[i:]):
                raise ConfigError(f"pipeline entry {name!r} reads finished stages; put it after every training stage")
            continue
        if name not in cfg.stages:
            raise ConfigError(
                f"pipeline entry {name!r} is unknown; use some of {[*cfg.stages, *AFTER_TRAINING]} "
                f"(a new stage: +stage@stages.{name}=KIND)"
            )
        stage, where = cfg.stages[name], f"stages.{name}"
        stage.check(where)
        validate_schedule(stage.schedule, f"{where}.schedule")
        check_wrong_reply_fraction(stage.data, where)
        check_stage_data(stage.kind, stage.data, where)
        if stage.init_from and not Path(stage.init_from).is_dir():
            raise ConfigError(f"{where}.init_from={stage.init_from} does not exist; give a checkpoint directory")
        if stage.data.seq_len > cfg.model.max_position_embeddings:
            raise ConfigError(
                f"{where}.data.seq_len={stage.data.seq_len} exceeds model.max_position_embeddings="
                f"{cfg.model.max_position_embeddings}"
            )


def guard_output_dir(cfg: RunConfig, out: Path, accelerator: Accelerator) -> None:
    """Refuse to resume a run directory that was started with a different config.

    One change is allowed: how each stage's global batch (micro_batch_size x grad_accum x ranks)
    is split. A preempted job that comes back on fewer GPUs resumes with grad_accum raised to keep
    the global batch, and trains on as before."""
    saved, saved_batches = out / "run_config.yaml", out / "global_batch.json"
    current = OmegaConf.to_yaml(cfg)
    batches = {name: cfg.stages[name].micro_batch_size * cfg.stages[name].grad_accum * accelerator.num_processes
               for name in cfg.pipeline if name in cfg.stages}

    def without_grad_accum(config_yaml: str) -> str:
        config = OmegaConf.create(config_yaml)
        for stage in config.stages.values():
            stage.grad_accum = None
        return OmegaConf.to_yaml(config)

    def write(path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # a kill mid-write must not look like "another config" next time

    if saved.exists():
        before = json.loads(saved_batches.read_text()) if saved_batches.exists() else None
        if saved.read_text() != current and (before is None or without_grad_accum(saved.read_text())
                                             != without_grad_accum(current)):
            raise ConfigError(
                f"{out} holds a run started with a different config ({saved}); "
                "use a new output_dir, or delete that directory to start over"
            )
        for name, n in (before or {}).items():
            if name in batches and batches[name] != n:
                raise ConfigError(
                    f"{out} holds a run whose stage {name} trains on global batches of {n} examples; this launch "
                    f"gives {batches[name]} (micro_batch_size x grad_accum x {accelerator.num_processes} ranks): "
                    f"set stages.{name}.grad_accum to keep {n}, or use a new output_dir"
                )
    elif accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write(saved_batches, json.dumps(batches, indent=1))
        write(saved, current)


def stage_done(stage_dir: Path) -> bool:
    try:
        verify_manifest(stage_dir / "final")
        return True
    except CheckpointError:
        return False


def run_pipeline(cfg: RunConfig) -> dict[str, Path]:
    validate_run(cfg)
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg))
    out = Path(cfg.output_dir)
    guard_output_dir(cfg, out, accelerator)
    tokenizer = load_tokenizer(cfg.tokenizer)
    outputs: dict[str, Path] = {}
    previous = None
    for name in cfg.pipeline:
        if name in AFTER_TRAINING:
            if accelerator.is_main_process:
                print(AFTER_TRAINING[name](cfg, outputs, tokenizer, out, accelerator.device))
            accelerator.wait_for_everyone()
            continue
        stage_cfg = cfg.stages[name]
        stage_dir = out / name
        if stage_done(stage_dir):
            log.info("stage %s already finished (%s); skipping", name, stage_dir / "final")
        else:
            torch.manual_seed(cfg.seed)
            init = stage_cfg.init_from or previous
            model = load_checkpoint_model(init, cfg.model.quantize) if init else build_model(cfg.model, tokenizer)
            set_bitlinear_kernel(model, str(cfg.model.bitlinear_kernel))
            model.loss_chunk_tokens = cfg.model.loss_chunk_tokens
            stage = build_stage(stage_cfg.kind, stage_cfg, tokenizer, cfg.seed, model.config.max_position_embeddings)
            ctx = RunContext(
                stage_dir=stage_dir,
                accelerator=accelerator,
                logging=cfg.logging,
                seed=cfg.seed,
                run_name=f"{out.name}-{name}",
                run_config=asdict(cfg),
                tokenizer=tokenizer,
            )
            train(stage, model, stage_cfg, ctx)
        previous = outputs[name] = stage_dir / "final"
    return outputs
