"""One layer's integer weight codes as a torchao ``IntxUnpackedToInt8Tensor`` (exact; see the package docstring)."""

from __future__ import annotations

import torch


def _per_channel(t: torch.Tensor, out_channels: int, ndim: int) -> torch.Tensor:
    # A per-tensor quantizer is the per-channel one with every channel equal.
    t = t.detach().reshape(-1)
    t = t.expand(out_channels) if t.numel() == 1 else t
    if t.numel() != out_channels:
        raise ValueError(f"expected one scale / zero point per output channel ({out_channels}), got {t.numel()}")
    return t.reshape((out_channels,) + (1,) * (ndim - 1))


def intx_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                dtype: torch.dtype = torch.float32):
    """torchao's per-channel asymmetric intx weight for unsigned ``codes`` in [0, 2**bits - 1].

    ``dtype`` is the float type the weight dequantizes to (and the scale's type).
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor

    if not 2 <= bits <= 8:
        raise ValueError(f"torchao intx weights have 1 to 8 bits; got {bits}")
    if codes.dtype.is_floating_point:
        raise TypeError("codes must be an integer tensor")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi > 2**bits - 1:
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits, got [{lo}, {hi}]")
    out_channels, offset = codes.shape[0], 2 ** (bits - 1)
    scale = _per_channel(scale, out_channels, codes.dim()).to(dtype)
    zero_point = _per_channel(zero_point, out_channels, codes.dim())
    if not torch.equal(zero_point, zero_point.round()) or zero_point.min() < 0 or zero_point.max() > 2**bits - 1:
        raise ValueError(f"zero points must be integers in [0, {2**bits - 1}]")
    data = (codes.to(torch.int16) - offset).to(torch.int8)
    zero = (zero_point.to(torch.int16) - offset).to(torch.int8)
    block_size = (1,) + tuple(codes.shape[1:])  # one block per output channel
    return IntxUnpackedToInt8Tensor(data.contiguous(), scale.contiguous(), zero.contiguous(),
                                    getattr(torch, f"int{bits}"), block_size, dtype, None)
