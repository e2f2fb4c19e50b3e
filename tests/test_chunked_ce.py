"""The chunked linear + cross-entropy (kernels/chunked_ce.py) equals lm_head + F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

from bitnet_train import losses
from bitnet_train.kernels import chunked_ce


def reference_and_chunked(dtype, autocast: bool, chunk_tokens: int):
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(3, 10, 16, generator=g).to(dtype)
    w0 = torch.randn(50, 16, generator=g) * 0.3
    labels = torch.randint(0, 50, (3, 10), generator=g)
    labels[0, 4] = labels[2, 7] = losses.IGNORE
    out = []
    for chunked in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chunked:
                loss, n = chunked_ce.next_token_loss_sum(h, w, labels, chunk_tokens)
            else:
                loss, n = losses.next_token_loss_sum(F.linear(h, w), labels)
        (loss * 0.5).backward()  # an upstream gradient other than 1
        out.append((loss, n, h.grad, w.grad))
    return out


@pytest.mark.parametrize("chunk_tokens", [1, 7, 27, 1000])  # 27 tokens: uneven chunks, one chunk
def test_float32_loss_and_gradients_match(chunk_tokens):
    (loss, n, gh, gw), (ref_loss, ref_n, ref_gh, ref_gw) = reference_and_chunked(torch.float32, False, chunk_tokens)
    assert n == ref_n == 25
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_ignored_tokens_get_no_gradient():
    (_, _, gh, _), _ = reference_and_chunked(torch.float32, False, 7)
    # h[b, t] predicts labels[b, t + 1]: labels[0, 4] and [2, 7] are ignored; the last position predicts nothing
    for b, t in [(0, 3), (2, 6), (0, 9), (1, 9), (2, 9)]:
        assert torch.count_nonzero(gh[b, t]) == 0
    assert torch.count_nonzero(gh[1, 3]) > 0


def test_autocast_matches_the_bf16_head():
    (loss, _, gh, gw), (ref_loss, _, ref_gh, ref_gw) = reference_and_chunked(torch.float32, True, 7)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)  # same bf16 logits, float32 softmax
    # the gradient of the logits is rounded to bf16 (as autocast's backward does), then multiplied
    torch.testing.assert_close(gh, ref_gh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=2e-3)
