"""precision=bf16 on the CPU: one optimizer step runs, stays finite, and differs from fp32 only as
bfloat16 arithmetic can. Each precision runs in its own process: accelerate fixes the mixed
precision once per process."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitnet_train.metrics import read_jsonl

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
LR = 3e-3  # TINY's lr_peak, reached at the first step of a 1-step run


def one_step(tmp_path: Path, precision: str) -> tuple[dict[str, torch.Tensor], dict]:
    out = tmp_path / precision
    subprocess.run(
        [sys.executable, "-m", "bitnet_train.cli", *TINY, "stages.pretrain.max_steps=1", "logging.log_every=1",
         f"stages.pretrain.precision={precision}", "runtime.num_threads=1", f"output_dir={out}"],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )
    train_record = next(r for r in read_jsonl(out / "pretrain" / "metrics.jsonl") if "train/loss" in r)
    return load_file(out / "pretrain" / "final" / "model.safetensors"), train_record


@pytest.mark.slow
def test_a_bf16_step_is_finite_and_close_to_the_fp32_step(tmp_path):
    fp32, fp32_log = one_step(tmp_path, "fp32")
    bf16, bf16_log = one_step(tmp_path, "bf16")
    assert fp32_log["lr"] == bf16_log["lr"] == pytest.approx(LR)

    # The forward ran in bfloat16 (8 bits of mantissa): a loss of a few nats moves in the 4th digit.
    assert bf16_log["train/loss"] != fp32_log["train/loss"]
    assert bf16_log["train/loss"] == pytest.approx(fp32_log["train/loss"], rel=1e-3)
    assert bf16_log["grad_norm"] == pytest.approx(fp32_log["grad_norm"], rel=1e-2)

    # Master weights stay float32 and finite. Both runs start from the same seeded weights, and
    # AdamW's first step moves each weight by about lr in the direction of its gradient's sign, so
    # the two can disagree by at most 2 lr (a gradient whose sign bf16 rounding flipped).
    assert bf16.keys() == fp32.keys()
    differs = False
    for name, weight in bf16.items():
        assert weight.dtype == torch.float32 and torch.isfinite(weight).all(), name
        gap = (weight - fp32[name]).abs().max().item()
        assert gap <= 2 * LR * (1 + 1e-3), f"{name}: {gap}"
        differs |= gap > 0
    assert differs
