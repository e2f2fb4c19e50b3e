"""The end-of-run picture: loss curves beside the LR and weight-decay schedules."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import read_jsonl  # noqa: E402


def series(records: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training(metrics_path: Path, out_png: Path, title: str = "") -> Path:
    records = read_jsonl(metrics_path)
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, style in [("train/loss", "-"), ("val/loss", "o-")]:
        x, y = series(records, key)
        if x:
            ax_loss.plot(x, y, style, label=key, markersize=4)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss (mean token cross-entropy)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    x, lr = series(records, "lr")
    ax_lr.plot(x, lr, color="tab:blue", label="learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate", color="tab:blue")
    ax_wd = ax_lr.twinx()
    x, wd = series(records, "wd")
    ax_wd.plot(x, wd, color="tab:red", label="weight decay")
    ax_wd.set_ylabel("weight decay (BitLinear weights)", color="tab:red")
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
