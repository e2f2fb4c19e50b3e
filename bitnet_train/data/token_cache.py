"""A tokenized corpus on disk: tokenize once, then every run and every rank maps the same files.

Layout, one directory per (corpus content, tokenizer, split rule) under data.cache_dir
(default $BITNET_TRAIN_CACHE or ~/.cache/bitnet_train, then token_cache/):

    <key>/train.bin, <key>/validation.bin   the framed token stream (<bos> doc <eos> ...), uint16
                                            when the vocabulary fits, else uint32 (as nanoGPT's
                                            prepare scripts write them)
    <key>/index.json                        dtype, tokens and documents per split, skipped rows,
                                            the tokenizer's fingerprint, build time

A cache is written into `<key>.tmp-<pid>` and renamed into place only when complete, so a
directory named `<key>` is always whole: a crash or a full disk leaves only a tmp directory,
which the next build removes. One process per node builds (accelerate's local main process
first, and a file lock against other runs sharing the directory); the others wait and map.

Tokenization is the tokenizers library's own batch encoding (Rust threads over every core),
fed a few MB of documents at a time; the framed ids are appended to the file, so memory stays
flat however large the corpus.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate import PartialState
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ..config import DataConfig
from .builtin_text import held_out_every
from .corpus import Corpus
from .sources import DataError, report_skipped_rows
from .token_blocks import frame_documents
from .tokenizer import cache_dir

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the files' layout or framing changes: old caches then get new keys
SPLITS = ("train", "validation")
BATCH_CHARS = 4_000_000  # text per batch encoding call: enough documents to keep every core busy


@dataclass
class TokenCache:
    path: Path
    index: dict

    def tokens(self, split: str) -> np.ndarray:
        """The split's framed token stream, memory-mapped read-only."""
        n = self.index["splits"][split]["tokens"]
        if n == 0:
            return np.zeros(0, dtype=self.index["dtype"])
        return np.memmap(self.path / f"{split}.bin", dtype=self.index["dtype"], mode="r", shape=(n,))


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_dir() / "token_cache"


def open_token_cache(cfg: DataConfig, tokenizer, corpus: Corpus) -> TokenCache:
    """The cache of `corpus` under `tokenizer`: reused if present, else built by one process per node."""
    root = cache_root(cfg)
    fingerprint = tokenizer_fingerprint(tokenizer)
    given = "validation" in corpus.splits
    rule = {"validation": "given"} if given else {"held_out_every": held_out_every(cfg.validation_fraction)}
    key = hashlib.sha256(json.dumps(
        {"format": FORMAT, "corpus": corpus.fingerprint, "tokenizer": fingerprint, "text_field": cfg.text_field, **rule}
    ).encode()).hexdigest()[:24]
    state = PartialState()
    with state.local_main_process_first():
        if state.is_local_main_process:
            ensure_built(root, key, lambda tmp: build(tmp, corpus, tokenizer, fingerprint, cfg))
        cache = read(root / key, fingerprint)
    report_skipped_rows(cache.index["skipped"], cache.index["rows"], cfg)
    return cache


def ensure_built(root: Path, key: str, fill) -> None:
    """Build root/key with fill(tmp_dir) unless a whole one is there; under a lock, so that of
    several runs sharing the directory only one builds."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "index.json").is_file():
            log.info("token cache reused: %s", final)
            return
        shutil.rmtree(final, ignore_errors=True)  # only a hand-damaged cache lacks its index
        for partial in root.glob(f"{key}.tmp-*"):  # left by a build that crashed: we hold the lock
            log.warning("removing the partial token cache %s left by an interrupted build", partial)
            shutil.rmtree(partial, ignore_errors=True)
        tmp = root / f"{key}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            fill(tmp)
            os.rename(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise DataError(
                    f"the disk is full: no room to write the token cache under {root} (older caches are intact, "
                    "the partial one was removed); free space or set data.cache_dir to another disk"
                ) from e
            raise


def read(path: Path, fingerprint: str) -> TokenCache:
    index = json.loads((path / "index.json").read_text())
    if index.get("format") != FORMAT:
        raise DataError(f"token cache {path} has format {index.get('format')}, this version reads {FORMAT}; "
                        "delete it to rebuild")
    if index["tokenizer"]["fingerprint"] != fingerprint:
        raise DataError(
            f"token cache {path} was built by another tokenizer ({index['tokenizer']['name']}); "
            "delete that directory to rebuild it with this run's tokenizer"
        )
    itemsize = np.dtype(index["dtype"]).itemsize
    for split in SPLITS:
        want, have = index["splits"][split]["tokens"] * itemsize, (path / f"{split}.bin").stat().st_size
        if want != have:
            raise DataError(f"token cache {path} is damaged ({split}.bin holds {have} bytes, its index says "
                            f"{want}); delete that directory to rebuild it")
    return TokenCache(path, index)


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids: the tokenizer's full serialized definition and its bos/eos."""
    definition = backend(tokenizer).to_str() if backend(tokenizer) else repr(sorted(tokenizer.get_vocab().items()))
    framing = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256((definition + json.dumps(framing)).encode()).hexdigest()


def backend(tokenizer) -> Tokenizer | None:
    return getattr(tokenizer, "backend_tokenizer", None)


def batch_encoder(tokenizer):
    """ids of each text, no special tokens: transformers' tokenizer(texts) gives the same, with
    more per-call overhead, and that path is the one for tokenizers without a fast backend."""
    if backend(tokenizer) is None:
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    fast = Tokenizer.from_str(backend(tokenizer).to_str())  # a copy, so that we can switch off
    fast.no_truncation()  # truncation or padding a tokenizer.json may carry
    fast.no_padding()
    return lambda texts: [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]


def batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def build(tmp: Path, corpus: Corpus, tokenizer, fingerprint: str, cfg: DataConfig) -> None:
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)
    encode = batch_encoder(tokenizer)
    every = held_out_every(cfg.validation_fraction)
    counts = {split: Counter() for split in SPLITS}
    skipped: Counter = Counter()
    start = time.perf_counter()
    log.info("building the token cache of %s at %s", corpus.description, tmp.with_name(tmp.name.split(".tmp-")[0]))
    with contextlib.ExitStack() as stack:
        out = {split: stack.enter_context(open(tmp / f"{split}.bin", "wb")) for split in SPLITS}
        bar = stack.enter_context(tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=None))
        for source, read_texts in corpus.splits.items():
            for texts in batches(read_texts(skipped)):
                ids = encode(texts)
                if "validation" in corpus.splits:
                    parts = {source: ids}
                else:  # document i of the whole corpus is held out if i % every == every - 1
                    first = counts["train"]["documents"] + counts["validation"]["documents"]
                    held = [(first + i) % every == every - 1 for i in range(len(ids))]
                    parts = {"train": [x for x, h in zip(ids, held) if not h],
                             "validation": [x for x, h in zip(ids, held) if h]}
                for split, lists in parts.items():
                    stream = frame_documents(lists, tokenizer.bos_token_id, tokenizer.eos_token_id, dtype)
                    stream.tofile(out[split])
                    counts[split].update(documents=len(lists), tokens=len(stream))
                    bar.update(len(stream))
        for f in out.values():
            f.flush()
            os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    tokens = sum(c["tokens"] for c in counts.values())
    documents = sum(c["documents"] for c in counts.values())
    index = {
        "format": FORMAT,
        "dtype": dtype.name,
        "corpus": corpus.description,
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", type(tokenizer).__name__), "fingerprint": fingerprint},
        "splits": {s: {"documents": counts[s]["documents"], "tokens": counts[s]["tokens"]} for s in SPLITS},
        "held_out_every": None if "validation" in corpus.splits else every,
        "rows": documents + sum(skipped.values()),
        "skipped": dict(skipped),
        "build_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / max(seconds, 1e-9)),
    }
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    log.info("token cache built: %d tokens of %d documents in %.1f s (%.0f tokens/s)",
             tokens, documents, seconds, tokens / max(seconds, 1e-9))
