"""Fused BitLinear for training (Triton): int8 codes on tensor cores, the STE backward in bf16.

The same maths as quant.BitLinear's fake-quant forward (the reference), without materialising
the fake-quantized activations or weights in the compute dtype:

    forward   x  -> one pass per token row: absmax scale s_x and int8 codes q      (_quantize_rows)
              W  -> s_w = quant.weight_scale(W) (torch), then ternary int8 codes c  (_ternarize)
              y  =  (q @ c^T) / s_x / s_w: an int8 x int8 -> int32 tensor-core GEMM with the
                    dequantization in its epilogue                                  (_int8_matmul)
    backward  the straight-through estimator: dL/dx = g @ (c / s_w), dL/dW = g^T @ (q / s_x), in
              the compute dtype, with exactly the dequantized values the reference multiplies by.

The weight scale is a global reduction over W, so the forward takes two passes over the weight
(mean|W| in torch, then the codes kernel) rather than caching a scale per optimizer step: the
weight passes cost O(N*K) against the GEMM's O(M*N*K) (under 1% of a layer at M = 8192
tokens); a cache would have to follow every optimizer step, FSDP2's resharding and
checkpoint loads, and calling the reference's own `weight_scale` keeps the codes identical to it
by construction.

Saved for the backward: the int8 codes and the scales, not the dequantized tensors, so a layer
keeps 1 byte per input element for the backward instead of the reference's 2 (bf16).

Exactness (tests/test_triton_bitlinear.py): codes equal quant.quantize_int8/ternarize bit for
bit; the int32 accumulation is exact (|q c| sum <= 127 K < 2^24 for K < 132k, also exact as
float32), so the output is the exact product rounded three times: two correctly rounded float32
divisions and the cast to the output dtype. That is within one rounding of the output dtype of
the exact value, closer than the reference, which rounds q/s_x and c/s_w to bf16 before the
GEMM.
"""
import torch
import triton
import triton.language as tl

from .. import quant
from .triton_support import interpreting


@triton.jit
def _round_half_even(v):
    # Adding 1.5 * 2^23 pushes the fraction bits out of a float32, and IEEE addition rounds half
    # to even, as torch.round does; exact for |v| < 2^22, which the clamps before every call
    # guarantee (they also keep the multiply before them from being contracted into an FMA,
    # which would round differently). libdevice.rint would do, but the interpreter lacks it.
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _round_to_bf16(y):
    # float32 -> bf16 round to nearest even, done on the bits: the GPU's conversion does that,
    # but the interpreter's truncates, and the two must give the same output.
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows(x_ptr, q_ptr, s_ptr, K, stride_x, EPS: tl.constexpr, BLOCK_K: tl.constexpr):
    """One token row per program, read once: s = 127 / max|x|, q = clamp(round(x s), -128, 127)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    # torch evaluates 127 / t as reciprocal(t) * 127: two roundings, reproduced here
    s = tl.math.div_rn(1.0, tl.maximum(tl.max(tl.abs(x), axis=0), EPS)) * 127.0
    v = tl.minimum(tl.maximum(x * s, -129.0), 128.0)
    q = tl.minimum(tl.maximum(_round_half_even(v), -128.0), 127.0)
    tl.store(q_ptr + row * K + cols, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, s)


@triton.jit
def _ternarize(w_ptr, c_ptr, s_ptr, numel, BLOCK: tl.constexpr):
    """c = clamp(round(W s), -1, 1) with the precomputed absmean multiplier s (a device scalar)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.minimum(tl.maximum(w * tl.load(s_ptr), -2.0), 2.0)
    c = tl.minimum(tl.maximum(_round_half_even(v), -1.0), 1.0)
    tl.store(c_ptr + offs, c.to(tl.int8), mask=mask)


@triton.jit
def _dequantize(q_ptr, s_ptr, y_ptr, K, numel, PER_ROW: tl.constexpr, TO_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """y = q / s rounded to y's dtype: s per row of K codes, or one scalar (the backward's operands)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    s = tl.load(s_ptr + offs // K, mask=mask, other=1.0) if PER_ROW else tl.load(s_ptr)
    y = tl.math.div_rn(tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32), s)
    if TO_BF16:
        y = _round_to_bf16(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_matmul_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, y_ptr, M, N, K,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, TO_BF16: tl.constexpr):
    """y = (a @ b^T) / sa[:, None] / sb for int8 a (M, K), b (N, K), both row-major."""
    pid = tl.program_id(0)
    # Grouped launch order: GROUP_M row blocks share each column block while it is in L2.
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_m
    pid_n = (pid % (GROUP_M * grid_n)) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * K + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=1.0)
    y = tl.math.div_rn(tl.math.div_rn(acc.to(tl.float32), sa[:, None]), tl.load(sb_ptr))
    if TO_BF16:
        y = _round_to_bf16(y)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _gpu_configs() -> list[triton.Config]:
    # int8 tensor-core tiles for the training shapes (M = thousands of tokens); BLOCK_K = 128
    # bytes per row is one 128-byte line of each operand per stage.
    tiles = [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 64, 4, 4),
             (64, 128, 128, 4, 4), (64, 64, 128, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in tiles]


# The interpreter runs one small tile (autotuning there would only multiply the test time).
if interpreting():
    _int8_matmul = _int8_matmul_kernel
    _INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}
else:
    _int8_matmul = triton.autotune(configs=_gpu_configs(), key=["M", "N", "K"])(_int8_matmul_kernel)
    _INTERPRETER_TILE = {}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (M, K) and float32 multipliers s (M,) of a 2-D x: quant.quantize_int8's values."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows[(m,)](x, q, s, k, x.stride(0), EPS=quant.EPS, BLOCK_K=block,
                         num_warps=min(16, max(1, block // 512)))
    return q, s


def ternarize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes in {-1, 0, 1} and the 0-dim float32 multiplier s: quant.ternarize's values."""
    s = quant.weight_scale(w)  # the reference's own reduction, so the codes match it exactly
    w = w.contiguous()
    c = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    block = 1024
    _ternarize[(triton.cdiv(w.numel(), block),)](w, c, s, w.numel(), BLOCK=block)
    return c, s


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q / s).to(dtype), as the reference computes it (float32 division, one rounding), without
    the float32 intermediate: s is per row of q (shape (M,)) or one 0-dim scale."""
    if dtype not in (torch.float32, torch.bfloat16):  # the interpreter cannot round to others
        return (q.float() / (s[:, None] if s.dim() else s)).to(dtype)
    y = torch.empty(q.shape, dtype=dtype, device=q.device)
    block = 1024
    _dequantize[(triton.cdiv(q.numel(), block),)](q, s, y, q.shape[-1], q.numel(), PER_ROW=s.dim() == 1,
                                                  TO_BF16=dtype == torch.bfloat16, BLOCK=block)
    return y


def int8_matmul(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """(a @ b^T) / sa[:, None] / sb in `dtype`: int8 a (M, K) and b (N, K), float32 sa (M,), sb ()."""
    (m, k), n = a.shape, b.shape[0]
    y = torch.empty((m, n), dtype=dtype, device=a.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _int8_matmul[grid](a, b, sa, sb, y, m, n, k, TO_BF16=dtype == torch.bfloat16, **_INTERPRETER_TILE)
    return y


class _FusedBitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q, sx = quantize_rows(x.reshape(-1, x.shape[-1]))
        c, sw = ternarize_weight(weight)
        y = int8_matmul(q, c, sx, sw, dtype)
        ctx.save_for_backward(q, sx, c, sw)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype, ctx.dtype = x.shape, x.dtype, weight.dtype, dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        q, sx, c, sw = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(ctx.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # quant.quantize_weight's values, as the reference multiplies by
            grad_x = (g @ dequantize(c, sw, ctx.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # quant.quantize_activation's values
            grad_w = (g.t() @ dequantize(q, sx, ctx.dtype)).to(ctx.w_dtype)
        return grad_x, grad_w, None


def bitlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """quant.BitLinear's forward at strength 1 (ternary W, int8 x, STE), fused.

    The output dtype is the autocast dtype when autocast is on (as F.linear's would be), else x's.
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        y = _FusedBitLinear.apply(x, weight, dtype)
        return y if bias is None else y + bias.to(dtype)
