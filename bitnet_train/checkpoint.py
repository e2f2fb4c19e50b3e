"""Training checkpoints and a stage's final weights: atomic, checksummed, rotated, exact to resume.

A checkpoint is a directory `step_NNNNNNNN/`, the same in every launch mode (one process, DDP,
FSDP, DeepSpeed):
    model.safetensors   the full weights, by parameter name
    optimizer.pt        the full AdamW state, by parameter name
    rng.pt              torch's RNG state
    trainer_state.json  step, data position, counters, the stage's own state
    manifest.json       SHA-256 of each file above, written last
Sharded engines gather their parts first (distributed.py), so a run resumes on any rank count.
The directory is built under a temporary name, fsynced, then renamed, so a kill at any moment
leaves either the previous checkpoints or a complete new one, never half of one. Nothing here
unpickles arbitrary objects: tensors go through safetensors or `torch.load(weights_only=True)`.
"""
import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .distributed import full_model_state, full_optimizer_state, load_full_state, without_tied_copies

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted, with what to do about it."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, extra: dict | None = None) -> None:
    """Checksum every file in `directory` (fsyncing each) and write the manifest last."""
    files = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            fsync_path(p)
            files[p.name] = sha256(p)
    (directory / MANIFEST).write_text(json.dumps({"files": files, **(extra or {})}, indent=1))
    fsync_path(directory / MANIFEST)


def read_manifest(directory: Path) -> dict[str, str]:
    """File name -> SHA-256, or CheckpointError if the manifest is missing or not one of ours."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: it was not completely written")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest} is damaged ({type(e).__name__}: {e})") from e
    if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        raise CheckpointError(f"{manifest} is damaged: 'files' is not a map of file names to checksums")
    return files


def verify_manifest(directory: Path) -> None:
    """Raise CheckpointError naming the first missing or corrupt file."""
    for name, digest in read_manifest(directory).items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {directory / MANIFEST})")
        if sha256(path) != digest:
            raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match {directory / MANIFEST}")


def save_torch(obj, path: Path) -> None:
    """torch.save through a Python file: a full disk then surfaces as OSError(ENOSPC); torch's
    own file writer reports it only as "unexpected pos"."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def disk_full(error: BaseException) -> bool:
    """ENOSPC, also where a library wraps it (torch.save chains it, safetensors names it)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def atomic_directory(final: Path, fill) -> None:
    """Run fill(tmp_dir), checksum it, then rename it to `final` in one step."""
    for stale in final.parent.glob(f"{final.name}.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise CheckpointError(
                f"the disk is full: no space left while writing {final}; free space under {final.parent} "
                "(older checkpoints are intact) and run the same command again to resume"
            ) from e
        raise


def save_final(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """The stage's output: a transformers checkpoint directory with the tokenizer beside it.
    `state_dict`: the full weights of a sharded model (its own parameters hold one shard)."""
    if state_dict is not None:
        state_dict = without_tied_copies(model, state_dict)

    def fill(tmp: Path):
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)

    atomic_directory(path, fill)


class Checkpointer:
    """The checkpoints of one stage. `save` and `load` are collective: every rank calls them."""

    def __init__(self, directory: Path, keep: int, accelerator: Accelerator):
        self.dir = Path(directory)
        self.keep = max(1, keep)
        self.acc = accelerator

    def remove_partial(self) -> None:
        """Delete temporaries a killed save left behind (they never became checkpoints)."""
        if self.acc.is_main_process:
            for tmp in self.dir.glob(f"{PREFIX}*.tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()

    def steps(self) -> list[Path]:
        found = [p for p in self.dir.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def save(self, step: int, wrapped, optimizer, trainer_state: dict) -> Path:
        """Gather the full state (every rank), write it on rank 0, rotate old checkpoints."""
        weights = full_model_state(self.acc, wrapped)
        optimizer_state = full_optimizer_state(self.acc, wrapped, optimizer)

        def fill(tmp: Path):
            save_file(without_tied_copies(self.acc.unwrap_model(wrapped), weights), tmp / "model.safetensors")
            save_torch(optimizer_state, tmp / "optimizer.pt")
            save_torch({"torch": torch.get_rng_state()}, tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))

        path = self.dir / f"{PREFIX}{step:08d}"
        if self.acc.is_main_process:
            atomic_directory(path, fill)
            for old in self.steps()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return path

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose checksums verify; corrupt ones are named and skipped.

        None means "start fresh" and is only returned when there are no checkpoints at all:
        if every one is bad, silently restarting would throw the run's progress away.
        """
        steps = self.steps()
        for path in reversed(steps):
            try:
                verify_manifest(path)
                return path
            except CheckpointError as e:
                log.warning("skipping a bad checkpoint: %s; falling back to the previous one", e)
        if steps:
            raise CheckpointError(
                f"every checkpoint in {self.dir} is corrupt or incomplete (see the warnings above); "
                f"restore them from a backup, or delete {self.dir} to start this stage over"
            )
        return None

    def load(self, path: Path, wrapped, optimizer) -> dict:
        """Every rank reads the full state and keeps its part; returns the trainer state."""
        verify_manifest(path)
        weights = load_file(path / "model.safetensors")
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
        load_full_state(self.acc, wrapped, optimizer, weights, optimizer_state)
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
        return json.loads((path / "trainer_state.json").read_text())
