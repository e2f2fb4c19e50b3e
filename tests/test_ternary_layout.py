"""bitnet_train.ternary_layout: the docs/formats.md packed ternary layout."""
import pytest
import torch

from bitnet_train import quant
from bitnet_train.ternary_layout import pack_ternary, packed_row_bytes, unpack_ternary
from conftest import random_codes

SHAPES = [(1, 1), (3, 31), (2, 128), (5, 129), (4, 300), (7, 1000)]


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_exact(shape):
    codes = random_codes(shape)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packed_row_bytes(shape[1]))
    assert torch.equal(unpack_ternary(packed, shape[1]), codes)
    assert torch.equal(unpack_ternary(packed, shape[1], dtype=torch.int8), codes.to(torch.int8))


def test_round_trip_of_ternarized_weights():
    codes, _ = quant.ternarize(torch.randn(48, 200))
    assert torch.equal(unpack_ternary(pack_ternary(codes), 200), codes)


@pytest.mark.parametrize("column", [0, 31, 32, 77, 127, 128, 200])
@pytest.mark.parametrize("t", [-1, 1])
def test_layout_places_each_value_as_documented(column, t):
    """docs/formats.md: value k sits in byte 32 (k // 128) + k % 32 at bits 2 ((k % 128) // 32)."""
    codes = torch.zeros(1, 201)
    codes[0, column] = t
    expected = torch.full((packed_row_bytes(201),), 0b01010101, dtype=torch.uint8)  # all u = 1
    byte, shift = 32 * (column // 128) + column % 32, 2 * ((column % 128) // 32)
    expected[byte] = (0b01010101 & ~(3 << shift)) | ((t + 1) << shift)
    assert torch.equal(pack_ternary(codes)[0], expected)


@pytest.mark.parametrize("bad", [2.0, 0.5, -3.0, float("nan")])
def test_non_ternary_values_are_rejected(bad):
    codes = random_codes((3, 40))
    codes[1, 7] = bad
    with pytest.raises(ValueError, match=r"\(1, 7\)"):
        pack_ternary(codes)


def test_unpack_rejects_wrong_row_length():
    packed = pack_ternary(random_codes((2, 129)))
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_ternary(packed, 128)


def test_unpack_rejects_code_three():
    packed = pack_ternary(random_codes((2, 64)))
    packed[0, 3] |= 0b11
    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary(packed, 64)
