"""A look at every stage's local data files before the first step of the pipeline.

Loading a stage's data (tokenizing, packing) happens when the stage starts, maybe hours after
the run did: an SFT file without `messages` must not wait for pretraining to finish to be named.
This reads only the first rows of each file, so it stays cheap on any corpus; the loaders still
check every row when they run.
"""
import json
from pathlib import Path

from ..config import DataConfig, StageKind
from .chat import is_conversation, pair_from_row
from .sources import DataError, check_files

SAMPLE_ROWS = 100


def has_text(field: str):
    """The pretraining row check: a non-empty string in the configured text field."""
    return lambda row: isinstance(row.get(field), str) and row[field].strip() != ""


def row_check(kind: StageKind, cfg: DataConfig):
    """(is_valid(row), what a valid row holds) for a stage kind."""
    if kind == StageKind.pretrain:
        return has_text(cfg.text_field), f"a non-empty text field {cfg.text_field!r} (data.text_field)"
    if kind == StageKind.sft:
        return is_conversation, "a 'messages' list with an assistant reply"
    return (lambda row: pair_from_row(row) is not None), "a preference pair (chosen/rejected, optionally a prompt)"


def _first_text(path: Path) -> str:
    """A .txt file is one document (one row); its first non-blank text decides whether it has any."""
    with open(path, errors="replace") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return chunk
    return ""


def _first_json_rows(path: Path, n: int) -> list[dict]:
    with open(path, errors="replace") as f:  # undecodable rows are the loader's to count, not a crash here
        if f.read(1) != "[":  # JSON lines (the datasets json builder reads .json files either way)
            f.seek(0)
            rows = []
            for number, line in enumerate(f, 1):
                if len(rows) == n:
                    break
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise DataError(f"data file {path}, line {number}: not JSON; fix the line or the file") from None
            return rows
        f.seek(0)
        return json.load(f)[:n]


def first_rows(path: Path, n: int = SAMPLE_ROWS) -> list[dict]:
    """The first `n` rows as the datasets builders for data.files would produce them."""
    if path.suffix == ".txt":
        return [{"text": _first_text(path)}]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return next(pq.ParquetFile(path).iter_batches(batch_size=n)).to_pylist()
    return _first_json_rows(path, n)


def check_stage_data(kind: StageKind, cfg: DataConfig, where: str) -> None:
    """Fail before compute when a stage's local files are missing or their first rows are not
    what the stage reads (above data.max_bad_row_fraction, as the loader would)."""
    if cfg.source != "files":
        return  # built-in data is generated; hub data would need a download to look at
    is_valid, what = row_check(kind, cfg)
    for path in check_files(cfg):
        rows = first_rows(path)
        if not rows:
            raise DataError(f"{where}: data file {path} holds no rows; remove it from data.files")
        bad = sum(not (isinstance(row, dict) and is_valid(row)) for row in rows)
        if bad > cfg.max_bad_row_fraction * len(rows):
            raise DataError(
                f"{where}: {bad} of the first {len(rows)} rows of {path} lack {what}, which a {kind} stage "
                "reads; point data.files at the right data (or data.source/data@... at another preset)"
            )
