"""`bitnet-train`: Hydra-configured training, plus a few tool subcommands.

    bitnet-train [train] recipes=quickstart key=value ...   run the configured pipeline
    bitnet-train train --cfg job recipes=quickstart         print the resolved config
    bitnet-train bench train|kernels                        benchmarks (not tests)
    bitnet-train export CHECKPOINT --out DIR                packed checkpoints for serving
"""
import logging
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from .config import RunConfig, register_configs

ROOT = Path(__file__).resolve().parent.parent  # the repository: configs/ and recipes/ live here
CONFIG_DIR = ROOT / "configs"
SEARCHPATH = f"hydra.searchpath=[file://{ROOT}]"  # makes recipes/ a config group


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Typed config (validated by Hydra against the dataclasses on composition)."""
    return OmegaConf.to_object(cfg)


def compose_config(overrides: list[str]) -> RunConfig:
    """The same config the CLI would build, for tests and tools (no Hydra run directory)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[SEARCHPATH, *overrides])
    return to_run_config(cfg)


def train_main(argv: list[str]) -> None:
    register_configs()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        from .pipeline import run_pipeline

        outputs = run_pipeline(to_run_config(cfg))
        for name, path in outputs.items():
            print(f"{name}: {path}")

    sys.argv = [sys.argv[0], SEARCHPATH, *argv]
    _run()


def bench_main(argv: list[str]) -> None:
    which = argv[0] if argv else "train"
    if which == "train":
        from .bench.train_step import main
    elif which == "kernels":
        from .bench.kernels import main
    else:
        raise SystemExit(f"bitnet-train bench: unknown benchmark {which!r}; use train or kernels")
    main(argv[1:])


def export_main(argv: list[str]) -> None:
    from .export.cli import main

    main(argv)


SUBCOMMANDS = {"train": train_main, "bench": bench_main, "export": export_main}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    main()
