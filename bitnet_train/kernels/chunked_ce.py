"""Linear + cross-entropy over the LM head without materialising the logits in full.

For 2B4T's 128,256-token head the logits of a 16k-token micro-batch are 16k x 128k: 8 GiB in
float32, the largest tensor of the step, and its gradient again. Here the tokens go through the
head a chunk at a time: each chunk's logits, log-sum-exp, loss and the gradients of the hidden
states and the head weight are computed in the forward (as liger-kernel's fused linear
cross-entropy does), and only those gradients are kept for the backward, which just scales them.
Peak extra memory: one chunk's logits (`chunk_tokens` x vocab, float32) instead of all of them.

Numerics follow `losses.next_token_loss_sum` on `lm_head(h)`: the logits are computed in the
compute dtype (the autocast dtype when autocast is on, as F.linear's), then the log-softmax in
float32.
"""
import torch
import torch.nn.functional as F

from ..losses import IGNORE

DEFAULT_CHUNK_ELEMENTS = 2**28  # logits per chunk: 1 GiB in float32


def chunk_loss(h_c, t_c, w, grad_h_c, grad_w) -> torch.Tensor:
    """One chunk's summed loss; with grad_h_c given, also its gradients: grad_h_c filled in place,
    grad_w accumulated. A function of its own so that the chunk's buffers die when it returns,
    before the next chunk's are made: a loop body's locals would live on beside them."""
    # F.cross_entropy is exactly nll_loss(log_softmax); keeping the log-softmax lets its exp
    # become the gradient in place: two chunk-sized buffers at a time, not three.
    logp = torch.log_softmax((h_c @ w.t()).float(), dim=-1)
    loss = F.nll_loss(logp, t_c, ignore_index=IGNORE, reduction="sum")
    if grad_h_c is None:
        return loss
    # d(sum of losses)/d(logits) = softmax - one_hot(target), zero for ignored tokens
    d_logits = logp.exp_()
    valid = t_c != IGNORE
    rows = torch.arange(t_c.shape[0], device=h_c.device)
    d_logits[rows, t_c.clamp(min=0)] -= 1.0
    d_logits *= valid[:, None]
    d_logits = d_logits.to(w.dtype)
    grad_h_c.copy_(d_logits @ w)
    grad_w += (d_logits.t() @ h_c).float()
    return loss


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_tokens: int, dtype: torch.dtype, grads: bool):
        w = weight.to(dtype)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if grads else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            loss += chunk_loss(h[rows].to(dtype), targets[rows], w, grad_h[rows] if grads else None, grad_w)
        if grads:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_tokens: int | None = None) -> torch.Tensor:
    """sum over tokens of cross_entropy(h @ weight^T, targets), ignoring targets == -100.

    h: (N, d) hidden states; weight: (V, d), the LM head; targets: (N,). float32 result.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    chunk = chunk_tokens or max(1, DEFAULT_CHUNK_ELEMENTS // weight.shape[0])
    # Validation runs under no_grad: the loss alone, not the gradients a backward would need.
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropySum.apply(h, weight, targets, chunk, dtype, grads)


def next_token_loss_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """losses.next_token_loss_sum(lm_head(h), labels) from the hidden states (B, T, d)."""
    targets = labels[:, 1:].flatten()
    loss = linear_cross_entropy_sum(h[:, :-1].flatten(0, 1), weight, targets, chunk_tokens)
    return loss, int((targets != IGNORE).sum())
