"""Pretraining: next-token prediction on packed text.

The corpus is tokenized once into a memory-mapped cache (data/token_cache.py) and a batch is a
few seq_len blocks sliced from it, so memory does not grow with the corpus and every rank reads
only the blocks of its own micro-batches.
"""
import torch

from ..config import StageConfig
from ..data.corpus import open_corpus
from ..data.sources import DataError, require_seq_len_fits
from ..data.token_blocks import TokenBlocks
from ..data.token_cache import SPLITS, TokenCache, cache_root, open_token_cache
from ..losses import next_token_loss_sum
from .base import LossOutput


class PretrainStage:
    kind = "pretrain"
    token_loss = True

    def __init__(self, cfg: StageConfig, tokenizer, seed: int, max_seq_len: int):
        require_seq_len_fits("pretrain", cfg.data.seq_len, max_seq_len)
        corpus = open_corpus(cfg.data, cache_root(cfg.data) / "file_hashes")
        cache = open_token_cache(cfg.data, tokenizer, corpus)
        require_one_sequence_per_split(cache, cfg.data.seq_len, cfg.data.validation_fraction)
        self.blocks = {split: TokenBlocks(cache.tokens(split), cfg.data.seq_len) for split in SPLITS}
        self.train_size = len(self.blocks["train"])
        self.eval_size = len(self.blocks["validation"])

    def batch(self, split: str, indices: torch.Tensor) -> dict:
        return {"input_ids": self.blocks[split][indices]}

    def units(self, batch: dict) -> float:
        ids = batch["input_ids"]
        return ids.shape[0] * (ids.shape[1] - 1)

    def loss(self, model, batch: dict) -> LossOutput:
        ids = batch["input_ids"].to(next(model.parameters()).device)
        loss_sum, n = next_token_loss_sum(model(ids).logits, ids)
        return LossOutput(loss_sum, n)


def require_one_sequence_per_split(cache: TokenCache, seq_len: int, validation_fraction: float) -> None:
    """Each split must fill at least one block of seq_len tokens; say how much data that takes."""
    for split in SPLITS:
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
