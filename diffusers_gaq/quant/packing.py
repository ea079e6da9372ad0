"""Dense bit packing of integer quantization codes.

Layout: the values are flattened in row-major (C) order and written as one little-endian
bitstream: bit ``k`` of value ``i`` is bit ``(i * bits + k) % 8`` of byte ``(i * bits + k) // 8``.
For ``bits`` dividing 8 this is the familiar layout (bits=4: two values per byte, the first in
the low nibble; bits=2: four per byte, the first in the two lowest bits); for 3/5/6/7 values
straddle byte boundaries. The stream is ``ceil(numel * bits / 8)`` bytes, padding bits are zero.

Implementation: eight consecutive values always fill exactly ``bits`` whole bytes, so both
directions work on groups of eight values gathered in one int64 word (8 * bits <= 64 bits).
The only Python loops are over the (at most eight) positions of a value or byte in a group.

Pure torch: nothing here knows about diffusers or quanto.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]

_GROUP = 8  # values per group; a group always occupies exactly `bits` bytes


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes :func:`pack_bits` produces for ``numel`` values of ``bits`` bits."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``values`` (any shape, entries in [0, 2**bits - 1]) into a 1-D uint8 tensor.

    See the module docstring for the bit layout. The result lives on ``values.device``.
    """
    _check_bits(bits)
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(f"pack_bits expects an integer tensor, got dtype {values.dtype}")
    flat = values.reshape(-1)
    numel = flat.numel()
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    vmin, vmax = int(flat.min()), int(flat.max())
    if vmin < 0 or vmax > 2**bits - 1:
        raise ValueError(
            f"values out of range for {bits}-bit packing: min={vmin}, max={vmax}, allowed [0, {2**bits - 1}]"
        )
    if bits == 8:
        return flat.to(torch.uint8).clone()

    device = values.device
    n_groups = -(-numel // _GROUP)
    padded = torch.zeros(n_groups * _GROUP, dtype=torch.int64, device=device)
    padded[:numel] = flat
    groups = padded.view(n_groups, _GROUP)
    # Value j of a group occupies bits [j*bits, (j+1)*bits) of the word; fields don't overlap.
    word = torch.zeros(n_groups, dtype=torch.int64, device=device)
    for j in range(_GROUP):
        word |= groups[:, j] << (j * bits)
    # Byte m of the group is bits [8m, 8m+8) of the word.
    shifts = torch.arange(bits, dtype=torch.int64, device=device) * 8
    packed = ((word[:, None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_nbytes(numel, bits)].clone()


def unpack_bits(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a uint8 tensor of ``shape`` holding the integer values.

    Raises ValueError if ``packed`` does not hold exactly ``packed_nbytes(prod(shape), bits)`` bytes.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    if packed.dim() != 1:
        raise ValueError(f"packed must be 1-D, got shape {tuple(packed.shape)}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"invalid shape {shape}")
    numel = math.prod(shape)
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"packed length mismatch: {numel} values of {bits} bits (shape {shape}) need {expected} bytes, "
            f"got {packed.numel()} bytes"
        )
    if bits == 8 or numel == 0:
        return packed.clone().reshape(shape)

    device = packed.device
    n_groups = -(-numel // _GROUP)
    padded = torch.zeros(n_groups * bits, dtype=torch.int64, device=device)
    padded[:expected] = packed
    groups = padded.view(n_groups, bits)
    word = torch.zeros(n_groups, dtype=torch.int64, device=device)
    for m in range(bits):
        word |= groups[:, m] << (8 * m)
    shifts = torch.arange(_GROUP, dtype=torch.int64, device=device) * bits
    values = ((word[:, None] >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(-1)
    return values[:numel].reshape(shape).clone()
