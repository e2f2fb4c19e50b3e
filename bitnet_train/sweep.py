"""What a sweep found: one row per run, the config values that varied, the final losses.

    bitnet-train -m recipes=sweep_lr_drop ...      # Hydra multirun; the summary is written at the end
    bitnet-train sweep-summary MULTIRUN_DIR         # the same summary, any time (also mid-sweep)

A run is any directory under MULTIRUN_DIR holding a run_config.yaml (pipeline.py writes it before
training). The columns are the config keys whose values differ between runs, read from those
files, so the table shows what actually varied whatever the sweep's syntax was. The score is the
last validation loss of the run's last training stage, the number the Optuna sweeper minimizes
(cli.py's task returns it). Writes sweep_summary.csv and sweep_summary.png beside the runs.
"""
import argparse
import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from .metrics import read_jsonl

log = logging.getLogger(__name__)

@dataclass
class RunResult:
    path: Path
    config: dict  # flattened run_config.yaml: {"stages.pretrain.schedule.lr_peak": 0.003, ...}
    stage: str | None  # the last training stage that logged anything
    steps: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    val_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.stage is not None and (self.path / self.stage / "final").is_dir()


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def last(records: list[dict], key: str) -> tuple[int, float] | None:
    found = [(r["step"], r[key]) for r in records if key in r]
    return found[-1] if found else None


def final_val_loss(run_dir: Path) -> float | None:
    """The last val/loss of the run's last training stage: a sweep's score."""
    return read_run(Path(run_dir)).val_loss


def read_run(run_dir: Path) -> RunResult:
    config = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    result = RunResult(run_dir, flatten(config), stage=None)
    for stage in reversed([s for s in config.get("pipeline", []) if s in config.get("stages", {})]):
        metrics = run_dir / stage / "metrics.jsonl"
        records = read_jsonl(metrics) if metrics.is_file() else []
        if not records:
            continue
        result.stage = stage
        result.steps = max(r.get("step", 0) for r in records)
        result.train_loss = (last(records, "train/loss") or (0, None))[1]
        result.val_curve = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
        result.val_loss = result.val_curve[-1][1] if result.val_curve else None
        break
    return result


def find_runs(sweep_dir: Path) -> list[RunResult]:
    runs = [read_run(p.parent) for p in sorted(Path(sweep_dir).rglob("run_config.yaml"))]
    if not runs:
        raise FileNotFoundError(
            f"no runs under {sweep_dir}: a run is a directory with a run_config.yaml; point at a multirun "
            "directory (hydra.sweep.dir, e.g. multirun/2026-11-23_06-00-00)"
        )
    return runs


def varied_keys(runs: list[RunResult]) -> list[str]:
    keys = sorted(set().union(*(r.config for r in runs)))
    # output_dir and the wandb group differ by construction, not by choice.
    ignore = {"output_dir", "logging.group"}
    return [k for k in keys if k not in ignore and len({repr(r.config.get(k)) for r in runs}) > 1]


def table_rows(runs: list[RunResult]) -> tuple[list[str], list[list]]:
    keys = varied_keys(runs)
    header = ["run", *keys, "stage", "steps", "train_loss", "val_loss", "status"]
    ranked = sorted(runs, key=lambda r: (r.val_loss is None, r.val_loss if r.val_loss is not None else 0.0))
    rows = [
        [r.path.name, *(r.config.get(k) for k in keys), r.stage, r.steps, r.train_loss, r.val_loss,
         "finished" if r.finished else "incomplete"]
        for r in ranked
    ]
    return header, rows


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_sweep(runs: list[RunResult], keys: list[str], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in runs:
        if r.val_curve:
            label = ", ".join(f"{k.split('.')[-1]}={cell(r.config.get(k))}" for k in keys) or r.path.name
            steps, losses = zip(*r.val_curve)
            ax.plot(steps, losses, "o-", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"sweep {out_png.parent.name}: {len(runs)} runs")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def summarize(sweep_dir: Path) -> str:
    """Write sweep_summary.csv and .png into sweep_dir; return the table as markdown."""
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    header, rows = table_rows(runs)
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    plot_sweep(runs, varied_keys(runs), sweep_dir / "sweep_summary.png")
    return markdown_table(header, rows)


class SweepSummaryCallback(Callback):
    """Hydra callback (configs/config.yaml): the summary at the end of every multirun."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            print(summarize(sweep_dir))
            print(f"summary: {sweep_dir / 'sweep_summary.csv'}, {sweep_dir / 'sweep_summary.png'}")
        except FileNotFoundError as e:  # every job failed before writing its config
            log.warning("no sweep summary: %s", e)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bitnet-train sweep-summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.sweep_dir))
    except FileNotFoundError as e:  # a path without runs: the user's, so one line
        raise SystemExit(f"bitnet-train sweep-summary: {e}") from None
    print(f"summary: {args.sweep_dir / 'sweep_summary.csv'}, {args.sweep_dir / 'sweep_summary.png'}")
