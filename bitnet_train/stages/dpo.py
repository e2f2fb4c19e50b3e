"""Direct preference optimisation (sigmoid loss) against a frozen copy of the starting model.

2B4T report section 3.3: beta 0.1, LR 2e-7, 2 epochs, the reference being the SFT model. The
reference is a copy of the weights this stage starts from, taken before any resume, frozen
(no gradients, eval mode) and never handed to the optimizer. Policy and reference are the same
class, so both run with ternary fake-quantized weights and int8 activations.

A unit is a preference pair: with loss_reduction=mean (the default here, as in TRL) the update is
the gradient of the mean pair loss over the global batch. Chosen and rejected replies of a
micro-batch go through the model as one batch; only the reply's tokens count in the log-probs.

rpo_alpha > 0 adds alpha times the NLL of the chosen reply (per token) to each pair's loss: RPO
(Pang et al. 2024, "Iterative Reasoning Preference Optimization"), since the sigmoid loss only
sees the gap between chosen and rejected and can lower both. The formulas, TRL's equivalent and
the quickstart's measurements behind its beta, LR and alpha: docs/dpo.md.
"""
import copy

import torch

from ..config import StageConfig
from ..data.chat import collate, encode_pairs, preference_splits, require_assistant_mask
from ..data.sources import require_seq_len_fits
from ..losses import IGNORE, dpo_sigmoid_loss, sequence_logps
from .base import LossOutput


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def chosen_nll(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term summed over pairs: each chosen reply's NLL per token."""
    return -(policy_chosen / chosen_lengths).sum()


def reply_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Tokens each sequence's log-prob sums over (labels != IGNORE after the next-token shift)."""
    return (labels[:, 1:] != IGNORE).sum(dim=1)


class DPOStage:
    kind = "dpo"
    token_loss = False

    def __init__(self, cfg: StageConfig, tokenizer, seed: int, max_seq_len: int):
        require_seq_len_fits("dpo", cfg.data.seq_len, max_seq_len)
        require_assistant_mask(tokenizer)
        self.beta = cfg.beta
        self.rpo_alpha = cfg.rpo_alpha
        self.pad_id = tokenizer.pad_token_id
        self.pairs = {}
        for split, ds in preference_splits(cfg.data, seed).items():
            triples = zip(ds["prompt"], ds["chosen"], ds["rejected"])
            self.pairs[split] = encode_pairs(tokenizer, triples, cfg.data.seq_len, f"dpo {split}")
        self.train_size = len(self.pairs["train"])
        self.eval_size = len(self.pairs["validation"])
        self.reference = None

    def bind_model(self, model: torch.nn.Module) -> None:
        self.reference = frozen_copy(model)

    def batch(self, split: str, indices: torch.Tensor) -> dict:
        pairs = [self.pairs[split][i] for i in indices.tolist()]
        return collate([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id)  # chosen first, then rejected

    def units(self, batch: dict) -> float:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model, batch: dict) -> LossOutput:
        if self.reference is None:
            raise RuntimeError("DPOStage.loss called before bind_model(): the reference model is missing")
        device = next(model.parameters()).device
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        policy_chosen, policy_rejected = sequence_logps(model(ids).logits, labels).chunk(2)
        with torch.no_grad():
            ref_chosen, ref_rejected = sequence_logps(self.reference(ids).logits, labels).chunk(2)
        loss_sum, metrics = dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta)
        if self.rpo_alpha:
            nll = chosen_nll(policy_chosen, reply_lengths(labels[: len(policy_chosen)]))
            loss_sum = loss_sum + self.rpo_alpha * nll
            metrics["nll/chosen"] = nll.detach()
        return LossOutput(loss_sum, len(policy_chosen), metrics)
