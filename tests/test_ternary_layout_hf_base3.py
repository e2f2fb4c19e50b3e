"""bitnet_train.ternary_layout: the Hugging Face BitNet (dim-0) and base-3 (1.6-bit) layouts."""
import pytest
import torch
import torch._dynamo
from transformers.integrations.bitnet import pack_weights, unpack_weights

from bitnet_train.ternary_layout import (
    base3_row_bytes,
    pack_ternary_base3,
    pack_ternary_hf,
    unpack_ternary_base3,
    unpack_ternary_hf,
)
from conftest import random_codes

SHAPES = [(4, 1), (8, 5), (12, 7), (16, 129), (40, 300)]


@pytest.mark.parametrize("shape", SHAPES)
def test_hf_round_trip_is_exact(shape):
    codes = random_codes(shape)
    packed = pack_ternary_hf(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, shape[1])
    assert torch.equal(unpack_ternary_hf(packed), codes)


@pytest.mark.parametrize("shape", SHAPES)
def test_hf_layout_is_transformers_layout(shape):
    codes = random_codes(shape, seed=1)
    assert torch.equal(pack_ternary_hf(codes), pack_weights(codes.clone()))  # pack_weights adds 1 in place
    with torch._dynamo.config.patch(disable=True):  # unpack_weights is torch.compile'd: seconds per shape
        assert torch.equal(unpack_weights(pack_ternary_hf(codes), torch.float32), codes)


def test_hf_places_row_i_times_out_over_4_plus_r_in_bits_2i():
    codes = torch.zeros(8, 1)
    codes[5, 0] = 1  # row 5 = 2 * (8/4) + 1: byte row 1, bits 4-5
    packed = pack_ternary_hf(codes)
    assert packed[1, 0] == (0b01010101 & ~(3 << 4)) | (2 << 4)
    assert packed[0, 0] == 0b01010101


@pytest.mark.parametrize("rows", [1, 2, 6, 10])
def test_hf_rejects_rows_not_divisible_by_4(rows):
    with pytest.raises(ValueError, match="divisible by 4"):
        pack_ternary_hf(random_codes((rows, 8)))


def test_hf_unpack_rejects_code_three():
    packed = pack_ternary_hf(random_codes((8, 3)))
    packed[1, 2] |= 0b11000000
    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary_hf(packed)


@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (2, 5), (5, 6), (7, 128), (4, 301)])
def test_base3_round_trip_is_exact(shape):
    codes = random_codes(shape, seed=2)
    packed = pack_ternary_base3(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], base3_row_bytes(shape[1]))
    assert torch.equal(unpack_ternary_base3(packed, shape[1]), codes)
    assert torch.equal(unpack_ternary_base3(packed, shape[1], dtype=torch.int8), codes.to(torch.int8))


def test_base3_byte_k_holds_values_5k_to_5k_plus_4_as_base_3_digits():
    codes = torch.tensor([[1, -1, 0, 1, 1, -1, 0]]).float()  # u = 2 0 1 2 2 | 0 1 (+ pad u = 1 1 1)
    assert pack_ternary_base3(codes).tolist() == [[2 + 0 * 3 + 1 * 9 + 2 * 27 + 2 * 81, 0 + 1 * 3 + 1 * 9 + 1 * 27 + 1 * 81]]


def test_base3_is_1_6_bits_per_weight():
    assert base3_row_bytes(2560) * 8 / 2560 == 1.6


def test_base3_unpack_rejects_bytes_above_242():
    packed = pack_ternary_base3(random_codes((2, 10)))
    packed[1, 0] = 243
    with pytest.raises(ValueError, match="243"):
        unpack_ternary_base3(packed, 10)


def test_base3_unpack_rejects_wrong_row_length():
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_ternary_base3(pack_ternary_base3(random_codes((2, 11))), 10)


@pytest.mark.parametrize("pack", [pack_ternary_hf, pack_ternary_base3])
def test_non_ternary_codes_are_rejected(pack):
    codes = random_codes((4, 10))
    codes[2, 3] = 2.0
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        pack(codes)
