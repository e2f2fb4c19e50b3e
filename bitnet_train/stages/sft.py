"""Supervised fine-tuning on chat data: next-token loss on the assistant's tokens only.

Conversations (a `messages` list per example) are rendered with the tokenizer's chat template,
the 2B4T one for the built-in tokenizer. Labels keep the assistant's tokens, each reply with its
closing <|eot_id|>; system and user turns, template text and padding are masked out.

Reduction (loss_reduction; the 2B4T report's choice, section 3.2, is `sum`):
  sum:  the update for one global batch is the gradient of
            L = sum over every assistant token t of the global batch of -log p(t | tokens before t),
        with no division at all: not by tokens, sequences, micro-batches or ranks. Twice the
        assistant tokens give twice the gradient, so the LR is tuned for a batch size.
  mean: the same sum divided by the number of assistant tokens in the global batch.
The token count is taken over the whole global batch before the forward (trainer.py), so both
are exactly invariant to how the batch is split into micro-batches and data-parallel ranks.
Gradient clipping (optim.grad_clip) applies to the gradient of L as defined here; with `sum` it
is much larger than with `mean`, so the clip bounds more steps.

Sequences longer than data.seq_len are cut; one with no assistant token left is dropped and
counted. Batches are padded, not packed.
"""
import torch

from ..config import StageConfig
from ..data.chat import chat_splits, collate, encode_conversations, require_assistant_mask
from ..data.sources import require_seq_len_fits
from ..losses import IGNORE
from .base import LossOutput


class SFTStage:
    kind = "sft"
    token_loss = True

    def __init__(self, cfg: StageConfig, tokenizer, seed: int, max_seq_len: int):
        require_seq_len_fits("sft", cfg.data.seq_len, max_seq_len)
        require_assistant_mask(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.examples = {
            split: encode_conversations(tokenizer, ds["messages"], cfg.data.seq_len, f"sft {split}")
            for split, ds in chat_splits(cfg.data, seed).items()
        }
        self.train_size = len(self.examples["train"])
        self.eval_size = len(self.examples["validation"])

    def batch(self, split: str, indices: torch.Tensor) -> dict:
        return collate([self.examples[split][i] for i in indices.tolist()], self.pad_id)

    def units(self, batch: dict) -> float:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model, batch: dict) -> LossOutput:
        device = next(model.parameters()).device
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        return LossOutput(model(ids, labels=labels, loss_reduction="sum").loss, self.units(batch))
