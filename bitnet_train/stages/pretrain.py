"""Pretraining: next-token prediction on packed text.

The corpus is tokenized once into a memory-mapped cache (data/token_cache.py) and a batch is a
few seq_len blocks sliced from it, so memory does not grow with the corpus and every rank reads
only the blocks of its own micro-batches. With data.streaming=true the train split is instead
read as a stream and packed as it comes (data/token_stream.py), its position saved in every
checkpoint; only the validation split is cached.
"""
import torch
import torch.distributed as dist

from ..config import DataConfig, StageConfig
from ..data.builtin_text import held_out_every
from ..data.corpus import open_corpus, open_stream, streamed_validation
from ..data.sources import DataError, require_seq_len_fits
from ..data.stream import BatchStream
from ..data.token_blocks import TokenBlocks
from ..data.token_cache import SPLITS, TokenCache, batch_encoder, cache_root, open_token_cache
from ..data.token_stream import FramedStream, StreamedBatches, shared_encoder
from .base import LossOutput


class PretrainStage:
    kind = "pretrain"
    token_loss = True

    def __init__(self, cfg: StageConfig, tokenizer, seed: int, max_seq_len: int):
        data = cfg.data
        require_seq_len_fits("pretrain", data.seq_len, max_seq_len)
        hash_memo = cache_root(data) / "file_hashes"
        corpus = streamed_validation(data, hash_memo) if data.streaming else open_corpus(data, hash_memo)
        cache = open_token_cache(data, tokenizer, corpus)
        splits = ("validation",) if data.streaming else SPLITS
        require_one_sequence_per_split(cache, data.seq_len, data.validation_fraction, splits)
        self.blocks = {split: TokenBlocks(cache.tokens(split), data.seq_len) for split in splits}
        self.seq_len = data.seq_len
        self.tokens = train_stream(data, tokenizer) if data.streaming else None
        self.train_size = None if data.streaming else len(self.blocks["train"])  # a stream has no known length
        self.eval_size = len(self.blocks["validation"])

    def batch_stream(self, micro_batch: int, grad_accum: int, world: int, seed: int):
        """The order of the training blocks: shuffled over the cache, or the stream's own."""
        if self.tokens is None:
            return BatchStream(self.train_size, micro_batch, grad_accum, world, seed)
        self.blocks["train"] = StreamedBatches(self.tokens, self.seq_len, micro_batch, grad_accum, world)
        return self.blocks["train"]

    def batch(self, split: str, indices: torch.Tensor) -> dict:
        return {"input_ids": self.blocks[split][indices]}

    def units(self, batch: dict) -> float:
        ids = batch["input_ids"]
        return ids.shape[0] * (ids.shape[1] - 1)

    def loss(self, model, batch: dict) -> LossOutput:
        ids = batch["input_ids"].to(next(model.parameters()).device)
        return LossOutput(model(ids, labels=ids, loss_reduction="sum").loss, self.units(batch))


def train_stream(data: DataConfig, tokenizer) -> FramedStream:
    """The train split's documents as a stream, the held-out ones skipped unless a split is named;
    on several ranks each tokenizes its share of every chunk (data/token_stream.py)."""
    every = held_out_every(data.validation_fraction)
    is_train = (lambda i: True) if data.validation_split else (lambda i: i % every != every - 1)
    encode = batch_encoder(tokenizer)
    if dist.is_initialized() and dist.get_world_size() > 1:
        encode = shared_encoder(encode, dist.get_rank(), dist.get_world_size())
    return FramedStream(open_stream(data, data.train_split, "train_split"), data.text_field, encode,
                        tokenizer.bos_token_id, tokenizer.eos_token_id, is_train, data.max_bad_row_fraction)


def require_one_sequence_per_split(cache: TokenCache, seq_len: int, validation_fraction: float,
                                   splits=SPLITS) -> None:
    """Each split must fill at least one block of seq_len tokens; say how much data that takes."""
    for split in splits:
        docs, tokens = cache.index["splits"][split]["documents"], cache.index["splits"][split]["tokens"]
        if tokens >= seq_len:
            continue
        every = cache.index["held_out_every"]
        if split == "validation" and every and docs == 0:
            raise DataError(
                f"the validation split is empty: data.validation_fraction={validation_fraction} holds out every "
                f"{every}th document and the corpus has {cache.index['splits']['train']['documents']} usable "
                f"documents; give it at least {every} documents, raise data.validation_fraction or set "
                "data.validation_split"
            )
        raise DataError(
            f"the {split} split holds {tokens} tokens ({docs} documents, each framed <bos> ... <eos>), fewer than one "
            f"sequence of data.seq_len={seq_len}; it needs at least {seq_len} tokens: add text or lower data.seq_len"
        )
