"""Pretraining: next-token prediction on packed text."""
import torch
from datasets import DatasetDict

from ..config import StageConfig
from ..data.builtin_text import builtin_documents, split_every_nth
from ..data.token_blocks import pack_documents
from ..data.sources import keep_valid_rows, load_splits, require_seq_len_fits
from ..losses import next_token_loss_sum
from .base import LossOutput


def builtin_text(cfg: StageConfig) -> DatasetDict:
    from datasets import Dataset

    train, val = split_every_nth(builtin_documents(), cfg.data.validation_fraction)
    return DatasetDict(train=Dataset.from_dict({"text": train}), validation=Dataset.from_dict({"text": val}))


class PretrainStage:
    kind = "pretrain"
    token_loss = True

    def __init__(self, cfg: StageConfig, tokenizer, seed: int, max_seq_len: int):
        require_seq_len_fits("pretrain", cfg.data.seq_len, max_seq_len)
        field = cfg.data.text_field
        splits = load_splits(cfg.data, builtin_text(cfg))
        self.blocks = {}
        for split, ds in splits.items():
            ds = keep_valid_rows(
                ds, lambda row: isinstance(row.get(field), str) and row[field].strip() != "",
                f"a non-empty text field {field!r}", cfg.data,
            )
            ids = tokenizer(list(ds[field]), add_special_tokens=False)["input_ids"]
            self.blocks[split] = pack_documents(ids, cfg.data.seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
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
