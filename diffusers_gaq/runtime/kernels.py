"""The integer kernels the runtime calls, and the exact float fallback beside them.

- ``onednn``: oneDNN's int8 convolution and linear (``torch.ops.onednn.qconv2d_pointwise`` /
  ``qlinear_pointwise``), the ops PyTorch Inductor lowers torchao's x86 static quantization to. They
  take plain ``uint8`` activation codes with a scale and zero point and ``int8`` weights with one
  scale per output channel (zero point 0), accumulate in int32 and return float32: exactly
  s_x * s_w[o] * sum (q_x - z_x) * w_int + bias. No deprecated quantized dtype is involved.
- ``dequantize``: the integer weights are turned back into float for each call and the layer runs in
  float on the simulated model's own arithmetic, so it computes bit for bit what the simulated model
  does, on any device; it saves memory, not time.

Pure torch: nothing here knows about diffusers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

def activation_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """clamp(round(x / s) + z, 0, 2^b - 1) as uint8: the codes the simulated activation quantizer
    (quant.quantizers.fake_quantize) computes, the same float operations in the same order."""
    return x.div(scale).round_().add_(zero_point).clamp_(0, 2**bits - 1).to(torch.uint8)


# ---- oneDNN ----------------------------------------------------------------------------------------
def pack_conv_weight(weight: torch.Tensor, scale: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """int8 [out, in, kh, kw] -> oneDNN's blocked layout (a CPU ``torch._mkldnn`` tensor)."""
    # The activation scale / zero point passed here only guide the layout choice; the call takes its own.
    return torch.ops.onednn.qconv_prepack(weight.contiguous(), scale.float(), 1.0, 0, list(stride), list(padding),
                                          list(dilation), groups, None)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] -> oneDNN's layout (stored transposed, [in, out])."""
    return torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)


def unpack_weight(packed: torch.Tensor, linear: bool) -> torch.Tensor:
    """The plain int8 weight of a packed one ([out, in(, kh, kw)])."""
    dense = packed.to_dense()
    return dense.t().contiguous() if linear else dense


def onednn_conv(codes: torch.Tensor, x_scale: float, x_zero_point: int, packed: torch.Tensor, w_scale: torch.Tensor,
                w_zero_points: torch.Tensor, bias: torch.Tensor | None, geometry: list) -> torch.Tensor:
    """``geometry``: [stride, padding, dilation] as lists; groups 1. Returns float32."""
    stride, padding, dilation = geometry
    return torch.ops.onednn.qconv2d_pointwise(codes, x_scale, x_zero_point, packed, w_scale, w_zero_points, bias, stride,
                                              padding, dilation, 1, 1.0, 0, torch.float32, "none", [], "")


def onednn_linear(codes: torch.Tensor, x_scale: float, x_zero_point: int, packed: torch.Tensor, w_scale: torch.Tensor,
                  w_zero_points: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(codes, x_scale, x_zero_point, packed, w_scale, w_zero_points, bias, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """oneDNN's int8 kernels exist in this torch build and compute exactly on this CPU.

    The probe multiplies the largest codes (activation 255, weights -128 and 127) over a long
    reduction and compares with the exact sum: CPUs without VNNI may route uint8 x int8 products
    through saturating int16 pairs, which would silently change the result."""
    ops = getattr(torch.ops, "onednn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        k = 512
        x = torch.full((2, k, 3, 3), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        w = torch.full((4, k, 3, 3), -128, dtype=torch.int8)
        w[::2] = 127
        ones, geometry = torch.ones(4), [[1, 1], [1, 1], [1, 1]]
        packed = pack_conv_weight(w, ones, *geometry, groups=1)
        out = onednn_conv(x, 1.0, 0, packed, ones, torch.zeros(4, dtype=torch.int64), None, geometry)
        exact = F.conv2d(x.double(), w.double(), padding=1)
        return bool(torch.equal(out.double(), exact))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


# ---- int8 containers for codes with a zero point -----------------------------------------------------
def signed_weight(codes: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-channel (codes - zero_point) into an int8 tensor and an integer offset per channel:
    codes - z = w_int8 + offset. The offset is 0 wherever the channel's values fit int8 (every 4-bit
    weight, every symmetric one); 8-bit asymmetric codes span up to [-255, 255] and take the offset
    that moves their range into [-128, 127]."""
    view = (-1,) + (1,) * (codes.dim() - 1)
    centred = codes.to(torch.int16) - zero_point.reshape(view).round().to(torch.int16)
    flat = centred.reshape(centred.shape[0], -1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    fits = (lo >= -128) & (hi <= 127)
    offset = torch.where(fits, torch.zeros_like(lo), lo + 128)
    weight = (centred - offset.reshape(view)).to(torch.int8)
    return weight, offset  # int16: the offsets lie in [-127, 128]
