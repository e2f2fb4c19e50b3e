"""One rank of a multi-rank test run (tests/test_distributed.py starts it through `accelerate launch`).

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/dist_worker.py SPEC.json

SPEC.json: {"num_processes": 2, "audit_root": DIR, "audit_out": DIR, "runs": [[override, ...], ...],
             "backend": optional process-group backend}.
Each run goes through the real CLI (Hydra included), one after the other in this process.

The worker fails unless accelerate really started `num_processes` ranks: on this CPU machine some
launch flags silently start a single process, and a single-process run would pass any
equivalence test. It also records every file or directory this rank creates under `audit_root`
(Python audit hooks: open for writing, mkdir, rename) and writes the list to
`audit_out/rank{N}.json`, so a test can check that only rank 0 writes into a run directory.
"""
import json
import os
import sys
from pathlib import Path

from accelerate import Accelerator, InitProcessGroupKwargs


def record_writes(root: Path, written: list[str]) -> None:
    root = str(root.resolve())

    def under_root(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(root)
        except TypeError:  # a file descriptor, not a path
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args[0] is not None and under_root(args[0]):
            mode, flags = args[1], args[2]
            writing = (mode and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                written.append(f"open {args[0]}")
        elif event == "os.mkdir" and under_root(args[0]) and not os.path.exists(args[0]):
            written.append(f"mkdir {args[0]}")
        elif event == "os.rename" and under_root(args[1]):
            written.append(f"rename {args[1]}")

    sys.addaudithook(hook)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    # The pipeline's own Accelerator() shares this state. (A bare PartialState() would ignore
    # ACCELERATE_USE_CPU and report one process here.)
    # "backend": "gloo" for DeepSpeed on a machine without GPUs, where accelerate picks none and
    # would count one process in each rank.
    handlers = [InitProcessGroupKwargs(backend=spec["backend"])] if spec.get("backend") else []
    state = Accelerator(kwargs_handlers=handlers)
    if state.num_processes != spec["num_processes"]:
        raise SystemExit(f"expected {spec['num_processes']} ranks, accelerate started {state.num_processes}")
    written: list[str] = []
    record_writes(Path(spec["audit_root"]), written)

    from bitnet_train.cli import main as cli_main

    for overrides in spec["runs"]:
        sys.argv = ["bitnet-train", *overrides]
        cli_main()
    out = Path(spec["audit_out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{state.process_index}.json").write_text(json.dumps(written, indent=1))


if __name__ == "__main__":
    main()
