"""Ternary weight layouts: ternary codes in {-1, 0, 1} <-> the bytes a kernel reads.

`pack_ternary` / `unpack_ternary` are the bitnet-train packed layout of docs/formats.md, the one
`kernels/cpu` and `kernels/cuda` consume: 2-bit codes u = t + 1, the input dimension padded to a
multiple of 128 with t = 0, each block of 128 values stored in 32 bytes where byte j holds
values j, j+32, j+64, j+96 from the low bits up. Other layouts belong here as their own
pack/unpack pair: `pack_ternary_hf` (Hugging Face BitNet, 4 codes per byte along the output
dimension) and `pack_ternary_base3` (our denser 1.6-bit layout, 5 codes per byte).
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


def _stored_codes(codes: torch.Tensor, caller: str, multiple: int) -> torch.Tensor:
    """Ternary codes (out, in) as the stored digits code + 1 (uint8), padded with code 0 to a
    multiple of `multiple` columns: the first step of both packed layouts."""
    if codes.dim() != 2:
        raise ValueError(f"{caller}: codes must be 2-D (out, in), got shape {tuple(codes.shape)}")
    _check_ternary(codes)
    u = (codes.to(torch.int8) + 1).to(torch.uint8)
    return torch.nn.functional.pad(u, (0, -codes.shape[1] % multiple), value=1)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes (out, in) into uint8 (out, ceil(in/128)*32), docs/formats.md layout."""
    u = _stored_codes(codes, "pack_ternary", BLOCK_VALUES)
    # (out, block, i, j) -> byte j of a block ORs value 32 i + j shifted to bits 2i, 2i + 1.
    u = u.view(len(u), -1, _CODES_PER_BYTE, BLOCK_BYTES)
    packed = (u << _SHIFTS.view(1, 1, -1, 1)).sum(dim=2, dtype=torch.uint8)
    return packed.view(len(u), -1)


def unpack_ternary(
    packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ternary codes (out, in_features) of a packed weight, as `dtype` (float32 or int8 ...)."""
    _check_packed("unpack_ternary", packed, in_features, packed_row_bytes(in_features))
    out_features = packed.shape[0]
    blocks = packed.view(out_features, -1, 1, BLOCK_BYTES)
    u = (blocks >> _SHIFTS.view(1, 1, -1, 1)) & 3
    if (u == 3).any():
        raise ValueError("unpack_ternary: packed holds the code 3, which is not t + 1 for any ternary t")
    codes = u.view(out_features, -1)[:, :in_features].to(torch.int8) - 1
    return codes.to(dtype)


def _check_packed(name: str, packed: torch.Tensor, in_features: int, row_bytes: int) -> None:
    """A row-major packed weight: 2-D uint8 with the row length its layout needs."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"{name}: packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.shape[1] != row_bytes:
        raise ValueError(
            f"{name}: in_features={in_features} needs {row_bytes} bytes per row, packed has {packed.shape[1]}"
        )


def _unpack_error(name: str, what: str) -> ValueError:
    return ValueError(f"{name}: {what}, which is not t + 1 for any ternary t")


# Hugging Face BitNet (transformers/integrations/bitnet.py): u = t + 1, 4 values per byte along
# dim 0, packed[r, c] = sum_i u[i * out/4 + r, c] << 2 i.
HF_VALUES_PER_BYTE = 4


def pack_ternary_hf(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes (out, in) into uint8 (out/4, in), transformers' BitNet layout."""
    if codes.dim() != 2 or codes.shape[0] % HF_VALUES_PER_BYTE:
        raise ValueError(
            f"pack_ternary_hf: packs 4 output rows per byte, so codes must be 2-D with out_features "
            f"divisible by 4; got shape {tuple(codes.shape)}"
        )
    _check_ternary(codes)
    u = (codes.to(torch.int8) + 1).to(torch.uint8)
    u = u.view(HF_VALUES_PER_BYTE, -1, codes.shape[1])  # (i, r, c) = row i * out/4 + r
    return (u << _SHIFTS.view(-1, 1, 1)).sum(dim=0, dtype=torch.uint8)


def unpack_ternary_hf(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ternary codes (4 * rows, in) of a transformers BitNet packed weight."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"unpack_ternary_hf: packed must be a 2-D uint8 tensor, got {packed.dtype} "
            f"of shape {tuple(packed.shape)}"
        )
    u = (packed.unsqueeze(0) >> _SHIFTS.view(-1, 1, 1)) & 3
    if (u == 3).any():
        raise _unpack_error("unpack_ternary_hf", "packed holds the code 3")
    return (u.flatten(0, 1).to(torch.int8) - 1).to(dtype)


# Base 3, 5 values per byte (3^5 = 243 <= 256): 1.6 bits per weight against the information limit
# log2(3) = 1.585. Each row is padded to a multiple of 5 with t = 0; byte k of a row holds
# u[5k + i] * 3^i, i = 0..4, so a byte is at most 242.
BASE3_VALUES_PER_BYTE = 5
_POWERS_OF_3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)


def base3_row_bytes(in_features: int) -> int:
    """Bytes per output row of a base-3 packed weight: ceil(in_features / 5)."""
    return -(-in_features // BASE3_VALUES_PER_BYTE)


def pack_ternary_base3(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes (out, in) into uint8 (out, ceil(in/5)), 5 base-3 digits per byte."""
    u = _stored_codes(codes, "pack_ternary_base3", BASE3_VALUES_PER_BYTE).view(len(codes), -1, BASE3_VALUES_PER_BYTE)
    return (u * _POWERS_OF_3).sum(dim=-1, dtype=torch.uint8)


def unpack_ternary_base3(
    packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ternary codes (out, in_features) of a base-3 packed weight."""
    _check_packed("unpack_ternary_base3", packed, in_features, base3_row_bytes(in_features))
    if (packed > 242).any():
        raise _unpack_error("unpack_ternary_base3", f"packed holds the byte {int(packed.max())} > 3^5 - 1")
    u = packed.unsqueeze(-1) // _POWERS_OF_3 % 3
    codes = u.flatten(1)[:, :in_features].to(torch.int8) - 1
    return codes.to(dtype)
