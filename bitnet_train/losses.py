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


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of next-token log-probabilities over labels != -100: log p(reply | prompt)."""
    targets = labels[:, 1:]
    token_nll = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none"
    )
    return -token_nll.sum(dim=1)


def dpo_sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO (Rafailov et al. 2023) summed over pairs, and reward metrics summed over pairs.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), each term a sequence log-prob.

    TRL 1.x computes the same expression inside `DPOTrainer`, where our loop cannot call it;
    tests/test_dpo.py checks this one against the closed form (docs/dpo.md). The metrics are
    TRL's rewards/* ones.
    """
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
    }
    return loss.sum(), metrics


def distillation_kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over positions of T²·KL(softmax(teacher/T) || softmax(student/T)) (Hinton et al. 2015).

    T² keeps the gradient's size independent of the temperature; zero for identical logits.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student.flatten(0, -2), log_p_teacher.flatten(0, -2), log_target=True, reduction="sum")
    return temperature**2 * kl


def self_relation_logps(x: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLMv2's relation of a (B, T, D) Q, K or V projection with itself: per head,
    log softmax(x xᵀ / √d) over the positions each query may see (causal)."""
    B, T, D = x.shape
    h = x.float().view(B, T, heads, D // heads).transpose(1, 2)
    scores = h @ h.transpose(-1, -2) / (D // heads) ** 0.5
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    # A finite floor, not -inf: the KL below multiplies these by p = 0, and 0 * inf is NaN.
    return F.log_softmax(scores.masked_fill(future, torch.finfo(torch.float32).min / 2), dim=-1)


def attention_relation_kl_sum(
    student: list[torch.Tensor], teacher: list[torch.Tensor], heads: int
) -> torch.Tensor:
    """Σ over positions of KL(teacher || student) of the Q-Q, K-K and V-V self-relations of one layer
    (MiniLMv2, as BitDistill distils them), averaged over heads. Zero for identical projections."""
    total = torch.zeros((), device=student[0].device)
    for s, t in zip(student, teacher, strict=True):
        log_s, log_t = self_relation_logps(s, heads), self_relation_logps(t, heads)
        total = total + (log_t.exp() * (log_t - log_s)).sum() / heads
    return total
