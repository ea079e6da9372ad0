"""Fake-quant wrappers: a Conv2d / Linear whose weight and input activation are quantized,
and the quantized attention core (q, k, v and softmax probabilities each with a quantizer).

Switching quantization off (``use_weight_quant = use_act_quant = False``) makes every
wrapper compute exactly what the wrapped layer computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActQuantizer, WeightQuantizer


class QuantLayer(nn.Module):
    """Base of :class:`QuantConv2d` and :class:`QuantLinear`.

    ``split_at`` (Q-Diffusion's shortcut splitting): the input is a channel concatenation
    [a, b] of two tensors with different ranges; channels ``[:split_at]`` and ``[split_at:]``
    then get separate activation quantizers.
    """

    def __init__(self, layer: nn.Module, weight_quantizer: WeightQuantizer | None,
                 act_quantizer: ActQuantizer | None, split_at: int | None = None,
                 split_quantizer: ActQuantizer | None = None):
        super().__init__()
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.split_at = split_at
        self.split_quantizer = split_quantizer if split_at else None
        self.use_weight_quant = False
        self.use_act_quant = False

    # The wrapped layer's attributes stay reachable (diffusers reads e.g. ``conv.weight``).
    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def act_quantizers(self) -> list[ActQuantizer]:
        return [q for q in (self.act_quantizer, self.split_quantizer) if q is not None]

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.layer.weight)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_quantizer is None:
            return self.act_quantizer(x)
        a, b = x[:, : self.split_at], x[:, self.split_at :]
        return torch.cat([self.act_quantizer(a), self.split_quantizer(b)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_act_quant and self.act_quantizer is not None:
            x = self.quantize_input(x)
        w = self.quantized_weight() if self.use_weight_quant and self.weight_quantizer is not None else self.layer.weight
        return self._layer_forward(x, w)

    def _layer_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class QuantConv2d(QuantLayer):
    def _layer_forward(self, x, w):
        # _conv_forward keeps the layer's padding mode, stride, dilation and groups.
        return self.layer._conv_forward(x, w, self.layer.bias)

    @property
    def in_channels(self):
        return self.layer.in_channels

    @property
    def out_channels(self):
        return self.layer.out_channels


class QuantLinear(QuantLayer):
    def _layer_forward(self, x, w):
        return F.linear(x, w, self.layer.bias)

    @property
    def in_features(self):
        return self.layer.in_features

    @property
    def out_features(self):
        return self.layer.out_features


class QuantAttentionCore(nn.Module):
    """softmax(Q K^T * scale) V with quantized Q, K, V and probabilities (unsigned)."""

    def __init__(self, bits: int, prob_bits: int | None = None, momentum: float = 0.95, symmetric: bool = False,
                 range_method: str = "ema", num_groups: int = 1):
        super().__init__()
        kw = dict(momentum=momentum, range_method=range_method, num_groups=num_groups)
        self.q_quantizer = ActQuantizer(bits, symmetric=symmetric, **kw)
        self.k_quantizer = ActQuantizer(bits, symmetric=symmetric, **kw)
        self.v_quantizer = ActQuantizer(bits, symmetric=symmetric, **kw)
        self.prob_quantizer = ActQuantizer(prob_bits or bits, unsigned=True, **kw)
        self.use_act_quant = False

    def act_quantizers(self) -> list[ActQuantizer]:
        return [self.q_quantizer, self.k_quantizer, self.v_quantizer, self.prob_quantizer]

    def forward(self, q, k, v, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v: [batch, heads, tokens, head_dim]."""
        q, k, v = self.q_quantizer(q), self.k_quantizer(k), self.v_quantizer(v)
        scores = (q @ k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + mask
        probs = self.prob_quantizer(scores.softmax(dim=-1))
        return probs @ v
