"""Loss functions. Each returns a sum over its units and the unit count (see trainer.py)."""
import torch
import torch.nn.functional as F

IGNORE = -100


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labels != -100, and how many tokens that is."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())
