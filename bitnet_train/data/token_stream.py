"""Pretraining on a document stream (data.streaming=true): blocks are packed as the stream is
read, and the position in the stream is saved in every checkpoint.

For a corpus too large to download or cache whole, the train split is a `datasets`
IterableDataset read in its own order. Rows are read CHUNK_ROWS at a time, tokenized with one
batch encoding call, framed <bos> doc <eos> as in the token cache, and the global batch of each
optimizer step is the next global_batch x seq_len tokens of that framed stream. Rank r of w keeps
every w-th micro-batch of it, as BatchStream does (data/stream.py), so the global batch does not
depend on the rank count. Where a micro-batch starts in the stream depends on the length of every
document before it, so every rank reads every row; the tokenizing, the costly part, is shared:
rank r encodes every w-th text of a chunk and the ranks exchange their ids (`shared_encoder`).

The position is the `datasets` state (shard, example within it: IterableDataset.state_dict)
taken before the first chunk whose tokens are not all consumed, the usable documents before
that chunk (the held-out rule counts them) and the tokens of it already consumed. Resuming loads
the state, tokenizes that one chunk again and drops the consumed tokens: the same tokens follow,
in the same blocks, as in a run that was never stopped. When the stream ends, the next epoch
starts it again (IterableDataset.set_epoch).
"""
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError
from .sources import DataError
from .stream import require_same_global_batch
from .token_blocks import frame_documents

CHUNK_ROWS = 1024  # rows per batch encoding call; a resume tokenizes at most this many again
JUDGED_AFTER_ROWS = 1000  # the share of rows without text is judged on at least this many (or an epoch)


@dataclass
class Chunk:
    epoch: int
    dataset_state: dict | None  # the stream's state before the chunk's first row; None: the epoch's start
    documents: int  # usable documents of this epoch before the chunk
    tokens: np.ndarray  # the chunk's framed training documents


def shared_encoder(encode: Callable[[list[str]], list[list[int]]], rank: int, world: int):
    """`encode` split over the ranks of the default process group: each encodes every world-th
    text and all receive every text's ids, in order. Every rank must call it with the same texts,
    as FramedStream's ranks do: they read the same rows and take the same tokens at each step."""
    def encode_share(texts: list[str]) -> list[np.ndarray]:
        share = [np.asarray(ids, dtype=np.int64) for ids in encode(texts[rank::world])]  # pickled compactly
        shares = [None] * world
        dist.all_gather_object(shares, share)
        ids = [None] * len(texts)
        for r, got in enumerate(shares):
            ids[r::world] = got
        return ids

    return encode_share


class FramedStream:
    """The framed token stream of a document stream's training documents, read on demand."""

    def __init__(self, dataset, text_field: str, encode: Callable[[list[str]], list[list[int]]], bos: int, eos: int,
                 is_train: Callable[[int], bool], max_bad_fraction: float):
        self.dataset = dataset
        self.field = text_field
        self.encode = encode
        self.bos, self.eos = bos, eos
        self.is_train = is_train  # by the document's index in the epoch: the held-out rule
        self.max_bad_fraction = max_bad_fraction
        self.dtype = np.int64
        self.epoch = 0
        self.documents = 0  # usable documents of this epoch read so far
        self.chunks: deque[Chunk] = deque()
        self.offset = 0  # tokens of chunks[0] already consumed
        self.rows = Counter()  # rows read since this process started, and those skipped
        self._rows = None  # the live iterator over the dataset
        self._start_state, self._fresh = None, True

    def take(self, n: int) -> np.ndarray:
        """The next n tokens of the framed stream."""
        parts, need = [], n
        while need:
            if not self.chunks:
                self.chunks.append(self.read_chunk())
                continue
            head = self.chunks[0].tokens
            part = head[self.offset : self.offset + need]
            parts.append(part)
            need -= len(part)
            self.offset += len(part)
            if self.offset == len(head):
                self.chunks.popleft()
                self.offset = 0
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def read_chunk(self) -> Chunk:
        """The next CHUNK_ROWS rows (fewer at the stream's end): a chunk starts at the same row
        whatever happened before, so a resumed run cuts the same chunks."""
        if self._rows is None:
            self.start(self.epoch, None)
        # Until the iterator has yielded, the dataset reports the previous iteration's state.
        state = self._start_state if self._fresh else self.dataset.state_dict()
        epoch, first, texts, ended = self.epoch, self.documents, [], False
        for _ in range(CHUNK_ROWS):
            row = next(self._rows, None)
            if row is None:
                ended = True
                break
            self._fresh = False
            self.rows["read"] += 1
            text = row.get(self.field)
            if not (isinstance(text, str) and text.strip()):
                self.rows["skipped"] += 1
                continue
            if self.is_train(self.documents):
                texts.append(text)
            self.documents += 1
        self.check_skipped(ended)
        tokens = frame_documents(self.encode(texts) if texts else [], self.bos, self.eos, self.dtype)
        if ended:
            if self.documents == 0:
                raise DataError("the data stream holds no usable documents (non-empty text in data.text_field)")
            self.epoch, self.documents, self._rows = self.epoch + 1, 0, None
        return Chunk(epoch, state, first, tokens)

    def start(self, epoch: int, dataset_state: dict | None) -> None:
        """Iterate from `dataset_state` of `epoch` (None: from the epoch's first row)."""
        self.dataset.set_epoch(epoch)
        self.dataset.load_state_dict(dataset_state)
        self._rows, self._start_state, self._fresh = iter(self.dataset), dataset_state, True

    def check_skipped(self, ended: bool) -> None:
        """Rows without text: past data.max_bad_row_fraction of the rows read, stop naming it."""
        read, bad = self.rows["read"], self.rows["skipped"]
        if bad and (ended or read >= JUDGED_AFTER_ROWS) and bad / read > self.max_bad_fraction:
            raise DataError(
                f"{bad} of {read} rows of the data stream ({bad / read:.1%}) lack a non-empty text field "
                f"{self.field!r}: above data.max_bad_row_fraction={self.max_bad_fraction}; fix data.text_field or "
                "raise the threshold"
            )

    def state_dict(self) -> dict:
        """JSON: where the unconsumed tokens start."""
        if self.chunks:
            head = self.chunks[0]
            return {"epoch": head.epoch, "dataset": head.dataset_state, "documents": head.documents,
                    "offset": self.offset}
        state = None if self._rows is None else self._start_state if self._fresh else self.dataset.state_dict()
        return {"epoch": self.epoch, "dataset": state, "documents": self.documents, "offset": 0}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.documents, self.offset = state["epoch"], state["documents"], 0
        self.chunks.clear()
        self.start(self.epoch, state["dataset"])
        self.take(state["offset"])  # the head chunk tokenized again, its consumed tokens dropped


class StreamedBatches:
    """BatchStream's interface (data/stream.py) over a FramedStream: each step's global batch is the
    stream's next global_batch blocks, and the indices handed out select from them (__getitem__)."""

    def __init__(self, tokens: FramedStream, seq_len: int, micro_batch: int, grad_accum: int, world: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro, self.accum, self.world = micro_batch, grad_accum, world
        self.global_batch = micro_batch * grad_accum * world
        self.current = torch.zeros(0, seq_len, dtype=torch.int64)

    @property
    def steps_per_epoch(self) -> int:
        raise ConfigError("a data stream has no known length: set max_steps")

    def next_step(self, rank: int) -> list[torch.Tensor]:
        """Indices (into this step's blocks) of this rank's micro-batches for the next step."""
        stream = self.tokens.take(self.global_batch * self.seq_len)
        self.current = torch.from_numpy(stream).view(self.global_batch, self.seq_len)
        micro = torch.arange(self.global_batch).view(self.accum * self.world, self.micro)
        return [micro[i] for i in range(rank, len(micro), self.world)]

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        return self.current[indices]

    def state_dict(self) -> dict:
        return {**self.tokens.state_dict(), "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        require_same_global_batch(state.pop("global_batch"), self)
        self.tokens.load_state_dict(state)
