"""Perplexity of the engine on a text dataset, packed the way pretraining packs its data
(data/token_blocks.py: <bos> doc <eos> ... cut into seq_len blocks), so on the built-in validation split
it is directly comparable with the training run's val/ppl."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.builtin_text import builtin_documents, split_every_nth
from ..data.token_blocks import pack_documents
from ..losses import next_token_loss_sum
from .model import Engine

BUILTIN = "builtin"
BUILTIN_VALIDATION_FRACTION = 0.05  # config.DataConfig.validation_fraction's default


@dataclass(frozen=True)
class Perplexity:
    nll_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def read_documents(source: str | Path) -> list[str]:
    """`builtin` (the built-in corpus's validation split), a .txt file (one document) or a .jsonl
    file of {"text": ...} rows."""
    if str(source) == BUILTIN:
        return split_every_nth(builtin_documents(), BUILTIN_VALIDATION_FRACTION)[1]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"perplexity data {path} not found; pass a .txt or .jsonl file, or 'builtin'")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{n}: each JSONL row needs a string field 'text'")
                docs.append(row["text"])
        return docs
    return [path.read_text()]


def token_blocks(tokenizer, documents: list[str], seq_len: int) -> torch.Tensor:
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    return pack_documents(ids, seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)


def perplexity(engine: Engine, blocks: torch.Tensor, batch_size: int = 8) -> Perplexity:
    """Mean next-token NLL over (N, seq_len) blocks, each scored as one sequence from position 0."""
    nll, tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size]
        loss_sum, n = next_token_loss_sum(engine.forward(ids).cpu(), ids)
        nll, tokens = nll + float(loss_sum), tokens + n
    return Perplexity(nll, tokens)
