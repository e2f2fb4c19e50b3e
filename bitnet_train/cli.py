"""`bitnet-train`: Hydra-configured training, plus a few tool subcommands.

    bitnet-train [train] recipes=quickstart key=value ...   run the configured pipeline
    bitnet-train train --cfg job recipes=quickstart         print the resolved config
    bitnet-train bench train|kernels|engine|cuda            benchmarks (not tests)
    bitnet-train export CHECKPOINT --out DIR                packed checkpoints for serving
    bitnet-train eval EXPORT_DIR --ppl builtin --generate P  an export on the inference engine
    bitnet-train -m recipes=sweep_lr_drop                   a Hydra sweep (docs/launch.md)
    bitnet-train sweep-summary MULTIRUN_DIR                 a sweep's results: table and plot
    bitnet-train estimate --gpus 64 --days 30               memory per GPU and throughput for 2B4T
"""
import logging
import os
import sys
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


def train_main(argv: list[str]) -> None:
    from .preemption import listen

    # From start-up on, a stop signal (a preemption notice during data loading) is recorded for
    # the training loop, which saves and stops at its next step, instead of ending the process.
    listen()
    register_configs()

    @hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
    def _run(cfg: DictConfig) -> float | None:
        from .pipeline import run_pipeline
        from .sweep import final_val_loss
        from .trainer import TrainingStopped

        place_sweep_job(cfg)
        try:
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
    _run()


def bench_main(argv: list[str]) -> None:
    which = argv[0] if argv else "train"
    if which == "train":
        from .bench.train_step import main
    elif which == "kernels":
        from .bench.kernels import main
    elif which == "engine":
        from .bench.engine import main
    elif which == "cuda":
        from .bench.cuda_kernels import main
    else:
        raise SystemExit(f"bitnet-train bench: unknown benchmark {which!r}; use train, kernels, engine or cuda")
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
