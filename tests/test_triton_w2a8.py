"""The Triton W2A8 GEMM (kernels/triton_w2a8.py): exact int32 products of packed ternary weights.

Without a GPU it runs in Triton's interpreter (set before the kernels' import), with split-K 2;
with one, compiled and autotuned.
"""
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:  # before triton's first import, which reads it
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from bitnet_train.kernels import triton_w2a8  # noqa: E402
from bitnet_train.ternary_layout import pack_ternary, padded_features  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def operands(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    a = torch.zeros(m, padded_features(k), dtype=torch.int8)
    a[:, :k] = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)  # zero past K, as quantized
    return a.to(DEVICE), pack_ternary(codes).to(DEVICE), codes


@pytest.mark.parametrize("m, n, k", [(1, 16, 128), (5, 37, 200), (16, 64, 384), (33, 20, 640)])
def test_product_is_exact(m, n, k):
    a, packed, codes = operands(m, n, k)
    y = triton_w2a8.ternary_matmul_int(a, packed)
    assert y.dtype == torch.int32 and y.shape == (m, n)
    assert torch.equal(y.cpu().long(), a[:, :k].cpu().long() @ codes.long().T)


def test_extreme_values_do_not_overflow():
    # 127 * 1 * K and -128 * -1 * K over K = 1024: far inside int32, exact
    m, n, k = 4, 16, 1024
    a = torch.full((m, k), 127, dtype=torch.int8)
    a[1] = -128
    codes = torch.ones(n, k, dtype=torch.int8)
    codes[3] = -1
    y = triton_w2a8.ternary_matmul_int(a.to(DEVICE), pack_ternary(codes).to(DEVICE)).cpu()
    assert y[0, 0] == 127 * k and y[1, 3] == 128 * k and y[1, 0] == -128 * k


def test_mismatched_operands_are_refused():
    a, packed, _ = operands(2, 16, 256)
    with pytest.raises(ValueError, match="qweight must be uint8 \\(N, 64\\) for Kpad=256"):
        triton_w2a8.ternary_matmul_int(a, packed[:, :32])
    with pytest.raises(ValueError, match="Kpad a multiple of 128"):
        triton_w2a8.ternary_matmul_int(a[:, :200], packed)
