"""Hydra sweeps: one directory and one wandb group per sweep, a summary at the end, a score for Optuna."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

from bitnet_train.config import CONFIG_MODULE, register_configs
from bitnet_train.sweep import final_val_loss, main as sweep_summary, summarize

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
FAST = [*TINY, "stages.pretrain.max_steps=4", "stages.pretrain.eval_every=2", "stages.pretrain.eval_batches=2", "stages.pretrain.save_every=4",
        "stages.pretrain.schedule.warmup_steps=1"]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "bitnet_train.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_sweep_recipe_runs_two_trials_each_in_its_own_directory(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # Two LRs, one drop point: the command line narrows the recipe's 3 x 3 grid.
    done = cli("-m", "recipes=sweep_lr_drop", *FAST, "stages.pretrain.schedule.lr_peak=1e-3,4e-3",
               "stages.pretrain.schedule.stage2_start=0.5", f"hydra.sweep.dir={sweep_dir}")
    configs = {p.parent.name: yaml.safe_load(p.read_text()) for p in sweep_dir.glob("*/run_config.yaml")}
    assert sorted(configs) == ["0", "1"]
    assert {c["stages"]["pretrain"]["schedule"]["lr_peak"] for c in configs.values()} == {1e-3, 4e-3}
    for job, c in configs.items():
        assert c["output_dir"] == str(sweep_dir / job)  # output_dir follows the job, not runs/${now}
        assert c["logging"]["group"] == "sweep"  # one wandb group per sweep: its directory's name
        assert (sweep_dir / job / "pretrain" / "final" / "model.safetensors").is_file()
    rows = list(csv.reader((sweep_dir / "sweep_summary.csv").open()))
    assert rows[0] == ["run", "stages.pretrain.schedule.lr_peak", "stage", "steps", "train_loss", "val_loss", "status"]
    assert len(rows) == 3 and float(rows[1][5]) <= float(rows[2][5])  # best first
    assert (sweep_dir / "sweep_summary.png").stat().st_size > 5_000
    assert "| run | stages.pretrain.schedule.lr_peak |" in done.stdout


def fake_run(run_dir: Path, lr: float, seed: int, val: list[float] | None, finished: bool = True,
             pipeline=("pretrain",)) -> None:
    run_dir.mkdir(parents=True)
    config = {"pipeline": list(pipeline), "seed": seed, "output_dir": str(run_dir),
              "stages": {name: {"schedule": {"lr_peak": lr, "wd": 0.1}} for name in pipeline}, "logging": {"group": "g"}}
    (run_dir / "run_config.yaml").write_text(yaml.safe_dump(config))
    for stage in pipeline:
        (run_dir / stage).mkdir()
        records = [{"step": 1, "train/loss": 9.0}] + [{"step": 10 * (i + 1), "val/loss": v} for i, v in enumerate(val or [])]
        (run_dir / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if finished:
            (run_dir / stage / "final").mkdir()


def test_summary_lists_what_varied_best_first_and_marks_unfinished_runs(tmp_path, capsys):
    fake_run(tmp_path / "0", lr=1e-3, seed=1, val=[5.0, 4.0])
    fake_run(tmp_path / "1", lr=3e-3, seed=1, val=[4.5, 3.5])
    fake_run(tmp_path / "2", lr=9e-3, seed=1, val=[6.0], finished=False)
    sweep_summary([str(tmp_path)])
    rows = list(csv.reader((tmp_path / "sweep_summary.csv").open()))
    assert rows[0] == ["run", "stages.pretrain.schedule.lr_peak", "stage", "steps", "train_loss", "val_loss", "status"]
    assert [r[0] for r in rows[1:]] == ["1", "0", "2"]  # by final validation loss
    assert rows[1][5] == "3.5" and rows[3][6] == "incomplete"
    assert "| 1 | 0.003 | pretrain | 20 | 9 | 3.5 | finished |" in capsys.readouterr().out
    assert (tmp_path / "sweep_summary.png").is_file()


def test_score_is_the_last_val_loss_of_the_last_training_stage(tmp_path):
    fake_run(tmp_path / "run", lr=1e-3, seed=1, val=[2.0, 1.5], pipeline=("pretrain", "sft"))
    (tmp_path / "run" / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 5, "val/loss": 0.7}) + "\n")
    assert final_val_loss(tmp_path / "run") == 0.7


def test_summary_of_a_directory_without_runs_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_config.yaml"):
        summarize(tmp_path)
    with pytest.raises(SystemExit, match=rf"^bitnet-train sweep-summary: no runs under {tmp_path}"):
        sweep_summary([str(tmp_path)])


def hydra_node(*overrides: str):
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra


def test_submitit_launcher_config_targets_slurm():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[sweeps]")
    launcher = hydra_node("hydra/launcher=slurm", "recipes=sweep_lr_drop").launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1


@pytest.mark.slow
def test_optuna_sweeper_minimizes_the_returned_val_loss(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e .[sweeps]")
    sweeper = hydra_node("hydra/sweeper=optuna_val_loss", "recipes=sweep_lr_drop").sweeper
    assert sweeper.direction == "minimize" and "stages.pretrain.schedule.lr_peak" in sweeper.params
    sweep_dir = tmp_path / "optuna"
    cli("-m", "hydra/sweeper=optuna_val_loss", "recipes=sweep_lr_drop", *FAST, "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep_dir}")
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    scores = [final_val_loss(p.parent) for p in sweep_dir.glob("*/run_config.yaml")]
    assert len(scores) == 2 and best["best_value"] == pytest.approx(min(scores))
