"""Preference metrics on held-out (chosen, rejected) pairs.

preference accuracy: share of pairs where the model gives the chosen reply the higher
    log-likelihood, log p(chosen | prompt) > log p(rejected | prompt). Defined for any model.
reward margin: DPO's implicit reward, beta * [log p/p_ref (chosen) - log p/p_ref (rejected)],
    averaged over pairs; reward accuracy is the share of pairs where it is positive. Both are
    relative to a reference model (DPO's: the model it started from), so zero for the reference.
pairs fixed / broken: pairs the model prefers correctly and the reference did not, and the
    reverse. McNemar's z = (fixed - broken) / sqrt(fixed + broken) says whether a change of
    preference accuracy on the same pairs is more than noise (|z| >= 2: about 95% confidence).
"""
import math

import torch

from ..data.chat import Encoded, collate
from ..losses import sequence_logps


@torch.no_grad()
def pair_logps(model, tokenizer, pairs: list[tuple[Encoded, Encoded]], batch_size: int = 64) -> torch.Tensor:
    """(pairs, 2) log-likelihoods of the chosen and the rejected reply."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = collate([c for c, _ in chunk] + [r for _, r in chunk], tokenizer.pad_token_id)
        logps = sequence_logps(model(batch["input_ids"].to(device)).logits, batch["labels"].to(device))
        out.append(torch.stack(logps.float().cpu().chunk(2), dim=1))
    return torch.cat(out)


def preference_metrics(logps: torch.Tensor, tasks: list[str] | None = None) -> dict[str, float]:
    """Accuracy and mean margin; with each pair's task, also the accuracy per task
    ("preference_accuracy/NAME")."""
    margin = logps[:, 0] - logps[:, 1]
    out = {"preference_accuracy": float((margin > 0).float().mean()), "logp_margin": float(margin.mean())}
    for task in sorted(set(tasks or ())):
        of_task = torch.tensor([t == task for t in tasks])
        out[f"preference_accuracy/{task}"] = float((margin[of_task] > 0).float().mean())
    return out


def reward_metrics(logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> dict[str, float]:
    rewards = beta * (logps - reference_logps)
    margin = rewards[:, 0] - rewards[:, 1]
    return {"reward_margin": float(margin.mean()), "reward_accuracy": float((margin > 0).float().mean())}


def pairs_changed(logps: torch.Tensor, reference_logps: torch.Tensor) -> dict[str, float]:
    right, was_right = logps[:, 0] > logps[:, 1], reference_logps[:, 0] > reference_logps[:, 1]
    fixed, broken = int((right & ~was_right).sum()), int((~right & was_right).sum())
    z = (fixed - broken) / math.sqrt(fixed + broken) if fixed + broken else 0.0
    return {"pairs_fixed": fixed, "pairs_broken": broken, "mcnemar_z": z}
