"""Every data source goes through the `datasets` library: hub names, local files, built-ins.

Rows that lack the expected fields are skipped and counted; past `max_bad_row_fraction` the
run stops before any compute, naming the file and the field.

`datasets` (and pandas and pyarrow under it) is imported where it is used, not at the top of
these modules: pretraining from the token cache never needs it, and it would cost every run
start-up time and about 85 MB of memory.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import DataConfig

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


log = logging.getLogger(__name__)

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad input data, with what was wrong and how to fix it."""


def load_splits(cfg: DataConfig, builtin: DatasetDict | None = None) -> DatasetDict:
    """train/validation splits for `cfg.source`; `builtin` is the stage's own built-in data."""
    from datasets import DatasetDict

    if cfg.source == "builtin":
        if builtin is None:
            raise DataError("this stage has no built-in data; set data.source=files or hub")
        return builtin
    if cfg.source == "files":
        raw = load_files(cfg)
    elif cfg.source == "hub":
        raw = load_hub(cfg)
    else:
        raise DataError(f"unknown data.source {cfg.source!r}; use builtin, files or hub")
    train = named_split(raw, cfg.train_split, "train_split")
    if cfg.validation_split:
        return DatasetDict(train=train, validation=named_split(raw, cfg.validation_split, "validation_split"))
    split = train.train_test_split(test_size=cfg.validation_fraction, seed=0, shuffle=True)
    return DatasetDict(train=split["train"], validation=split["test"])


def load_hub(cfg: DataConfig, streaming: bool = False):
    """The hub dataset's splits (IterableDatasets if streaming: nothing is downloaded whole)."""
    if not cfg.name:
        raise DataError("data.source=hub needs data.name (a datasets hub name)")
    from datasets import load_dataset

    return load_dataset(cfg.name, cfg.subset, streaming=streaming)


def named_split(raw, name: str, key: str):
    if name not in raw:
        raise DataError(f"split {name!r} not found (have {list(raw)}); set data.{key}")
    return raw[name]


def check_files(cfg: DataConfig) -> list[Path]:
    """The configured local files, each present, non-empty and of one known kind."""
    if not cfg.files:
        raise DataError("data.source=files needs data.files=[path, ...]")
    paths = [Path(p).expanduser() for p in cfg.files]
    for p in paths:
        if not p.is_file():
            raise DataError(f"data file {p} does not exist; check data.files")
        if p.stat().st_size == 0:
            raise DataError(f"data file {p} is empty; remove it from data.files")
    suffixes = {p.suffix for p in paths}
    if len(suffixes) != 1 or next(iter(suffixes)) not in FILE_BUILDERS:
        raise DataError(
            f"data.files must all have one of the suffixes {sorted(FILE_BUILDERS)}; got {sorted(suffixes)}"
        )
    return paths


def load_files(cfg: DataConfig, streaming: bool = False):
    """data.files as one split, "train" (a .txt file is one row)."""
    paths = check_files(cfg)
    builder = FILE_BUILDERS[paths[0].suffix]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    from datasets import load_dataset

    return load_dataset(builder, data_files={"train": [str(p) for p in paths]}, streaming=streaming, **kwargs)


def require_seq_len_fits(stage: str, seq_len: int, max_seq_len: int) -> None:
    """A stage's sequences must fit the model it starts from (which may come from init_from)."""
    if seq_len > max_seq_len:
        raise DataError(
            f"{stage} data.seq_len={seq_len} exceeds the model's max_position_embeddings={max_seq_len}; "
            "lower data.seq_len or raise model.max_position_embeddings"
        )


def keep_valid_rows(ds: Dataset, is_valid, what: str, cfg: DataConfig) -> Dataset:
    """Drop rows `is_valid` rejects; report how many, and fail above the configured fraction."""
    good = ds.filter(is_valid)
    report_skipped_rows({f"lack {what}": len(ds) - len(good)}, len(ds), cfg)
    if len(good) == 0:
        raise DataError(f"no usable rows: every row lacks {what}")
    return good


def report_skipped_rows(skipped: dict[str, int], total: int, cfg: DataConfig) -> None:
    """Warn about rows skipped, by reason ("lack a field"); fail above data.max_bad_row_fraction."""
    bad = sum(skipped.values())
    if not bad:
        return
    message = "; ".join(f"{n} of {total} rows ({n / max(1, total):.1%}) {why}" for why, n in skipped.items() if n)
    if bad / max(1, total) > cfg.max_bad_row_fraction:
        raise DataError(
            f"{message}: above data.max_bad_row_fraction={cfg.max_bad_row_fraction}; "
            "fix the data or raise the threshold"
        )
    log.warning("%s; skipped them", message)
