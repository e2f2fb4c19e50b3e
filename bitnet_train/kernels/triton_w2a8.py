"""W2A8 prefill GEMM in Triton: int8 activations x packed ternary weights -> exact int32.

The contract of `bitnet_train.kernels.cuda.ternary_matmul_int` (docs/formats.md layout, K padded
to a multiple of 128, activations zero past the real K), written for Hopper's int8 `wgmma`, which
the hand-written CUDA GEMM (`mma.sync`, 0.55-0.62x cuBLAS bf16 at M = 512) does not use:

- In the packed layout, the 32 bytes of a 128-input block hold, in crumb s of byte j, input
  32s + j: each crumb plane is 32 *consecutive* inputs. So a [BLOCK_N, 32]-byte tile unpacks, by
  shift, mask and minus one, into four int8 [BLOCK_N, 32] code tiles, each one k = 32 int8 MMA
  step against the matching 32 activation columns. Weights cross memory at 2 bits per value.
- The product is computed transposed, acc[n, m] = codes[n, :] . a[m, :] ("swap AB"): the unpacked
  codes come out of registers as the MMA's A operand (which may live in registers; B must be in
  shared memory), and the token count M is the MMA's N dimension, which can be as small as 8 or
  16, so M = 16 does not pad to a 64-row tile.
- Split-K for small M: SPLIT_K programs share an output tile over slices of K and add their int32
  sums atomically. Integer addition is exact and commutative, so the result does not depend on
  the order.

Tested on the CPU in Triton's interpreter (tests/test_triton_w2a8.py) and compiled for sm_90 by
kernels/triton_compile_check.py; timed against cuBLAS by bench/cuda_kernels.py (`--triton`).
"""
import torch
import triton
import triton.language as tl

from .triton_support import interpreting


@triton.jit
def _w2a8_kernel(a_ptr, w_ptr, y_ptr, M, N, KPAD,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_N: tl.constexpr):
    """y (M, N) int32 = a (M, KPAD) int8 @ codes(w (N, KPAD / 4) uint8)^T."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    # Grouped order: GROUP_N weight tiles share each activation tile while it is in L2.
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_n = (pid // (GROUP_N * grid_m)) * GROUP_N
    group_n = min(grid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * grid_m)) % group_n
    pid_m = (pid % (GROUP_N * grid_m)) // group_n
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, 32)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * (KPAD // 4) + j[None, :]
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * KPAD + j[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    blocks = KPAD // 128
    for b in range(pid_k, blocks, SPLIT_K):
        packed = tl.load(w_rows + b * 32, mask=rn[:, None] < N, other=0)
        for s in tl.static_range(4):
            codes = ((packed >> (2 * s)) & 3).to(tl.int8) - 1
            a = tl.load(a_rows + (b * 128 + 32 * s), mask=rm[:, None] < M, other=0)
            acc = tl.dot(codes, tl.trans(a), acc, out_dtype=tl.int32)
    y = y_ptr + rm.to(tl.int64)[None, :] * N + rn[:, None]
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    if SPLIT_K == 1:
        tl.store(y, acc, mask=mask)
    else:
        tl.atomic_add(y, acc, mask=mask)


def _gpu_configs() -> list[triton.Config]:
    # (BLOCK_M: tokens, BLOCK_N: weight rows, SPLIT_K, warps, stages): the swapped MMA's N = BLOCK_M.
    tiles = [(16, 64, 4, 4, 4), (16, 128, 2, 4, 4), (16, 128, 1, 4, 4), (32, 128, 2, 4, 4),
             (64, 128, 1, 4, 4), (128, 128, 1, 8, 3), (256, 128, 1, 8, 3), (128, 64, 1, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "SPLIT_K": k, "GROUP_N": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in tiles]


if interpreting():
    _w2a8 = _w2a8_kernel
    _INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "SPLIT_K": 2, "GROUP_N": 2}
else:  # the split-K tiles add into y, so the autotuner zeroes it before each trial
    _w2a8 = triton.autotune(configs=_gpu_configs(), key=["M", "N", "KPAD"], reset_to_zero=["y_ptr"])(_w2a8_kernel)
    _INTERPRETER_TILE = {}


def ternary_matmul_int(a_int8: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Exact int32 (M, N) = a_int8 (M, Kpad) @ codes^T, qweight uint8 (N, Kpad / 4) packed."""
    if a_int8.dtype != torch.int8 or a_int8.dim() != 2 or a_int8.shape[1] % 128:
        raise ValueError(f"a_int8 must be int8 (M, Kpad) with Kpad a multiple of 128, got "
                         f"{a_int8.dtype} {tuple(a_int8.shape)}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 4 != a_int8.shape[1]:
        raise ValueError(f"qweight must be uint8 (N, {a_int8.shape[1] // 4}) for Kpad={a_int8.shape[1]}, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    a, w = a_int8.contiguous(), qweight.contiguous()
    (m, kpad), n = a.shape, w.shape[0]
    y = torch.zeros((m, n), dtype=torch.int32, device=a.device)  # split-K tiles add into it

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    _w2a8[grid](a, w, y, m, n, kpad, **_INTERPRETER_TILE)
    return y
