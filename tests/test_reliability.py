"""Crashes, signals, corrupt checkpoints, non-finite losses and bad input."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitnet_train import pipeline as pipeline_module
from bitnet_train.checkpoint import CheckpointError
from bitnet_train.config import compose_config
from bitnet_train.data.sources import DataError
from bitnet_train.metrics import read_jsonl
from bitnet_train.pipeline import run_pipeline
from bitnet_train.stages.base import LossOutput
from bitnet_train.trainer import TrainingStopped

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24


def run_args(tiny_overrides, save_every=3):
    return [*tiny_overrides, f"stages.pretrain.max_steps={STEPS}", f"stages.pretrain.save_every={save_every}",
            "stages.pretrain.eval_every=8", "logging.log_every=1", "runtime.num_threads=1"]


def curve(run_dir: Path) -> list:
    records = read_jsonl(run_dir / "pretrain" / "metrics.jsonl")
    return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in records]


def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "pretrain" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from conftest import TINY

    out = tmp_path_factory.mktemp("baseline") / "run"
    run_pipeline(compose_config([*run_args(TINY), f"output_dir={out}"]))
    return out


def cli(args: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "bitnet_train.cli", *args, f"output_dir={out}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def wait_for_records(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240,
                     stage: str = "pretrain") -> None:
    metrics = out / stage / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)


def assert_same_run(resumed: Path, baseline: Path) -> None:
    assert curve(resumed) == curve(baseline)  # bit for bit, every step
    a, b = final_weights(resumed), final_weights(baseline)
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_continues_exactly(tmp_path, tiny_overrides, uninterrupted):
    args = run_args(tiny_overrides)
    rng = random.Random(2026)
    kills = 0
    for seed in range(3):
        out = tmp_path / f"run{seed}"
        proc = cli(args, out)
        # Kill after a random number of logged steps, plus a random sliver of a step, so the
        # kill lands anywhere: mid-step, mid-checkpoint, mid-log-line.
        wait_for_records(out, rng.randint(1, STEPS), proc)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        rerun = cli(args, out)
        _, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err[-3000:]
        assert_same_run(out, uninterrupted)
    assert kills >= 2  # the test must really have interrupted runs


# Lines of metrics.jsonl (log_every=1, eval_every=8, save_every=3) after which to kill: step 2,
# before the first checkpoint; step 8's validation record, two steps past the step-6 checkpoint;
# step 24's training record, before its validation record and the final save.
KILL_AFTER_LINES = {"before_the_first_checkpoint": 2, "after_a_validation_record": 9, "in_the_last_step": 26}


@pytest.mark.slow
@pytest.mark.parametrize("moment", KILL_AFTER_LINES)
def test_after_kill_9_and_rerun_the_metrics_log_equals_the_uninterrupted_runs(tmp_path, tiny_overrides,
                                                                              uninterrupted, moment):
    out = tmp_path / "run"
    proc = cli(run_args(tiny_overrides), out)
    wait_for_records(out, KILL_AFTER_LINES[moment], proc)
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = cli(run_args(tiny_overrides), out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    metrics = out / "pretrain" / "metrics.jsonl"
    assert read_jsonl(metrics) == read_jsonl(uninterrupted / "pretrain" / "metrics.jsonl")


SFT_AFTER_PRETRAIN = ["pipeline=[pretrain,sft]", "stages.pretrain.max_steps=4", "stages.pretrain.save_every=2",
                      "stages.pretrain.eval_every=4", "stages.sft.max_steps=8", "stages.sft.save_every=4",
                      "stages.sft.eval_every=4", "stages.sft.micro_batch_size=4", "stages.sft.eval_batches=2",
                      "stages.sft.data.num_train_examples=64", "stages.sft.data.num_eval_examples=8",
                      "logging.log_every=1", "runtime.num_threads=1"]


@pytest.mark.slow
def test_kill_9_in_sft_before_its_first_checkpoint_then_rerun_logs_each_step_once(tmp_path, tiny_overrides):
    args = [*tiny_overrides, *SFT_AFTER_PRETRAIN]
    baseline = tmp_path / "baseline"
    run_pipeline(compose_config([*args, f"output_dir={baseline}"]))
    out = tmp_path / "run"
    proc = cli(args, out)
    wait_for_records(out, 2, proc, stage="sft")
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = cli(args, out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    for stage in ("pretrain", "sft"):
        assert read_jsonl(out / stage / "metrics.jsonl") == read_jsonl(baseline / stage / "metrics.jsonl"), stage


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path, tiny_overrides, uninterrupted):
    args = run_args(tiny_overrides, save_every=1000)  # only the signal can cause a mid-run save
    out = tmp_path / "run"
    proc = cli(args, out)
    wait_for_records(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "run the same command to resume" in err
    saved = sorted((out / "pretrain" / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and 5 <= int(saved[0].name[5:]) < STEPS
    rerun = cli(args, out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert_same_run(out, uninterrupted)


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("name, damage", [("model.safetensors", corrupt), ("model.safetensors", truncate),
                                          ("manifest.json", empty), ("manifest.json", truncate)])
@pytest.mark.slow
def test_bad_latest_checkpoint_is_named_and_the_previous_one_used(
    tmp_path, tiny_overrides, uninterrupted, caplog, name, damage
):
    cfg = compose_config([*run_args(tiny_overrides), f"output_dir={tmp_path / 'run'}", "stages.pretrain.keep_checkpoints=3"])
    stage = run_pipeline(cfg)["pretrain"].parent
    import shutil

    shutil.rmtree(stage / "final")
    bad = stage / "checkpoints" / f"step_{STEPS:08d}" / name
    damage(bad)
    with caplog.at_level("WARNING"):
        run_pipeline(cfg)
    assert str(bad) in caplog.text and "falling back" in caplog.text
    assert_same_run(tmp_path / "run", uninterrupted)


@pytest.mark.slow
def test_every_checkpoint_bad_stops_with_instructions(tmp_path, tiny_overrides):
    cfg = compose_config([*run_args(tiny_overrides), f"output_dir={tmp_path / 'run'}", "stages.pretrain.keep_checkpoints=2"])
    stage = run_pipeline(cfg)["pretrain"].parent
    import shutil

    shutil.rmtree(stage / "final")
    for ckpt in (stage / "checkpoints").iterdir():
        corrupt(ckpt / "optimizer.pt")
    with pytest.raises(CheckpointError, match="delete .* to start this stage over"):
        run_pipeline(cfg)


class PoisonedLoss:
    """Wraps a stage so chosen training steps produce a NaN loss."""

    def __init__(self, stage, bad_steps: set[int]):
        self.stage, self.bad_steps, self.step = stage, bad_steps, 0
        self.kind, self.token_loss = stage.kind, stage.token_loss
        self.train_size, self.eval_size = stage.train_size, stage.eval_size

    def batch(self, split, idx):
        if split == "train":
            self.step += 1
        return self.stage.batch(split, idx)

    def units(self, batch):
        return self.stage.units(batch)

    def loss(self, model, batch):
        out = self.stage.loss(model, batch)
        if model.training and self.step in self.bad_steps:
            return LossOutput(out.loss_sum * float("nan"), out.units, out.metrics)
        return out


def poison(monkeypatch, bad_steps):
    real = pipeline_module.build_stage
    monkeypatch.setattr(pipeline_module, "build_stage", lambda *a: PoisonedLoss(real(*a), bad_steps))


def test_nonfinite_steps_are_skipped(tmp_path, tiny_overrides, monkeypatch):
    poison(monkeypatch, {3, 5})
    cfg = compose_config([*run_args(tiny_overrides), "stages.pretrain.max_steps=8", f"output_dir={tmp_path / 'run'}"])
    run_pipeline(cfg)
    records = read_jsonl(tmp_path / "run" / "pretrain" / "metrics.jsonl")
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert [s for s, v in losses.items() if v != v] == [3, 5]
    weights = final_weights(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    poison(monkeypatch, {2, 3, 4})
    cfg = compose_config([*run_args(tiny_overrides), "stages.pretrain.max_nonfinite_steps=2",
                          f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingStopped, match="3 non-finite steps") as stopped:
        run_pipeline(cfg)
    assert stopped.value.exit_code == 3
    saved = tmp_path / "run" / "pretrain" / "checkpoints" / "step_00000004" / "model.safetensors"
    assert all(torch.isfinite(w).all() for w in load_file(saved).values())


def test_missing_data_file_fails_before_compute(tmp_path, tiny_overrides):
    cfg = compose_config([*tiny_overrides, "stages.pretrain.data.source=files",
                          f"stages.pretrain.data.files=[{tmp_path}/nope.txt]", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=r"nope.txt does not exist"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "pretrain").exists()


def test_empty_data_file_fails(tmp_path, tiny_overrides):
    (tmp_path / "empty.txt").write_text("")
    cfg = compose_config([*tiny_overrides, "stages.pretrain.data.source=files",
                          f"stages.pretrain.data.files=[{tmp_path}/empty.txt]", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match="empty.txt is empty"):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


def write_rows(path: Path, good: int, bad: int) -> None:
    import json

    text = "The quick brown fox jumps over the lazy dog. " * 20
    rows = [{"text": text}] * good + [{"body": text}] * bad
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rows_without_the_field_are_counted_and_skipped(tmp_path, tiny_overrides, caplog):
    write_rows(tmp_path / "rows.jsonl", good=199, bad=1)
    cfg = compose_config([*tiny_overrides, "stages.pretrain.data.source=files", "stages.pretrain.max_steps=1",
                          "stages.pretrain.eval_every=1", "stages.pretrain.data.max_bad_row_fraction=0.01",
                          f"stages.pretrain.data.files=[{tmp_path}/rows.jsonl]", f"output_dir={tmp_path / 'run'}"])
    with caplog.at_level("WARNING"):
        run_pipeline(cfg)
    assert re.search(r"1 of \d+ rows .* lack a non-empty text field 'text'; skipped", caplog.text)


def test_too_many_bad_rows_fail(tmp_path, tiny_overrides):
    write_rows(tmp_path / "rows.jsonl", good=150, bad=50)
    cfg = compose_config([*tiny_overrides, "stages.pretrain.data.source=files",
                          f"stages.pretrain.data.files=[{tmp_path}/rows.jsonl]", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match="above data.max_bad_row_fraction"):
        run_pipeline(cfg)


def test_sequence_longer_than_the_model_fails_before_compute(tmp_path, tiny_overrides):
    cfg = compose_config([*tiny_overrides, "model.max_position_embeddings=16", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="seq_len=32 exceeds model.max_position_embeddings=16"):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


def test_no_pickle_from_untrusted_files_and_no_remote_code():
    """Static guard over the package: every torch.load is weights_only=True, no pickle module,
    and trust_remote_code is never switched on."""
    for path in (ROOT / "bitnet_train").rglob("*.py"):
        source = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"^\s*import pickle|^\s*from pickle", source, re.M), path
        assert "trust_remote_code=True" not in source, path
