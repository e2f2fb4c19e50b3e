"""A pure-torch CPU mirror of kernels/cuda/w2a8.cu: the kernels' integer algorithm, step by step.

Each function below follows one CUDA kernel with the same tiling and the same index arithmetic:
which lane reads which 16-byte chunk, the shift each lane applies in which order, how the int8
mma fragments are laid out, where the sum(a) correction is subtracted. It exists so the index
logic of the kernels is tested on machines without a GPU (tests/test_cuda_kernels.py compares it
with an independent int64 matmul of the unpacked codes), and so a GPU test that disagrees can be
bisected against a readable model of what the kernel was meant to do.

The packed layout is docs/formats.md via bitnet_train.ternary_layout; the quantizer's contract is
bitnet_train.quant. Registers are modelled as int32 words (CUDA's are uint32: after the
0x03030303 mask the two agree, since no kept bit comes from the sign extension).
"""
import torch

from bitnet_train import quant
from bitnet_train.ternary_layout import BLOCK_BYTES, BLOCK_VALUES, packed_row_bytes, padded_features

CODE_MASK = 0x03030303  # the low two bits of each byte of a word
WARP = 32

# w2a8.cu constants
GEMV_K_TILE = 8192  # activation bytes staged in shared memory per pass
GEMV_CHUNK_BYTES = 16  # one 16-byte load of packed weights = 64 codes
GEMV_MAX_TOKENS = 4  # bitnet_train.kernels.cuda: the GEMV serves M <= 4, the GEMM larger M
GEMM_BM, GEMM_BN, GEMM_BK = 64, 128, BLOCK_VALUES  # block tile; K step = one packed block
GEMM_WARPS_M, GEMM_WARPS_N = 2, 4  # warp grid; a warp owns 32x32 outputs = 2x4 mma tiles
MMA_M, MMA_N, MMA_K = 16, 8, 32


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation kernel: (M, K) float -> int8 (M, Kpad), scale (M,), row_sum int32 (M,).

    Per row: s = rcp(max(max|x|, eps)) * 127 as two float32 roundings (torch computes quant.py's
    `127.0 / t` as `t.reciprocal() * 127.0`), q = clamp(rint(x * s)) with round half to even,
    zero padding to Kpad, and sum(q), the correction the products subtract.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    m, k = x.shape
    amax = x.abs().amax(dim=1).clamp(min=quant.EPS)
    s = torch.reciprocal(amax) * 127.0
    q = torch.round(x * s[:, None]).clamp(quant.INT8_MIN, quant.INT8_MAX).to(torch.int8)
    q = torch.nn.functional.pad(q, (0, padded_features(k) - k))
    return q, s, q.sum(dim=1, dtype=torch.int32)


def _words(bytes_: torch.Tensor) -> torch.Tensor:
    """Little-endian 32-bit words of a byte tensor whose last dim is a multiple of 4."""
    return bytes_.contiguous().view(torch.int32)


def _bytes_of(words: torch.Tensor) -> torch.Tensor:
    """The four bytes (as int32, unsigned) of each word: (..., W) -> (..., W, 4)."""
    return words.contiguous().view(torch.uint8).view(*words.shape, 4).to(torch.int32)


def _check(q: torch.Tensor, qweight: torch.Tensor) -> None:
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] % BLOCK_VALUES:
        raise ValueError(f"activations must be int8 (M, Kpad) with Kpad % 128 == 0, got "
                         f"{q.dtype} {tuple(q.shape)}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 4 != q.shape[1]:
        raise ValueError(f"qweight must be uint8 (N, Kpad/4) = (N, {q.shape[1] // 4}), got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")


def gemv_shift(t: int, lane: torch.Tensor) -> torch.Tensor:
    """Shift index s a lane applies at step t: rotated by lane so an LDS.128 phase hits 32 banks."""
    return (t + (lane >> 1)) & 3


def gemv_act_offset(chunk: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Byte offset in the staged activation tile of the 16 activations that chunk meets at shift s."""
    return (chunk >> 1) * 128 + (chunk & 1) * 16 + 32 * s


def gemv_dot(q: torch.Tensor, row_sum: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """w2a8_gemv_kernel's int32 result dot(t, a) (M, N), lane by lane.

    Lane l owns 16-byte chunks c = l, l + 32, ... of every packed row; chunk c covers block c/2,
    bytes 16(c&1)..+15, and at shift s meets the activations 128(c/2) + 32s + 16(c&1) + 0..15.
    Per-lane int32 sums are then combined by the warp's xor-shuffle butterfly.
    """
    _check(q, qweight)
    m, kpad = q.shape
    n = qweight.shape[0]
    acc = torch.zeros(m, n, WARP, dtype=torch.int32)
    for k0 in range(0, kpad, GEMV_K_TILE):
        kt = min(GEMV_K_TILE, kpad - k0)
        act = q[:, k0:k0 + kt].to(torch.int32)  # the shared-memory tile
        chunks = kt // (4 * GEMV_CHUNK_BYTES)  # 4 codes per byte
        c = torch.arange(chunks)
        lane = c % WARP  # chunks per tile are a multiple of 32, so this is also the global lane
        w = _words(qweight[:, k0 // 4:k0 // 4 + kt // 4]).view(n, chunks, 4)  # one uint4 per chunk
        for t in range(4):
            s = gemv_shift(t, lane)
            shift = (2 * s).to(torch.int32)[None, :, None]
            codes = _bytes_of((w >> shift) & CODE_MASK).view(n, chunks, GEMV_CHUNK_BYTES)
            a = act[:, gemv_act_offset(c, s)[:, None] + torch.arange(GEMV_CHUNK_BYTES)]
            # Four dp4a per (row, chunk): sum of 16 code x activation products into the lane.
            part = (codes[None] * a[:, None]).sum(dim=-1, dtype=torch.int32)  # (M, N, chunks)
            acc.index_add_(2, lane, part)
    for o in (16, 8, 4, 2, 1):  # __shfl_xor_sync butterfly: every lane ends with the total
        acc = acc + acc[:, :, torch.arange(WARP) ^ o]
    return acc[:, :, 0] - row_sum[:, None].to(torch.int32)


# ---- int8 mma.sync.m16n8k32 (PTX ISA, "Matrix Fragments for mma.m16n8k32", .s8) ----
_LANE = torch.arange(WARP)
_G, _I4 = _LANE >> 2, 4 * (_LANE & 3)  # groupID, 4 * threadID_in_group
_BYTE = torch.arange(4)


def mma_a_index() -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of byte b of A register r in lane l, each (32, 4 regs, 4 bytes)."""
    r = torch.arange(4)[None, :, None]
    row = _G[:, None, None] + 8 * (r & 1)
    col = _I4[:, None, None] + 16 * (r >> 1) + _BYTE
    return row.expand(WARP, 4, 4), col.expand(WARP, 4, 4)


def mma_b_index() -> tuple[torch.Tensor, torch.Tensor]:
    """(k, n) of byte b of B register r in lane l, each (32, 2 regs, 4 bytes)."""
    r = torch.arange(2)[None, :, None]
    k = _I4[:, None, None] + 16 * r + _BYTE
    n = _G[:, None, None].expand(WARP, 2, 4)
    return k.expand(WARP, 2, 4), n


def mma_c_index() -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of accumulator register e in lane l, each (32, 4)."""
    e = torch.arange(4)[None, :]
    return _G[:, None] + 8 * (e >> 1), 2 * (_LANE[:, None] & 3) + (e & 1)


def mma_m16n8k32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One warp-wide int8 mma for T x U tile pairs, on fragments as registers hold them.

    a: (T, 32, 4, 4) A register bytes (signed), b: (U, 32, 2, 4) B register bytes, c: (T, U, 32, 4)
    accumulators. The fragments are placed into 16x32 and 32x8 matrices by the PTX layout, so a
    kernel that loads the wrong bytes into a register gets a wrong product here too.
    """
    ar, ac = mma_a_index()
    amat = torch.zeros(a.shape[0], MMA_M, MMA_K, dtype=torch.int64)
    amat[:, ar, ac] = a.to(torch.int64)
    bk, bn = mma_b_index()
    bmat = torch.zeros(b.shape[0], MMA_K, MMA_N, dtype=torch.int64)
    bmat[:, bk, bn] = b.to(torch.int64)
    d = torch.einsum("tmk,ukn->tumn", amat, bmat)  # (T, U, 16, 8)
    cr, cc = mma_c_index()
    return c + d[:, :, cr, cc].to(torch.int32)


# The kernel's A fragment load, ldmatrix.x4, modelled independently of the mma layout above:
# lane l supplies the address of tile row l%16, byte 16*(l/16); matrix j (an 8x8 b16 = 8 rows of
# 16 int8) is made of the rows addressed by lanes 8j..8j+7, and register j of lane l holds bytes
# 4(l%4)..4(l%4)+3 of that matrix's row l/4. Tables: (32 lanes, 4 registers, 4 bytes).
LDSM_ROW, LDSM_COL = _LANE & 15, 16 * (_LANE >> 4)
_SRC_LANE = 8 * torch.arange(4)[None, :] + _G[:, None]  # (32, 4): who addressed my register j
GEMM_A_ROW = LDSM_ROW[_SRC_LANE][:, :, None].expand(WARP, 4, 4)
GEMM_A_COL = LDSM_COL[_SRC_LANE][:, :, None] + _I4[:, None, None] + _BYTE
GEMM_A_STRIDE = GEMM_BK + 16  # shared-memory row strides, padded against bank conflicts
GEMM_B_STRIDE = GEMM_BK // 4 + 16


def gemm_smem_offsets() -> tuple[torch.Tensor, torch.Tensor]:
    """Byte offsets of a warp's shared-memory fragment loads (k32 step 0, first tiles).

    A: the 32 ldmatrix row addresses (each a 16-byte row, served 8 per phase); B: (2, 32) the
    lo/hi 32-bit weight words of each lane for one n8 tile.
    """
    a = LDSM_ROW * GEMM_A_STRIDE + LDSM_COL
    b = _G[:, None] * GEMM_B_STRIDE + _I4[:, None] + torch.tensor([0, 16])
    return a, b.T


def gemm_dot(q: torch.Tensor, row_sum: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """w2a8_gemm_kernel's int32 result dot(t, a) (M, N), mma fragment by mma fragment.

    Tiles past M or N are zero-filled (cp.async with src-size 0). For K step kb and k32 step s,
    lane (g, i) of the warp's A fragment reads rows g, g+8 at k = 128kb + 32s + 4i (+16); its B
    fragment is packed bytes 4i..4i+3 (b0) and 16+4i..16+4i+3 (b1) of block kb of row g, shifted
    right by 2s and masked. All (warp, m16 tile) x (warp, n8 tile) pairs of the grid are
    evaluated as one batch; the tile indices come from the kernel's block/warp formulas.
    """
    _check(q, qweight)
    m, kpad = q.shape
    n = qweight.shape[0]
    grid_m, grid_n = -(-m // GEMM_BM), -(-n // GEMM_BN)
    a_pad = torch.zeros(grid_m * GEMM_BM, kpad, dtype=torch.int8)
    a_pad[:m] = q
    w_pad = torch.zeros(grid_n * GEMM_BN, kpad // 4, dtype=torch.uint8)
    w_pad[:n] = qweight

    # First row (column) of every m16 (n8) tile: m0 + 32 wm + 16 mt (n0 + 32 wn + 8 nt).
    bm, wm, mt = torch.meshgrid(torch.arange(grid_m), torch.arange(GEMM_WARPS_M), torch.arange(2),
                                indexing="ij")
    tile_row = (bm * GEMM_BM + wm * 32 + mt * MMA_M).flatten()
    bn, wn, nt = torch.meshgrid(torch.arange(grid_n), torch.arange(GEMM_WARPS_N), torch.arange(4),
                                indexing="ij")
    tile_col = (bn * GEMM_BN + wn * 32 + nt * MMA_N).flatten()

    a_row, a_col = GEMM_A_ROW, GEMM_A_COL
    acc = torch.zeros(len(tile_row), len(tile_col), WARP, 4, dtype=torch.int32)
    b_rows = tile_col[:, None, None] + _G[None, :, None]  # (U, 32, 1): weight row g of the tile
    for kb in range(kpad // GEMM_BK):
        blk = w_pad[:, kb * BLOCK_BYTES:(kb + 1) * BLOCK_BYTES]
        lo = _words(blk[b_rows, _I4[None, :, None] + _BYTE]).squeeze(-1)  # (U, 32)
        hi = _words(blk[b_rows, 16 + _I4[None, :, None] + _BYTE]).squeeze(-1)
        for s in range(4):
            a = a_pad[tile_row[:, None, None, None] + a_row, kb * GEMM_BK + 32 * s + a_col]
            b = torch.stack([(lo >> (2 * s)) & CODE_MASK, (hi >> (2 * s)) & CODE_MASK], dim=-1)
            acc = mma_m16n8k32(a, _bytes_of(b), acc)

    # Epilogue, as the kernel writes it: register 2*half + e of lane (g, i) goes to output row
    # tile_row + g + 8*half, column tile_col + 2i + e.
    half, e = torch.arange(4) >> 1, torch.arange(4) & 1
    out_row = tile_row[:, None, None, None] + (_G[:, None] + 8 * half)
    out_col = tile_col[None, :, None, None] + (_I4[:, None] // 2 + e)
    out = torch.zeros(grid_m * GEMM_BM, grid_n * GEMM_BN, dtype=torch.int32)
    out[out_row, out_col] = acc
    return out[:m, :n] - row_sum[:, None].to(torch.int32)


def scale_output(dot: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """The kernels' epilogue in float32: y = float(dot) / (s_w * s_a), each op rounded once."""
    return dot.float() / (w_scale.float().reshape(()) * a_scale.float()[:, None])


def ternary_matmul_int(q: torch.Tensor, qweight: torch.Tensor, row_sum=None) -> torch.Tensor:
    """dot(t, a) as the CUDA door computes it: the GEMV kernel for up to GEMV_MAX_TOKENS tokens,
    the GEMM otherwise."""
    if row_sum is None:
        row_sum = q.sum(dim=1, dtype=torch.int32)
    return (gemv_dot if q.shape[0] <= GEMV_MAX_TOKENS else gemm_dot)(q, row_sum, qweight)


def bitlinear(x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor,
              in_features: int) -> torch.Tensor:
    """The CUDA door's bitlinear on the CPU: quantize, integer product, scale (float32 out)."""
    if qweight.shape[1] != packed_row_bytes(in_features) or x.shape[-1] != in_features:
        raise ValueError(f"bitlinear: x (..., {x.shape[-1]}) and qweight {tuple(qweight.shape)} "
                         f"do not match in_features={in_features}")
    q, s, row_sum = quantize_activations(x)
    y = scale_output(ternary_matmul_int(q, qweight, row_sum), qscale, s)
    return y.reshape(*x.shape[:-1], qweight.shape[0])
