"""Tests for diffusers_gaq.quant.packing (dense little-endian bit packing)."""

import pytest
import torch

from diffusers_gaq.quant.packing import pack_bits, packed_nbytes, unpack_bits

SHAPES = [(1,), (7,), (8,), (9,), (3, 5), (2, 3, 5), (16, 8, 3, 3), (1001,), ()]


def _reference_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit reference of the documented layout (slow, for small tensors only)."""
    flat = [int(v) for v in values.reshape(-1).tolist()]
    out = [0] * ((len(flat) * bits + 7) // 8)
    for i, v in enumerate(flat):
        for k in range(bits):
            pos = i * bits + k
            out[pos // 8] |= ((v >> k) & 1) << (pos % 8)
    return torch.tensor(out, dtype=torch.uint8)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(bits, shape):
    gen = torch.Generator().manual_seed(bits * 1000 + len(shape))
    values = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(values.numel(), bits)
    out = unpack_bits(packed, bits, shape)
    assert out.dtype == torch.uint8 and out.shape == torch.Size(shape)
    assert torch.equal(out.to(torch.int64), values)


@pytest.mark.parametrize("bits", range(2, 9))
def test_matches_bitwise_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (37,), generator=gen, dtype=torch.uint8)
    assert torch.equal(pack_bits(values, bits), _reference_pack(values, bits))


@pytest.mark.parametrize("bits", range(2, 9))
def test_extreme_values_and_dtypes(bits):
    top = 2**bits - 1
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        values = torch.tensor([top, 0, top, top, 0, top, top, top, top, 0, top], dtype=dtype)
        assert torch.equal(unpack_bits(pack_bits(values, bits), bits, values.shape).to(dtype), values)


def test_non_contiguous_input():
    values = torch.randint(0, 16, (6, 10), dtype=torch.uint8).t()  # row-major order of the *logical* tensor
    assert not values.is_contiguous()
    assert torch.equal(unpack_bits(pack_bits(values, 4), 4, values.shape), values)


def test_byte_counts():
    assert pack_bits(torch.zeros(1000, dtype=torch.uint8), 4).numel() == 500
    assert pack_bits(torch.zeros(8, dtype=torch.uint8), 3).numel() == 3
    assert pack_bits(torch.zeros(1, dtype=torch.uint8), 3).numel() == 1
    assert pack_bits(torch.zeros(3, dtype=torch.uint8), 5).numel() == 2
    assert pack_bits(torch.zeros(0, dtype=torch.uint8), 4).numel() == 0
    assert packed_nbytes(1000, 4) == 500
    assert packed_nbytes(8, 3) == 3
    assert packed_nbytes(9, 7) == 8
    assert packed_nbytes(5, 8) == 5
    assert packed_nbytes(0, 2) == 0


def test_four_bit_layout_is_low_nibble_first():
    packed = pack_bits(torch.tensor([1, 2, 3, 15, 7], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x21, 0xF3, 0x07]


def test_two_and_three_bit_layout():
    # 2 bits: four values per byte, first in bits 0-1.
    assert pack_bits(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [0b00111001, 0b00000011]
    # 3 bits: 5 = 101, 3 = 011, 7 = 111 written LSB first -> bitstream 1 0 1 | 1 1 0 | 1 1 1
    # byte 0 holds stream bits 0..7 = 1,0,1,1,1,0,1,1 (LSB first) = 0b11011101; byte 1 holds the last 1.
    assert pack_bits(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b00000001]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"4-bit.*min=0, max=16"):
        pack_bits(torch.tensor([0, 16, 3]), 4)
    with pytest.raises(ValueError, match=r"min=-1"):
        pack_bits(torch.tensor([-1, 2]), 3)


def test_pack_rejects_float_and_bad_bits():
    with pytest.raises(TypeError):
        pack_bits(torch.tensor([1.0, 2.0]), 4)
    for bits in (1, 9, 0):
        with pytest.raises(ValueError, match="bits"):
            pack_bits(torch.tensor([0, 1]), bits)
        with pytest.raises(ValueError, match="bits"):
            packed_nbytes(4, bits)


def test_unpack_rejects_wrong_length():
    packed = pack_bits(torch.zeros(10, dtype=torch.uint8), 3)  # 4 bytes
    with pytest.raises(ValueError, match=r"need 4 bytes, got 3 bytes"):
        unpack_bits(packed[:3], 3, (10,))
    with pytest.raises(ValueError, match=r"need 5 bytes, got 4 bytes"):
        unpack_bits(packed, 4, (10,))
    with pytest.raises(TypeError):
        unpack_bits(packed.to(torch.int32), 3, (10,))
    with pytest.raises(ValueError, match="1-D"):
        unpack_bits(packed.reshape(2, 2), 3, (10,))
