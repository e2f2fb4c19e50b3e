"""Where metrics go: a JSONL file (the source of truth, and of the plots), wandb, the console."""
import json
import logging
import os
from pathlib import Path

from .config import LoggingConfig, WandbMode

log = logging.getLogger(__name__)


def wandb_mode(setting: WandbMode) -> str:
    if setting == WandbMode.auto:
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return WandbMode(setting).value


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
        kept = [json.dumps(r) + "\n" for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

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
    """All complete records; a kill mid-write can leave a partial last line, which is dropped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: dropping an incomplete line (the run was interrupted while writing it)", path)
    return records
