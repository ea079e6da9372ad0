"""Runtime layers: a calibrated Conv2d / Linear holding integer weights and no float copy of them.

An :class:`IntegerConv2d` / :class:`IntegerLinear` is built from a frozen fake-quant layer
(quant.layers.QuantLayer) and computes what it computes:

- weights: the per-channel codes minus their zero point, as int8 plus an integer offset per output
  channel where 8-bit asymmetric codes do not fit int8 (kernels.signed_weight); the scales as float32;
- input: the layer's own calibrated activation quantizers (kept as modules: a few scalars each, and
  the timestep-group hook of models/timestep_groups.py reaches them where it reaches the simulated
  ones); a split input (Q-Diffusion's shortcut splitting) runs as one integer call per part, each
  with its own scale, summed in float;
- kernel ``onednn``: activation codes in uint8 and oneDNN's int8 call (with the offsets, one extra
  output channel of ones gives the window sums they multiply); the result equals the
  simulated layer up to float accumulation order (int32 accumulation is exact; the scaling and the
  bias are float32). Kernel ``dequantize``: bit-identical to the simulated layer, on any device.

Pure torch: nothing here knows about diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.layers import QuantConv2d, QuantLayer, QuantLinear, quantize_split_input
from ..quant.quantizers import ActQuantizer
from . import kernels


class _InputSteps:
    """One input part's step sizes and zero points as the simulated quantizer computes with them (one per
    timestep group), as 0-dim tensors for the division and as Python numbers for the kernel call:
    derived once, not on every call."""

    def __init__(self, q: ActQuantizer):
        steps = (q.scale.detach().abs() + 1e-12).reshape(-1)
        zeros = q.zero_point.detach().reshape(-1)
        self.bits, self.timestep_aware = q.bits, q.timestep_aware
        self.steps, self.zeros = list(steps.unbind()), list(zeros.unbind())
        self.step_values, self.zero_values = steps.tolist(), [int(z) for z in zeros.round().tolist()]


class IntegerLayer(nn.Module):
    """Base of :class:`IntegerConv2d` and :class:`IntegerLinear`."""

    is_conv = False

    def __init__(self, qlayer: QuantLayer, kernel: str):
        super().__init__()
        wq = qlayer.weight_quantizer
        if wq is None or wq.mode != "frozen" or not qlayer.use_weight_quant:
            raise ValueError("only a calibrated layer with frozen integer weights can run on the integer runtime")
        out_channels = wq.codes.shape[0]
        zero_point = wq.zero_point.detach().float().reshape(-1).expand(out_channels)
        weight, offset = kernels.signed_weight(wq.codes, zero_point)
        self.weight_bits = wq.bits
        self.register_buffer("weight_scale", wq.scale.detach().float().reshape(-1).expand(out_channels).clone())
        self.register_buffer("weight_offset", offset if bool(offset.ne(0).any()) else None)
        bias = qlayer.layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("weight_int8", weight)
        self.weight_shape = tuple(weight.shape)
        quantized_input = qlayer.use_act_quant and qlayer.act_quantizer is not None
        self.act_quantizer = qlayer.act_quantizer if quantized_input else None
        self.split_quantizer = qlayer.split_quantizer if quantized_input else None
        self.split_at = qlayer.split_at if self.split_quantizer is not None else None
        self.kernel = "dequantize"
        self._packed: list[torch.Tensor] = []
        self._steps: list[_InputSteps] = []
        if kernel == "onednn":
            self._pack()
        self.requires_grad_(False)  # an inference form: the calibrated steps are fixed

    # ---- what the layer can run on -------------------------------------------------------------------
    def onednn_refusal(self) -> str | None:
        """Why oneDNN's int8 kernel cannot compute this layer exactly (None: it can)."""
        if self.weight_int8 is not None and self.weight_int8.device.type != "cpu":
            return f"its weights are on {self.weight_int8.device.type} (oneDNN's int8 kernels are CPU kernels)"
        if self.act_quantizer is None:
            return "its input is not quantized (weight-only precision): an integer kernel needs integer inputs"
        bits = max(q.bits for q in self.act_quantizers())
        if bits > 8:
            return f"its input is quantized to {bits} bits, wider than the kernel's uint8"
        return None

    def act_quantizers(self) -> list[ActQuantizer]:
        return [q for q in (self.act_quantizer, self.split_quantizer) if q is not None]

    def _parts(self) -> list[tuple[slice, ActQuantizer]]:
        if self.split_at is None:
            return [(slice(None), self.act_quantizer)]
        return [(slice(0, self.split_at), self.act_quantizer), (slice(self.split_at, None), self.split_quantizer)]

    def _pack(self) -> None:
        reason = self.onednn_refusal()
        if reason is not None:
            raise ValueError(reason)
        dense = self.weight_int8
        self._call_scale, self._call_bias = self.weight_scale, self.bias
        if self.weight_offset is not None:
            # One more output channel whose weights are all 1: the kernel then also returns, exactly (int32),
            # the sum of x_hat over every output's input window, which the per-channel offsets multiply.
            dense = torch.cat([dense, torch.ones_like(dense[:1])])
            # The layer's scales and bias become views of the kernel's extended ones: one copy in memory.
            channels = self.weight_scale.shape[0]
            self._call_scale = torch.cat([self.weight_scale, self.weight_scale.new_ones(1)])
            self.weight_scale = self._call_scale[:channels]
            bias = self.bias if self.bias is not None else self.weight_scale.new_zeros(channels)
            self._call_bias = torch.cat([bias, bias.new_zeros(1)])
            if self.bias is not None:
                self.bias = self._call_bias[:channels]
        parts = self._parts()
        self._slices = [part for part, _ in parts]
        self._packed = [self._pack_part(dense[:, part].contiguous()) for part in self._slices]
        self._steps = [_InputSteps(q) for _, q in parts]
        self._timestep_aware = any(steps.timestep_aware for steps in self._steps)
        self._w_zero_points = torch.zeros(self._call_scale.shape[0], dtype=torch.int64)  # symmetric int8 weights
        self.weight_int8 = None  # the packed copy is the only one
        self.kernel = "onednn"

    def dense_weight(self) -> torch.Tensor:
        """The int8 weight in plain layout, wherever it is held."""
        if self.weight_int8 is not None:
            return self.weight_int8
        dense = torch.cat([kernels.unpack_weight(p, linear=not self.is_conv) for p in self._packed], dim=1)
        return dense[: self.weight_scale.shape[0]].contiguous()  # without the window-sum channel

    def _apply(self, fn, recurse=True):
        # oneDNN's packed layout cannot be moved or cast: go through the plain int8 weight, and pack
        # again when the layer stays on the CPU.
        packed = self.kernel == "onednn"
        if packed:
            self.weight_int8, self._packed, self.kernel = self.dense_weight(), [], "dequantize"
        super()._apply(fn, recurse)
        if packed and self.weight_int8.device.type == "cpu":
            self._pack()
        return self

    def weight_nbytes(self) -> int:
        """Bytes the weights take in memory: int8 values, scales, offsets, bias."""
        n = sum(p.numel() for p in self._packed) if self._packed else self.weight_int8.numel()
        for t in (self.weight_scale, self.weight_offset, self.bias):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "onednn" or x.device.type != "cpu" or x.dtype != torch.float32:
            return self._forward_dequantized(x)
        if not self._timestep_aware:
            return self._forward_integer(x, 0)
        groups = self._group_index(x)
        if groups is None:
            return self._forward_integer(x, 0)
        first = int(groups[0])
        if bool((groups == first).all()):  # a sampler calls with one timestep for the whole batch
            return self._forward_integer(x, first)
        out = None
        for g in torch.unique(groups).tolist():
            rows = (groups == g).nonzero().flatten()
            part = self._forward_integer(x.index_select(0, rows), int(g))
            if out is None:
                out = part.new_empty((x.shape[0],) + part.shape[1:])
            out[rows] = part
        return out

    def _group_index(self, x: torch.Tensor) -> torch.Tensor | None:
        for q in self.act_quantizers():
            if q.timestep_aware:
                return q._sample_groups(x.new_empty(x.shape[0], 0))
        return None

    def _forward_integer(self, x: torch.Tensor, group: int) -> torch.Tensor:
        out = None
        split = self.split_at is not None
        for i, (part, steps, packed) in enumerate(zip(self._slices, self._steps, self._packed)):
            g = group if steps.timestep_aware else 0
            xp = x[:, part] if split else x
            codes = kernels.activation_codes(xp, steps.steps[g], steps.zeros[g], steps.bits)
            y = self._integer_call(codes, steps.step_values[g], steps.zero_values[g], packed,
                                   self._call_bias if i == 0 else None)
            out = y if out is None else out + y
        if self.weight_offset is not None:
            out = self._apply_offsets(out)
        return out

    def _forward_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """The simulated layer's arithmetic, from the integer weights (bit-identical to it)."""
        if self.act_quantizer is not None:
            x = quantize_split_input(x, self.act_quantizer, self.split_at, self.split_quantizer)
        scale = self.weight_scale.to(x.dtype)
        codes = self.dense_weight().to(scale.dtype)
        if self.weight_offset is not None:
            codes = codes + self.weight_offset.to(scale.dtype).reshape((-1,) + (1,) * (codes.dim() - 1))
        w = codes * scale.reshape((-1,) + (1,) * (codes.dim() - 1))
        return self._float_call(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _pack_part(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _integer_call(self, codes, x_scale, x_zero_point, packed, bias):  # pragma: no cover - abstract
        raise NotImplementedError

    def _float_call(self, x, w, bias):  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply_offsets(self, out):  # pragma: no cover - abstract
        raise NotImplementedError


class IntegerConv2d(IntegerLayer):
    is_conv = True

    def __init__(self, qlayer: QuantConv2d, kernel: str):
        conv = qlayer.layer
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups, self.kernel_size = conv.groups, conv.kernel_size
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.padding_mode = conv.padding_mode
        # stride, padding, dilation as the kernel takes them (lists), built once
        self._geometry = ([list(self.stride), list(self.padding), list(self.dilation)]
                          if not isinstance(conv.padding, str) else None)
        super().__init__(qlayer, kernel)

    def onednn_refusal(self) -> str | None:
        if self.padding_mode != "zeros":
            return f"padding_mode {self.padding_mode!r} (the kernel pads with zeros)"
        if isinstance(self.padding, str):
            return f"padding {self.padding!r} (the kernel takes explicit padding)"
        if self.groups != 1:
            return f"groups={self.groups} (the runtime's integer convolution is for groups=1)"
        return super().onednn_refusal()

    def _pack_part(self, weight):
        return kernels.pack_conv_weight(weight, self._call_scale, self.stride, self.padding, self.dilation, 1)

    def _integer_call(self, codes, x_scale, x_zero_point, packed, bias):
        codes = codes.contiguous(memory_format=torch.channels_last)  # oneDNN's native layout
        return kernels.onednn_conv(codes, x_scale, x_zero_point, packed, self._call_scale, self._w_zero_points, bias,
                                   self._geometry)

    def _float_call(self, x, w, bias):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding(), mode=self.padding_mode)
            return F.conv2d(x, w, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def _reversed_padding(self):
        return [p for p in reversed(self.padding) for _ in range(2)]

    def _apply_offsets(self, out):
        channels = self.weight_scale.shape[0]
        offset_scale = self.weight_scale * self.weight_offset.to(self.weight_scale.dtype)
        return torch.addcmul(out[:, :channels], offset_scale.reshape(1, -1, 1, 1), out[:, channels:])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"w{self.weight_bits}, kernel={self.kernel}")


class IntegerLinear(IntegerLayer):
    def __init__(self, qlayer: QuantLinear, kernel: str):
        self.in_features, self.out_features = qlayer.layer.in_features, qlayer.layer.out_features
        super().__init__(qlayer, kernel)

    def onednn_refusal(self) -> str | None:
        if self.split_at is not None:
            return "its input is split between two quantizers (a convolution's skip concatenation only)"
        return super().onednn_refusal()

    def _pack_part(self, weight):
        return kernels.pack_linear_weight(weight)

    def _integer_call(self, codes, x_scale, x_zero_point, packed, bias):
        return kernels.onednn_linear(codes, x_scale, x_zero_point, packed, self._call_scale, self._w_zero_points, bias)

    def _float_call(self, x, w, bias):
        return F.linear(x, w, bias)

    def _apply_offsets(self, out):
        channels = self.weight_scale.shape[0]
        offset_scale = self.weight_scale * self.weight_offset.to(self.weight_scale.dtype)
        return torch.addcmul(out[..., :channels], offset_scale, out[..., channels:])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w{self.weight_bits}, kernel={self.kernel}"


def integer_layer(qlayer: QuantLayer, kernel: str) -> IntegerLayer:
    cls = IntegerConv2d if isinstance(qlayer, QuantConv2d) else IntegerLinear
    return cls(qlayer, kernel)
