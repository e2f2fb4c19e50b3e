"""CPU inference kernels for BitNet b1.58: ternary weights x int8 activations.

The one door callers use: torch tensors in, torch tensors out. It runs the compiled kernels
(bitnet_train._cpu_kernels, built from kernels/cpu by `pip install`) and falls back, after one
warning, to the pure-torch reference below when the extension was not built; on a CPU without
AVX2 the extension runs its portable scalar path. The reference is also what tests/test_cpu_kernels.py holds the kernels to.

Shapes: x (M, K) float; a (M, Kpad) int8 with Kpad = ceil(K / 128) * 128 (zero padded);
qweight (N, Kpad / 4) uint8 in the docs/formats.md layout; qscale the weight multiplier s_w
(W_q = t / s_w), a float, a one-element tensor or one per output row (N,).
"""
import math
import warnings

import torch
import torch.nn.functional as F

from bitnet_train import quant, ternary_layout

try:
    from bitnet_train import _cpu_kernels as _ext

    _EXT_ERROR = None
except ImportError as err:  # built without a compiler: the package installs anyway
    _ext = None
    _EXT_ERROR = err

_warned = False

ROW_GROUP = 4  # weight rows a GEMV tile reads as one stream (kStreamGroup in kernels/cpu)
INT4_GROUP = 128  # values per scale of the 4-bit layout (kInt4Group)
INT8_BLOCK = 16  # values per row and block of the grouped int8 layout (kInt8Block)


def _native():
    """The compiled module, or None (after warning once why) when the torch reference must run.

    A CPU without AVX2 still gets compiled code: the extension's portable scalar path, which
    it selects at run time (warned once, since it is several times slower)."""
    global _warned
    if _ext is None:
        if not _warned:
            warnings.warn(
                f"the compiled CPU kernels (bitnet_train._cpu_kernels) are missing ({_EXT_ERROR}); install a "
                "C++17 compiler (e.g. g++) and reinstall with `pip install -e .`; using the much slower "
                "pure-torch reference",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned = True
        return None
    if "avx2" not in _ext.available_backends() and not _warned:
        warnings.warn(
            "this CPU lacks AVX2: running the compiled kernels' portable scalar path (exact, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned = True
    return _ext


def backend() -> str:
    """What runs the calls: 'avx512', 'avx2' or 'scalar' (compiled), or 'torch' (the reference fallback).
    'avx512' is 'avx2' with the decode GEMV on AVX-512 VNNI (kernels/cpu/ternary_kernels.cpp)."""
    ext = _native()
    return ext.get_backend() if ext is not None else "torch"


def set_num_threads(n: int) -> None:
    """Threads for torch's ops and for the compiled kernels, which keep their own setting
    (default: all hardware threads). On a machine shared with other busy processes, 1 avoids
    waiting on a preempted helper (docs/bench_kernels.md)."""
    torch.set_num_threads(n)
    if _ext is not None:
        _ext.set_num_threads(n)


def _cpu(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {t.device}")
    return t.detach().contiguous()


# ---------------------------------------------------------------------- the door


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (M, Kpad), zero padded, and per-token multipliers s (M,) of x (M, K).

    Bit-identical to quant.quantize_int8: x ~ q / s.
    """
    x = _cpu(x, "x").float()
    ext = _native()
    if ext is None:
        return reference_quantize_activations(x)
    q, s = ext.quantize_activations(x.numpy())
    return torch.from_numpy(q), torch.from_numpy(s)


def ternary_matmul_int(a: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Exact int32 (M, N) = a @ t^T for int8 a (M, Kpad) and packed ternary qweight (N, Kpad/4)."""
    a, qweight = _cpu(a, "a"), _cpu(qweight, "qweight")
    ext = _native()
    if ext is None:
        return reference_matmul_int(a, qweight)
    return torch.from_numpy(ext.ternary_gemm_int(a.numpy(), qweight.numpy()))


def bitlinear(x: torch.Tensor, qweight: torch.Tensor, qscale, in_features: int, rows: int = 0) -> torch.Tensor:
    """BitLinear's inference forward, float32 (..., N), for x (..., in_features).

    Equals F.linear(quant.quantize_activation(x), quant.quantize_weight(W)) up to float32
    rounding, for qweight = ternary_layout.pack_ternary(codes) and qscale = s of quant.ternarize(W).
    qscale may also hold one s_w per output row (N,). With rows = N, qweight is group_rows' layout.
    """
    lead = x.shape[:-1]
    x2d = _cpu(x, "x").float().reshape(-1, x.shape[-1])
    qweight = _cpu(qweight, "qweight")
    scales = torch.as_tensor(qscale, dtype=torch.float32).reshape(-1).contiguous()
    ext = _native()
    if ext is None:
        y = reference_bitlinear(x2d, ungroup_rows(qweight, rows) if rows else qweight, scales, in_features)
    else:
        y = torch.from_numpy(ext.bitlinear_forward(x2d.numpy(), qweight.numpy(), scales.numpy(), in_features, rows))
    return y.reshape(*lead, y.shape[-1])


def group_rows(qweight: torch.Tensor) -> torch.Tensor:
    """A packed weight (N, Kpad/4) in the streaming layout (ceil(N/4), Kpad): rows interleaved 4 at a time,
    block by block (kernels/cpu/ternary_kernels.h), so a GEMV tile reads one sequential stream."""
    qweight = _cpu(qweight, "qweight")
    ext = _native()
    if ext is None:
        return reference_group_rows(qweight)
    return torch.from_numpy(ext.group_rows(qweight.numpy()))


def int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, rows: int = 0) -> torch.Tensor:
    """float32 (M, N) ~ x (M, K) @ (weight (N, K) int8 * scale (N,)[:, None])^T: the int8 LM head.

    x is rounded to int16 per token (kernels/cpu/int8_weights.h), so the product is exact integer
    arithmetic and one rescale per output, as reference_int8_weight_linear computes it. With rows = N,
    weight is int8_group_rows' layout.
    """
    x, weight, scale = _cpu(x, "x").float(), _cpu(weight, "weight"), _cpu(scale, "scale").float()
    ext = _native()
    if ext is None:
        return reference_int8_weight_linear(x, int8_ungroup_rows(weight, rows, x.shape[1]) if rows else weight, scale)
    return torch.from_numpy(ext.int8_weight_linear(x.numpy(), weight.numpy(), scale.numpy(), rows))


def int8_group_rows(weight: torch.Tensor) -> torch.Tensor:
    """An int8 weight (N, K) in the int8 GEMV's streaming layout (ceil(N/4), 4 * K16), K16 = ceil(K/16) * 16:
    rows interleaved 4 at a time in blocks of 16 values, zero padded (kernels/cpu/int8_weights.h)."""
    weight = _cpu(weight, "weight")
    n, k = weight.shape
    padded = F.pad(weight, (0, -k % INT8_BLOCK, 0, -n % ROW_GROUP))
    return padded.view(-1, ROW_GROUP, padded.shape[1] // INT8_BLOCK, INT8_BLOCK).transpose(1, 2).reshape(
        -1, ROW_GROUP * padded.shape[1]).contiguous()


def int8_ungroup_rows(grouped: torch.Tensor, rows: int, in_features: int) -> torch.Tensor:
    """The row-major int8 weight (rows, in_features) of int8_group_rows' output."""
    blocks = grouped.shape[1] // (ROW_GROUP * INT8_BLOCK)
    return grouped.view(-1, blocks, ROW_GROUP, INT8_BLOCK).transpose(1, 2).reshape(-1, blocks * INT8_BLOCK)[
        :rows, :in_features].contiguous()


def pack_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight (N, K) as 4-bit codes with one scale per 128 values (kernels/cpu/int4_weights.h):
    uint8 (ceil(N/4), G, 4, 64) and float32 scales (ceil(N/4), G, 4), G = ceil(K / 128).

    Per group, llama.cpp Q4_0's rule: the value of largest magnitude m maps to code -8, scale m / -8,
    the others round to the nearest of -8 .. 7 times that scale; an all-zero group gets scale 0.
    """
    w = _cpu(weight, "weight").float()
    n, k = w.shape
    w = F.pad(w, (0, ternary_layout.padded_features(k) - k, 0, -n % ROW_GROUP))
    groups = w.view(w.shape[0], -1, INT4_GROUP)
    peak = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))
    scale = peak / -8.0
    codes = torch.where(scale == 0, 0.0, groups / scale).round().clamp(-8, 7).to(torch.uint8) + 8
    nibbles = codes[..., :INT4_GROUP // 2] | codes[..., INT4_GROUP // 2:] << 4
    tiles = w.shape[0] // ROW_GROUP
    packed = nibbles.view(tiles, ROW_GROUP, -1, INT4_GROUP // 2).transpose(1, 2).contiguous()
    return packed, scale.view(tiles, ROW_GROUP, -1).transpose(1, 2).contiguous()


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_int4's codes q (rows, G * 128) int8 in -8 .. 7 and scales (rows, G)."""
    u = torch.cat([packed & 15, packed >> 4], dim=-1)  # (tiles, G, 4, 128): values j and 64 + j
    q = u.transpose(1, 2).reshape(-1, u.shape[1] * INT4_GROUP)[:rows].to(torch.int8) - 8
    return q, scales.transpose(1, 2).reshape(-1, scales.shape[1])[:rows]


def int4_weight_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, rows: int) -> torch.Tensor:
    """float32 (M, rows) ~ x (M, K) @ W^T for W stored by pack_int4: the 4-bit LM head.

    x is quantized to int8 per token (quantize_activations), each group's product is exact integer
    arithmetic, and the groups are summed in float32, as reference_int4_weight_linear computes it.
    """
    x, packed, scales = _cpu(x, "x").float(), _cpu(packed, "packed"), _cpu(scales, "scales").float()
    ext = _native()
    if ext is None:
        return reference_int4_weight_linear(x, packed, scales, rows)
    return torch.from_numpy(ext.int4_weight_linear(x.numpy(), packed.numpy(), scales.numpy(), rows))


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of the CPU tensor t in memory on 2 MB pages where the kernel grants them
    (kernels/cpu/stream_arena.h): a decode step streams its weights once per token, and on 4 KB pages
    that is a TLB miss per 4 KB. Without the extension (or for an empty t), t itself."""
    t = _cpu(t, "t")
    ext = _native()
    if ext is None or t.numel() == 0:
        return t
    out = torch.from_numpy(ext.huge_page_buffer(t.numel() * t.element_size())).view(t.dtype).view(t.shape)
    return out.copy_(t)


def huge_page_zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.zeros(shape, dtype) on the CPU, on 2 MB pages where the kernel grants them (as on_huge_pages)."""
    numel = math.prod(shape)
    ext = _native()
    if ext is None or numel == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(ext.huge_page_buffer(numel * dtype.itemsize)).view(dtype).view(shape)


def native_decoder(hidden: int, intermediate: int, heads: int, kv_heads: int, eps: float, activation: str,
                   layers: list[tuple[torch.Tensor | None, ...]], final_norm: torch.Tensor):
    """The compiled decoder stack (kernels/cpu/decoder.h): every layer of a forward step and the final
    RMSNorm (weight `final_norm`) in one call, or None where the extension is missing (then the engine
    runs its layers op by op in torch).

    activation: model.py's hidden_act, relu2 or silu. layers: per layer (input_norm, qkv qweight, qkv
    row scales, qkv bias, attn_sub_norm, o qweight, o row scales, post_norm, gate_up qweight, gate_up
    row scales, ffn_sub_norm, down qweight, down row scales), float32 and packed uint8 tensors it
    keeps references to; None for a bias or sub-norm the model does not have.
    """
    ext = _native()
    if ext is None:
        return None
    arrays = [tuple(None if t is None else _cpu(t, "decoder weight").numpy() for t in layer) for layer in layers]
    return ext.Decoder(hidden, intermediate, heads, kv_heads, eps, activation, arrays,
                       _cpu(final_norm, "decoder weight").numpy())


# ---------------------------------------------------------------------- torch reference


def reference_quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize_int8 in the kernels' format: int8 (M, Kpad) zero padded, s (M,)."""
    q, s = quant.quantize_int8(x)
    pad = ternary_layout.padded_features(x.shape[-1]) - x.shape[-1]
    return F.pad(q, (0, pad)).to(torch.int8), s.squeeze(-1)


def reference_matmul_int(a: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """a @ t^T in exact int32 arithmetic on the unpacked codes."""
    if a.dtype != torch.int8 or a.dim() != 2:
        raise ValueError(f"a must be a 2-D int8 tensor, got {a.dtype} of shape {tuple(a.shape)}")
    codes = ternary_layout.unpack_ternary(qweight, a.shape[1], dtype=torch.int32)
    return a.to(torch.int32) @ codes.T


def reference_bitlinear(x: torch.Tensor, qweight: torch.Tensor, qscale, in_features: int) -> torch.Tensor:
    """y = dot(t, a) / (s_w * s_a) in float32, each operation rounded once, like the kernels; s_w is one
    value or one per row."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, in_features is {in_features}")
    a, s = reference_quantize_activations(x)
    w_scale = torch.as_tensor(qscale, dtype=torch.float32).reshape(-1)
    return reference_matmul_int(a, qweight).float() / (w_scale * s[:, None])


def reference_group_rows(qweight: torch.Tensor) -> torch.Tensor:
    """group_rows in torch: rows padded with zero bytes to a multiple of 4, then (row group, block, row)."""
    n, row_bytes = qweight.shape
    padded = F.pad(qweight, (0, 0, 0, -n % ROW_GROUP))
    blocks = padded.view(-1, ROW_GROUP, row_bytes // ternary_layout.BLOCK_BYTES, ternary_layout.BLOCK_BYTES)
    return blocks.transpose(1, 2).reshape(-1, ROW_GROUP * row_bytes)


def ungroup_rows(grouped: torch.Tensor, rows: int) -> torch.Tensor:
    """The row-major packed weight (rows, Kpad/4) of group_rows' output."""
    row_bytes = grouped.shape[1] // ROW_GROUP
    blocks = grouped.view(-1, row_bytes // ternary_layout.BLOCK_BYTES, ROW_GROUP, ternary_layout.BLOCK_BYTES)
    return blocks.transpose(1, 2).reshape(-1, row_bytes)[:rows]


def reference_int4_weight_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                                 rows: int) -> torch.Tensor:
    """sum_g scale_g * dot(q_g, a_g) / s_a with exact integer group dots (int64) and float64 sums."""
    a, s = reference_quantize_activations(x)
    q, group_scales = unpack_int4(packed, scales, rows)
    dots = torch.einsum("mgc,ngc->mng", a.view(len(a), -1, INT4_GROUP).to(torch.int64),
                        q.view(rows, -1, INT4_GROUP).to(torch.int64))
    return ((dots.double() * group_scales.double()).sum(-1) / s.double()[:, None]).float()


def reference_int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float(dot(w, q)) / s * scale with q = round(x * s), s = 32767 / max|x| per token, in int64."""
    s = 32767.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=quant.EPS)
    q = (x * s).round().clamp(-32767, 32767).to(torch.int64)
    return (q @ weight.to(torch.int64).T).float() / s * scale
