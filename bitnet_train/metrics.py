"""Where metrics go: a JSONL file (the source of truth, and of the plots), wandb, the console."""
import json
import logging
import os
from pathlib import Path

from .config import LoggingConfig

log = logging.getLogger(__name__)


def wandb_mode(setting: str) -> str:
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if setting not in ("online", "offline", "disabled"):
        raise ValueError(f"logging.wandb={setting!r}; use auto, online, offline or disabled")
    return setting


class MetricsLogger:
    """Appends one JSON object per record; on resume, drops records past the resumed step so
    the file (and the plot) show one continuous curve."""

    def __init__(self, path: Path, cfg: LoggingConfig, run_name: str, config: dict, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(cfg.wandb)
        if mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.project,
                group=cfg.group,
                name=run_name,
                dir=str(self.path.parent),
                mode=mode,
                config=config,
                reinit="finish_previous",
            )

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
