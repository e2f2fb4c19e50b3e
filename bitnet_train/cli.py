"""`bitnet-train`: Hydra-configured training, plus a few tool subcommands.

    bitnet-train [train] recipes=quickstart key=value ...   run the configured pipeline
    bitnet-train train --cfg job recipes=quickstart         print the resolved config
    bitnet-train bench train|train-gpu|kernels|engine|cuda|data  benchmarks (not tests)
    bitnet-train export CHECKPOINT --out DIR                packed checkpoints for serving
    bitnet-train eval EXPORT_DIR --ppl builtin --generate P  an export on the inference engine
    bitnet-train -m recipes=sweep_lr_drop                   a Hydra sweep (docs/launch.md)
    bitnet-train sweep-summary MULTIRUN_DIR                 a sweep's results: table and plot
    bitnet-train estimate --gpus 64 --days 30               memory per GPU and throughput for 2B4T

Bad input (a config key or value, a data file, a checkpoint path) is reported on one line,
`bitnet-train: <what was wrong and how to fix it>`, with exit code 2; anything else is a bug and
keeps its traceback. BITNET_TRAIN_VERBOSE=1 (or Hydra's HYDRA_FULL_ERROR=1) shows the traceback
of bad input too.
"""
import gc
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import CONFIG_MODULE, register_configs, to_run_config


def place_sweep_job(cfg: DictConfig) -> None:
    """In a sweep, each job trains in its own Hydra job directory (hydra.sweep.dir/N) and logs
    to wandb as its own run, grouped by the sweep unless logging.group says otherwise."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    cfg.output_dir = hydra_cfg.runtime.output_dir
    if cfg.logging.group is None:
        cfg.logging.group = Path(hydra_cfg.sweep.dir).name


def rank_overrides(argv: list[str]) -> list[str]:
    """Hydra runs on every rank of a multi-process launch: only rank 0 keeps Hydra's outputs
    (.hydra/, the job log), and every rank must be told the same output_dir, since each would
    resolve the default `runs/${now:...}` on its own clock."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return []
    if not any(arg.startswith("output_dir=") for arg in argv) or any(arg in ("-m", "--multirun") for arg in argv):
        raise SystemExit(
            "a multi-process launch needs an explicit output_dir=PATH (the same on every rank) and no -m; "
            "see docs/launch.md"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    # Other ranks: no .hydra/, logs to stdout only, and a run dir that already exists (the working
    # directory; jobs do not chdir) so that Hydra creates nothing on disk.
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]


USER_ERROR_EXIT = 2
VERBOSE_VARIABLES = ("BITNET_TRAIN_VERBOSE", "HYDRA_FULL_ERROR")
# OmegaConf's node details and Hydra's search path: the message before them names the problem.
DETAIL_LINES = ("full_key:", "reference_type=", "object_type=", "Config search path:", "provider=")


def show_tracebacks() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in VERBOSE_VARIABLES)


def user_error_types() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input, each raised with a message naming it: an explicit
    list, so that a bug's exception (even a ValueError) keeps its traceback."""
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.sources import DataError

    # CompactHydraException: Hydra's own errors of composition (a mistyped key or value, a missing
    # recipe, an unparsable override), which it too prints without a trace.
    return ConfigError, DataError, CheckpointError, CompactHydraException, OmegaConfBaseException


def one_line(error: BaseException) -> str:
    """An error and its cause as one line, without the detail lines."""
    parts = []
    while error is not None:
        lines = [line.strip() for line in str(error).splitlines()]
        parts += [line for line in lines if line and not line.startswith(DETAIL_LINES) and line not in parts]
        error = error.__cause__
    return " ".join(part if part[-1] in ".:;" else f"{part};" for part in parts).rstrip(";")


@contextmanager
def user_errors_in_one_line(verbose: bool):
    try:
        yield
    except Exception as error:
        if verbose or not isinstance(error, user_error_types()):
            raise
        print(f"bitnet-train: {one_line(error)}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None


@contextmanager
def hydra_reraises():
    """Hydra prints its own report of an error (a trace for most) and exits; told
    HYDRA_FULL_ERROR it re-raises instead, so that ours is the one report."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


@contextmanager
def long_lived_imports(fresh_process: bool):
    """Import torch and transformers with the cyclic garbage collector paused, then freeze what
    exists (gc.freeze). The imports make ~600k objects that live as long as the process; on the way
    the collector would walk them all about six times (0.6 s of 4.5 s of imports, measured) and
    free almost nothing (~12k objects, which the freeze keeps). Frozen, they are skipped by later
    collections too, such as the one accelerate runs before each stage (0.2 s otherwise).
    Only the first imports of a fresh process: a caller that imported torch already (a test, in
    process) keeps its collector as it was, and a sweep's later jobs must not freeze the objects
    of the jobs before them."""
    if not fresh_process:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def train_main(argv: list[str]) -> None:
    fresh = "torch" not in sys.modules
    with long_lived_imports(fresh):
        from .preemption import listen

    # From start-up on, a stop signal (a preemption notice during data loading) is recorded for
    # the training loop, which saves and stops at its next step, instead of ending the process.
    listen()
    register_configs()

    @hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
    def _run(cfg: DictConfig) -> float | None:
        with long_lived_imports(fresh and "bitnet_train.pipeline" not in sys.modules):
            from .pipeline import run_pipeline
            from .sweep import final_val_loss
            from .trainer import TrainingStopped

        place_sweep_job(cfg)
        try:
            # Inside the job too: Hydra reports a failed job's overrides before re-raising.
            with user_errors_in_one_line(verbose):
                outputs = run_pipeline(to_run_config(cfg))
        except TrainingStopped as stopped:  # a deliberate stop, not a crash: no traceback
            if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not one per rank
                print(f"bitnet-train: {stopped} (exit code {stopped.exit_code})", file=sys.stderr)
            raise SystemExit(stopped.exit_code)
        for name, path in outputs.items():
            print(f"{name}: {path}")
        # The task's value: what a sweeper (Optuna) minimizes.
        return final_val_loss(Path(cfg.output_dir))

    # Ours go last: Hydra's flags (-m, --cfg job) must come before the overrides.
    sys.argv = [sys.argv[0], *argv, *rank_overrides(argv)]
    verbose = show_tracebacks()
    with hydra_reraises(), user_errors_in_one_line(verbose):  # composing the config
        _run()


def bench_main(argv: list[str]) -> None:
    which = argv[0] if argv else "train"
    if which == "train":
        from .bench.train_step import main
    elif which == "train-gpu":
        from .bench.train_step import gpu_main as main
    elif which == "kernels":
        from .bench.kernels import main
    elif which == "engine":
        from .bench.engine import main
    elif which == "cuda":
        from .bench.cuda_kernels import main
    elif which == "data":
        from .bench.data import main
    else:
        raise SystemExit(f"bitnet-train bench: unknown benchmark {which!r}; "
                         "use train, train-gpu, kernels, engine, cuda or data")
    main(argv[1:])


def export_main(argv: list[str]) -> None:
    from .export.cli import main

    main(argv)


def eval_main(argv: list[str]) -> None:
    from .scoring.cli import main

    main(argv)


def sweep_summary_main(argv: list[str]) -> None:
    from .sweep import main

    main(argv)


def estimate_main(argv: list[str]) -> None:
    from .estimate import main

    main(argv)


SUBCOMMANDS = {
    "train": train_main,
    "bench": bench_main,
    "export": export_main,
    "eval": eval_main,
    "sweep-summary": sweep_summary_main,
    "estimate": estimate_main,
}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    main()
