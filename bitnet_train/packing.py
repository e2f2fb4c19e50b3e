"""Ternary weight layouts: ternary codes in {-1, 0, 1} <-> the bytes a kernel reads.

`pack_ternary` / `unpack_ternary` are the bitnet-train packed layout of docs/formats.md, the one
`kernels/cpu` and `kernels/cuda` consume: 2-bit codes u = t + 1, the input dimension padded to a
multiple of 128 with t = 0, each block of 128 values stored in 32 bytes where byte j holds
values j, j+32, j+64, j+96 from the low bits up. Other layouts belong here as their own
pack/unpack pair.
"""
import torch

BLOCK_VALUES = 128  # values per packed block
BLOCK_BYTES = 32  # bytes per packed block (4 two-bit codes per byte)
_CODES_PER_BYTE = BLOCK_VALUES // BLOCK_BYTES
_SHIFTS = torch.arange(0, 8, 2, dtype=torch.uint8)  # bit offset of value j + 32 i within byte j


def padded_features(in_features: int) -> int:
    """The input dimension rounded up to whole packed blocks."""
    return -(-in_features // BLOCK_VALUES) * BLOCK_VALUES


def packed_row_bytes(in_features: int) -> int:
    """Bytes per output row of a packed weight: ceil(in_features / 128) * 32."""
    return padded_features(in_features) // _CODES_PER_BYTE


def _check_ternary(codes: torch.Tensor) -> None:
    bad = ~((codes == -1) | (codes == 0) | (codes == 1))
    if bad.any():
        where = tuple(i.item() for i in bad.nonzero()[0])
        raise ValueError(
            f"pack_ternary: codes must be in {{-1, 0, 1}}, found {codes[where].item()} at index "
            f"{where} ({int(bad.sum())} bad values); ternarize first (quant.ternarize)"
        )


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes (out, in) into uint8 (out, ceil(in/128)*32), docs/formats.md layout."""
    if codes.dim() != 2:
        raise ValueError(f"pack_ternary: codes must be 2-D (out, in), got shape {tuple(codes.shape)}")
    _check_ternary(codes)
    out_features, in_features = codes.shape
    u = (codes.to(torch.int8) + 1).to(torch.uint8)
    u = torch.nn.functional.pad(u, (0, padded_features(in_features) - in_features), value=1)
    # (out, block, i, j) -> byte j of a block ORs value 32 i + j shifted to bits 2i, 2i + 1.
    u = u.view(out_features, -1, _CODES_PER_BYTE, BLOCK_BYTES)
    packed = (u << _SHIFTS.view(1, 1, -1, 1)).sum(dim=2, dtype=torch.uint8)
    return packed.view(out_features, -1)


def unpack_ternary(
    packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ternary codes (out, in_features) of a packed weight, as `dtype` (float32 or int8 ...)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"unpack_ternary: packed must be a 2-D uint8 tensor, got {packed.dtype} "
            f"of shape {tuple(packed.shape)}"
        )
    if packed.shape[1] != packed_row_bytes(in_features):
        raise ValueError(
            f"unpack_ternary: in_features={in_features} needs {packed_row_bytes(in_features)} "
            f"bytes per row, packed has {packed.shape[1]}"
        )
    out_features = packed.shape[0]
    blocks = packed.view(out_features, -1, 1, BLOCK_BYTES)
    u = (blocks >> _SHIFTS.view(1, 1, -1, 1)) & 3
    if (u == 3).any():
        raise ValueError("unpack_ternary: packed holds the code 3, which is not t + 1 for any ternary t")
    codes = u.view(out_features, -1)[:, :in_features].to(torch.int8) - 1
    return codes.to(dtype)
