"""Training checkpoints: atomic, checksummed, rotated, and exact to resume from.

A checkpoint is a directory `step_NNNNNNNN/` holding the model (safetensors), the optimizer,
the RNG state, the trainer state (step, data position, counters) and a manifest of SHA-256
checksums written last. It is built under a temporary name, fsynced, then renamed, so a kill
at any moment leaves either the previous checkpoints or a complete new one, never half of one.
Nothing here unpickles arbitrary objects: tensors go through safetensors or
`torch.load(weights_only=True)`.
"""
import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

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


def verify_manifest(directory: Path) -> None:
    """Raise CheckpointError naming the first missing or corrupt file."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: it was not completely written")
    for name, digest in json.loads(manifest.read_text())["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {manifest})")
        if sha256(path) != digest:
            raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match {manifest}")


def atomic_directory(final: Path, fill) -> None:
    """Run fill(tmp_dir), checksum it, then rename it to `final` in one step."""
    for stale in final.parent.glob(f"{final.name}.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no disk space left while writing {final}; free space under {final.parent} "
                "(older checkpoints are intact) and run the same command again to resume"
            ) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        self.dir = Path(directory)
        self.keep = max(1, keep)

    def remove_partial(self) -> None:
        """Delete temporaries a killed save left behind (they never became checkpoints)."""
        for tmp in self.dir.glob(f"{PREFIX}*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def steps(self) -> list[Path]:
        found = [p for p in self.dir.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        def fill(tmp: Path):
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))

        path = self.dir / f"{PREFIX}{step:08d}"
        atomic_directory(path, fill)
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
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

    @staticmethod
    def load(path: Path, model, optimizer) -> dict:
        verify_manifest(path)
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
        return json.loads((path / "trainer_state.json").read_text())
