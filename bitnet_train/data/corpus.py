"""The documents of a pretraining corpus, read in order and one at a time, so that no corpus is
ever held in memory: the built-in text, local files, or a hub dataset.

Local files: a .txt file is one document; .jsonl rows carry data.text_field and are read here
line by line, so that a row of undecodable bytes or broken JSON is skipped and counted instead
of stopping the run; .json and .parquet go through `datasets` streaming. Skipped rows are
counted by reason and judged by sources.report_skipped_rows (data.max_bad_row_fraction).

`fingerprint` names the content, so a token cache is never served for other data: a hash of
the files' bytes (memoized by path, size and modification time, so that a second run does not
read a large corpus again), of the built-in text, or the `datasets` fingerprint of a hub split.

With data.streaming=true only the validation split is cached (`streamed_validation`); training
reads the stream itself (`open_stream`, data/token_stream.py).
"""
import hashlib
import itertools
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from .builtin_text import builtin_documents, held_out_every
from .sources import DataError, check_files, load_files, load_hub, named_split

UNDECODABLE = "hold bytes that are not UTF-8"
NOT_AN_OBJECT = "are not JSON objects"

# One split's documents: called with a counter of skipped rows by reason, yields the usable texts.
Reader = Callable[[Counter], Iterator[str]]


@dataclass
class Corpus:
    description: str
    fingerprint: str
    # "train" alone: the validation split is carved out of it (every n-th document).
    splits: dict[str, Reader]


def open_corpus(cfg: DataConfig, hash_memo: Path) -> Corpus:
    if cfg.source == "builtin":
        docs = builtin_documents()
        digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()
        return Corpus("the built-in text", digest, {"train": lambda skipped: usable(docs, cfg, skipped)})
    if cfg.source == "files":
        return files_corpus(cfg, hash_memo)
    if cfg.source == "hub":
        return hub_corpus(cfg)
    raise DataError(f"unknown data.source {cfg.source!r}; use builtin, files or hub")


def usable(values: Iterable, cfg: DataConfig, skipped: Counter) -> Iterator[str]:
    """The texts that are non-empty strings; the rest counted as lacking the field."""
    for value in values:
        if isinstance(value, str) and value.strip():
            yield value
        else:
            skipped[f"lack a non-empty text field {cfg.text_field!r}"] += 1


def files_corpus(cfg: DataConfig, hash_memo: Path) -> Corpus:
    paths = check_files(cfg)
    if cfg.validation_split:
        raise DataError("data.source=files has one split; unset data.validation_split (data.validation_fraction "
                        "holds out every n-th document)")
    suffix = paths[0].suffix
    digest = hashlib.sha256(json.dumps([suffix, *(file_digest(p, hash_memo) for p in paths)]).encode()).hexdigest()

    def read(skipped: Counter) -> Iterator[str]:
        if suffix == ".txt":
            values = txt_documents(paths, skipped)
        elif suffix == ".jsonl":
            values = jsonl_values(paths, cfg.text_field, skipped)
        else:  # .json, .parquet: any layout the datasets builders accept
            values = column(load_files(cfg, streaming=True)["train"], cfg.text_field)
        return usable(values, cfg, skipped)

    description = f"{len(paths)} {suffix} file(s) ({sum(p.stat().st_size for p in paths) / 1e6:.1f} MB)"
    return Corpus(description, digest, {"train": read})


def hub_corpus(cfg: DataConfig) -> Corpus:
    names = {"train": cfg.train_split, **({"validation": cfg.validation_split} if cfg.validation_split else {})}
    raw = load_hub(cfg)
    data = {split: named_split(raw, name, f"{split}_split") for split, name in names.items()}
    digest = hashlib.sha256(json.dumps({s: ds._fingerprint for s, ds in data.items()}).encode()).hexdigest()
    return Corpus(
        f"hub dataset {cfg.name} ({cfg.subset or 'default'}: {', '.join(names.values())})",
        digest,
        {split: (lambda skipped, ds=ds: usable(column(ds, cfg.text_field), cfg, skipped))
         for split, ds in data.items()},
    )


def open_stream(cfg: DataConfig, split: str, key: str):
    """A split as a `datasets` IterableDataset (data.streaming=true): read in order, never downloaded whole."""
    if cfg.source == "hub":
        return named_split(load_hub(cfg, streaming=True), split, key)
    if cfg.source == "files":
        if cfg.validation_split:
            raise DataError("data.source=files has one split; unset data.validation_split")
        return load_files(cfg, streaming=True)["train"]
    raise DataError(f"data.streaming=true reads data.source=hub or files, not {cfg.source!r}")


def streamed_validation(cfg: DataConfig, hash_memo: Path) -> Corpus:
    """The validation split of a streamed corpus, for the token cache: the first data.max_documents
    rows of data.validation_split, or else the documents that the held-out rule takes from the
    first max_documents rows of the train stream (the stream skips them: data/token_stream.py)."""
    if not cfg.max_documents or cfg.max_documents < 1:
        raise DataError("data.streaming=true needs data.max_documents (the rows read for the validation split)")
    every = None if cfg.validation_split else held_out_every(cfg.validation_fraction)
    rows = open_stream(cfg, cfg.validation_split or cfg.train_split, "validation_split").take(cfg.max_documents)

    def read(skipped: Counter) -> Iterator[str]:
        if every is None:
            return usable(column(rows, cfg.text_field), cfg, skipped)
        # Rows without text among all these are the train stream's to judge, not a share of the held-out ones.
        return itertools.islice(usable(column(rows, cfg.text_field), cfg, Counter()), every - 1, None, every)

    content = [file_digest(p, hash_memo) for p in check_files(cfg)] if cfg.source == "files" else [cfg.name, cfg.subset]
    key = ["stream", content, cfg.train_split, cfg.validation_split, every, cfg.max_documents]
    kind = f"split {cfg.validation_split}" if cfg.validation_split else "held-out documents"
    description = f"the {kind} among the first {cfg.max_documents} rows of the {cfg.source} stream"
    return Corpus(description, hashlib.sha256(json.dumps(key).encode()).hexdigest(), {"validation": read})


def txt_documents(paths: list[Path], skipped: Counter) -> Iterator[str]:
    for path in paths:
        try:
            yield path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped[UNDECODABLE] += 1


def jsonl_values(paths: list[Path], field: str, skipped: Counter) -> Iterator[object]:
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    skipped[UNDECODABLE] += 1
                    continue
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict):
                    skipped[NOT_AN_OBJECT] += 1
                    continue
                yield row.get(field)


def column(rows, field: str) -> Iterator[object]:
    """One column of a `datasets` Dataset or IterableDataset, in batches (None where it is absent)."""
    for batch in rows.iter(batch_size=1024):
        yield from batch.get(field) or [None] * len(next(iter(batch.values())))


def file_digest(path: Path, memo_dir: Path) -> str:
    """sha256 of the file's bytes, remembered under memo_dir for as long as its size and mtime hold."""
    stat = path.stat()
    stamp = [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo = memo_dir / f"{hashlib.sha256(stamp[0].encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    try:  # a memo that cannot be written (disk full) only costs the next run a re-read
        memo_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"stamp": stamp, "sha256": digest.hexdigest()}))
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest.hexdigest()
