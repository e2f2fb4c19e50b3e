"""Checkpoints: one format, damaged manifests, a full disk, a stage's own state, the run-directory
guard's rule for a changed rank count, and bf16 through accelerate."""
import errno
import os
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from bitnet_train import checkpoint as checkpoint_module
from bitnet_train import pipeline as pipeline_module
from bitnet_train.checkpoint import MANIFEST, Checkpointer, CheckpointError, verify_manifest, write_manifest
from bitnet_train.config import compose_config
from bitnet_train.metrics import read_jsonl
from bitnet_train.pipeline import guard_output_dir, run_pipeline

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
SIX_STEPS = [*TINY, "stages.pretrain.max_steps=6", "stages.pretrain.save_every=3", "stages.pretrain.eval_every=3",
             "logging.log_every=1", "runtime.num_threads=1"]


def run(out: Path, *extra: str) -> Path:
    run_pipeline(compose_config([*SIX_STEPS, *extra, f"output_dir={out}"]))
    return out / "pretrain"


def assert_same_run(stage: Path, baseline: Path) -> None:
    assert read_jsonl(stage / "metrics.jsonl") == read_jsonl(baseline / "metrics.jsonl")
    a, b = load_file(stage / "final" / "model.safetensors"), load_file(baseline / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("baseline") / "run")


def test_a_checkpoint_holds_the_full_state_by_parameter_name(baseline):
    ckpt = baseline / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        MANIFEST, "model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"]
    weights = load_file(ckpt / "model.safetensors")
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    # Names, not positions: the file loads into any engine on any number of ranks.
    assert set(optimizer["state"]) == set(weights)
    assert sorted(n for g in optimizer["param_groups"] for n in g["params"]) == sorted(weights)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["stream"]["global_batch"] == 8


# --- damaged manifests -------------------------------------------------------------------------

def fake_checkpoints(directory: Path, steps: list[int]) -> None:
    for step in steps:
        path = directory / f"step_{step:08d}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
        write_manifest(path)


DAMAGED_MANIFESTS = {
    "empty": "",
    "truncated": '{"files": {"trainer_state.json": "ab',
    "a list": "[1, 2]",
    "a string": '"files"',
    "a number": "3",
    "null": "null",
    "no files key": '{"checksums": {}}',
    "files not a map": '{"files": ["trainer_state.json"]}',
    "checksum not text": '{"files": {"trainer_state.json": 3}}',
    "not utf-8": b"\xff\xfe{",
}


@pytest.mark.parametrize("damage", DAMAGED_MANIFESTS, ids=list(DAMAGED_MANIFESTS))
def test_a_damaged_manifest_falls_back_to_the_previous_checkpoint(tmp_path, caplog, damage):
    fake_checkpoints(tmp_path, [3, 6])
    manifest = tmp_path / "step_00000006" / MANIFEST
    text = DAMAGED_MANIFESTS[damage]
    manifest.write_bytes(text if isinstance(text, bytes) else text.encode())
    with caplog.at_level("WARNING"):
        assert Checkpointer(tmp_path, keep=2, accelerator=None).latest_valid() == tmp_path / "step_00000003"
    assert str(manifest) in caplog.text and "falling back" in caplog.text


def test_a_damaged_manifest_is_a_checkpoint_error_naming_it(tmp_path):
    fake_checkpoints(tmp_path, [1])
    (tmp_path / "step_00000001" / MANIFEST).write_text("[]")
    with pytest.raises(CheckpointError, match=r"step_00000001/manifest.json is damaged"):
        verify_manifest(tmp_path / "step_00000001")


# --- a full disk -------------------------------------------------------------------------------

def fail_on_call(n: int, error):
    """A replacement that raises on its n-th call and does nothing on the others."""
    calls = {"n": 0}

    def replacement(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error()
        return replacement.real(*args, **kwargs)

    return replacement


def safetensors_enospc() -> Exception:
    # What safetensors raises on a full disk: its own exception type, the errno only in the text.
    return RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")


def torch_enospc() -> Exception:
    # What torch.save into a Python file raises on a full disk: its writer's error, with the
    # file's OSError as the context.
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    error.__context__ = OSError(errno.ENOSPC, "No space left on device")
    return error


def manifest_enospc() -> Exception:
    return OSError(errno.ENOSPC, "No space left on device")


WRITERS = {  # function in checkpoint.py, its call that writes the second checkpoint, the error
    "weights": ("save_file", 2, safetensors_enospc),
    "optimizer": ("save_torch", 3, torch_enospc),
    "manifest": ("write_manifest", 2, manifest_enospc),
}


@pytest.mark.slow
@pytest.mark.parametrize("writer", WRITERS)
def test_disk_full_while_saving_says_so_keeps_the_older_checkpoint_and_the_same_command_resumes(
    tmp_path, monkeypatch, baseline, writer
):
    name, nth, error = WRITERS[writer]
    real, calls = getattr(checkpoint_module, name), {"n": 0}

    def fills_the_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, name, fills_the_disk)
    with pytest.raises(CheckpointError, match="the disk is full.* run the same command again") as failed:
        run(tmp_path / "run")
    assert "\n" not in str(failed.value)
    checkpoints = tmp_path / "run" / "pretrain" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_00000003"]  # intact, and no temporaries
    verify_manifest(checkpoints / "step_00000003")
    monkeypatch.undo()  # space freed
    assert_same_run(run(tmp_path / "run"), baseline)


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MB tmpfs: one checkpoint of the tiny model (about 3.3 MB) fits, a second does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def cli(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitnet_train.cli", *SIX_STEPS, f"output_dir={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_really_full_disk_is_one_line_and_the_same_command_resumes_once_space_is_freed(small_disk, baseline):
    failed = cli(small_disk / "run")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1].startswith("bitnet-train: the disk is full")
    checkpoints = small_disk / "run" / "pretrain" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_00000003"]
    verify_manifest(checkpoints / "step_00000003")
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    rerun = cli(small_disk / "run")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_run(small_disk / "run" / "pretrain", baseline)


# --- a stage's own resumable state ---------------------------------------------------------------

class CountingStage:
    """A stage with state of its own: how many training batches it has handed out."""

    def __init__(self, stage, crash_at_batch: int | None = None):
        self.stage, self.crash_at_batch, self.drawn, self.loaded = stage, crash_at_batch, 0, None
        self.kind, self.token_loss = stage.kind, stage.token_loss
        self.train_size, self.eval_size = stage.train_size, stage.eval_size

    def batch(self, split, idx):
        if split == "train":
            self.drawn += 1
            if self.drawn == self.crash_at_batch:
                raise KeyboardInterrupt("simulated crash")
        return self.stage.batch(split, idx)

    def units(self, batch):
        return self.stage.units(batch)

    def loss(self, model, batch):
        return self.stage.loss(model, batch)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = dict(state)
        self.drawn = state["drawn"]


@pytest.mark.slow
def test_a_stage_state_is_saved_with_each_checkpoint_and_restored_on_resume(tmp_path, monkeypatch, baseline):
    real = pipeline_module.build_stage
    stages = []

    def build(*args, crash=None):
        stages.append(CountingStage(real(*args), crash))
        return stages[-1]

    monkeypatch.setattr(pipeline_module, "build_stage", lambda *a: build(*a, crash=5))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run")
    saved = json.loads((tmp_path / "run/pretrain/checkpoints/step_00000003/trainer_state.json").read_text())
    assert saved["stage"] == {"drawn": 3}
    monkeypatch.setattr(pipeline_module, "build_stage", lambda *a: build(*a))
    assert_same_run(run(tmp_path / "run"), baseline)
    assert stages[-1].loaded == {"drawn": 3} and stages[-1].drawn == 6


# --- resuming on another number of ranks ---------------------------------------------------------

def launch(ranks: int, main: bool = True) -> SimpleNamespace:
    return SimpleNamespace(num_processes=ranks, is_main_process=main)


def guard(tmp_path: Path, ranks: int, *overrides: str) -> None:
    cfg = compose_config([*TINY, "stages.pretrain.micro_batch_size=4", *overrides, f"output_dir={tmp_path}"])
    guard_output_dir(cfg, tmp_path, launch(ranks))


def test_a_run_resumes_on_fewer_ranks_with_more_accumulation_for_the_same_global_batch(tmp_path):
    guard(tmp_path, 2, "stages.pretrain.grad_accum=1")  # started: 2 ranks x 1 x 4 examples
    guard(tmp_path, 1, "stages.pretrain.grad_accum=2")
    guard(tmp_path, 2, "stages.pretrain.grad_accum=1")


def test_resuming_with_another_global_batch_is_refused(tmp_path):
    guard(tmp_path, 2, "stages.pretrain.grad_accum=1")
    with pytest.raises(ValueError, match="stage pretrain trains on global batches of 8 examples; this launch gives 4"):
        guard(tmp_path, 1, "stages.pretrain.grad_accum=1")
    with pytest.raises(ValueError, match="global batches of 8 examples; this launch gives 16"):
        guard(tmp_path, 2, "stages.pretrain.grad_accum=2")


def test_resuming_with_any_other_change_is_refused(tmp_path):
    guard(tmp_path, 2, "stages.pretrain.grad_accum=1")
    for change in ["stages.pretrain.micro_batch_size=2", "stages.pretrain.schedule.lr_peak=1e-3"]:
        with pytest.raises(ValueError, match="a run started with a different config"):
            guard(tmp_path, 1, "stages.pretrain.grad_accum=2", change)


# --- mixed precision through accelerate ----------------------------------------------------------

RECORD_AUTOCAST = """
import json, sys, torch
from bitnet_train import pipeline
from bitnet_train.config import compose_config

seen, real = [], pipeline.build_stage

def build(*args):
    stage = real(*args)
    loss = stage.loss
    def recording(model, batch):
        seen.append([torch.is_autocast_enabled("cpu"), str(torch.get_autocast_dtype("cpu"))])
        return loss(model, batch)
    stage.loss = recording
    return stage

pipeline.build_stage = build
pipeline.run_pipeline(compose_config(json.loads(sys.argv[1])))
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_bf16_trains_on_the_cpu_under_accelerates_autocast(tmp_path, baseline):
    # A fresh process: accelerate holds one mixed precision per process.
    overrides = [*SIX_STEPS, "stages.pretrain.precision=bf16", f"output_dir={tmp_path / 'run'}"]
    done = subprocess.run([sys.executable, "-c", RECORD_AUTOCAST, json.dumps(overrides)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen) >= 6 and all(s == [True, "torch.bfloat16"] for s in seen)  # training and validation
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "run/pretrain/metrics.jsonl") if "train/loss" in r]
    fp32 = [r["train/loss"] for r in read_jsonl(baseline / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses != fp32 and losses[-1] < losses[0]


def test_a_pipeline_whose_stages_mix_precisions_is_refused_before_compute(tmp_path):
    cfg = compose_config([*TINY, "pipeline=[pretrain,sft]", "stages.pretrain.precision=bf16", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"mix precisions \['bf16', 'fp32'\]"):
        run_pipeline(cfg)
    assert not (tmp_path / "pretrain").exists()


# --- FSDP2: the full state gathered from shards ---------------------------------------------------

@pytest.mark.slow
def test_an_fsdp2_checkpoint_resumes_exactly_on_two_ranks_and_on_one(tmp_path):
    """accelerate's FSDP needs GPUs; tests/fsdp_worker.py shards the model with torch's
    fully_shard on 2 gloo ranks and drives the same Checkpointer."""
    import fsdp_worker
    from accelerate import DistributedType

    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    uninterrupted = load_file(tmp_path / "uninterrupted.safetensors")
    resumed = load_file(tmp_path / "resumed.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)

    # The same checkpoint in one process, unsharded: the same 3rd step.
    one = SimpleNamespace(distributed_type=DistributedType.NO, is_main_process=True, num_processes=1,
                          wait_for_everyone=lambda: None, unwrap_model=lambda m: m)
    torch.manual_seed(1)
    model = fsdp_worker.BitNetTrainForCausalLM(fsdp_worker.BitNetTrainConfig(**fsdp_worker.ARCH))
    optimizer = torch.optim.AdamW(fsdp_worker.decay_mask_groups(model), lr=1e-2, weight_decay=0.1)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1, accelerator=one)
    ckpt.load(ckpt.latest_valid(), model, optimizer)
    fsdp_worker.step(model, optimizer, torch.load(tmp_path / "ids.pt", weights_only=True)[2])
    for name, value in model.state_dict().items():
        if name in uninterrupted:
            torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
