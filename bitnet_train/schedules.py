"""The two-stage learning-rate and weight-decay schedules of BitNet b1.58.

Ternary training tolerates, and benefits from, a much higher LR than full precision early on;
halfway through, an abrupt drop to a lower peak (cooldown) gives the S-shaped loss curve's
large second descent. Weight decay is on in stage 1 and off in stage 2: the latent weights'
magnitude then acts as a confidence that decay would erode, flipping ternary values.
"""
import math

from .config import ConfigError, DecayShape, ScheduleConfig, WeightDecayShape


def decay(progress: float, shape: DecayShape) -> float:
    """1 at progress 0, 0 at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == DecayShape.linear:
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def stage2_step(total_steps: int, cfg: ScheduleConfig) -> int:
    """First step of stage 2 (== total_steps when there is no stage 2)."""
    return min(total_steps, round(cfg.stage2_start * total_steps))


def two_stage_lr(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    warmup = min(cfg.warmup_steps, total_steps)
    drop = stage2_step(total_steps, cfg)
    if step < warmup:
        return cfg.lr_peak * (step + 1) / warmup
    if step < drop:
        end = cfg.lr_peak * cfg.stage1_end_ratio
        return end + (cfg.lr_peak - end) * decay((step - warmup) / max(1, drop - warmup), cfg.shape)
    end = cfg.lr_stage2_peak * cfg.final_ratio
    return end + (cfg.lr_stage2_peak - end) * decay((step - drop) / max(1, total_steps - drop), cfg.shape)


def two_stage_wd(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    drop = stage2_step(total_steps, cfg)
    if step >= drop:
        return cfg.wd_stage2
    if cfg.wd_shape == WeightDecayShape.constant:
        return cfg.wd
    # 2B4T report: a cosine weight-decay schedule peaking at wd
    return cfg.wd * decay(step / max(1, drop), DecayShape.cosine)


def validate(cfg: ScheduleConfig, where: str = "schedule") -> None:
    """Fail at start-up, not hours in, on a schedule that cannot be evaluated or would train
    backwards (a negative LR ascends the loss; a negative decay inflates the weights).
    The shapes are enums, checked when the config is composed."""
    if not 0.0 < cfg.stage2_start <= 1.0:
        raise ConfigError(f"{where}.stage2_start={cfg.stage2_start} must be in (0, 1]")
    if cfg.lr_peak <= 0:
        raise ConfigError(f"{where}.lr_peak={cfg.lr_peak} must be > 0")
    for key in ("lr_stage2_peak", "stage1_end_ratio", "final_ratio", "wd", "wd_stage2", "warmup_steps"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{where}.{key}={getattr(cfg, key)} must be >= 0")
