"""Fake-quant wrappers: a Conv2d / Linear whose weight and input activation are quantized,
and the quantized attention core (q, k, v and softmax probabilities each with a quantizer).

Switching quantization off (``use_weight_quant = use_act_quant = False``) makes every
wrapper compute exactly what the wrapped layer computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .quantizers import ActQuantizer, WeightQuantizer, fake_quantize


def quantize_split_input(x: torch.Tensor, act_quantizer: ActQuantizer, split_at: int | None,
                         split_quantizer: ActQuantizer | None) -> torch.Tensor:
    """``x`` fake-quantized by ``act_quantizer``; with a split, channels ``[:split_at]`` by it and the
    rest by ``split_quantizer`` (Q-Diffusion's shortcut splitting)."""
    if split_quantizer is None:
        return act_quantizer(x)
    return torch.cat([act_quantizer(x[:, :split_at]), split_quantizer(x[:, split_at:])], dim=1)


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
        return quantize_split_input(x, self.act_quantizer, self.split_at, self.split_quantizer)

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


# Temporaries of one (sample, head) slice of the attention map alive at once in a chunk's forward and
# backward: scores, probabilities, x / s, its rounding, the clamped codes, the quantized probabilities
# and the incoming gradient, with margin. The chunk size divides the memory budget by this.
ATTENTION_WORKING_COPIES = 8


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient. The gradient of k (or q, v) is one
    strided tensor when the attention runs whole and a concatenation when it runs in chunks; the
    quantizer's step-size gradient reduces it, and a reduction's float order follows the memory
    layout, so the layout is made the same either way."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _chunk_attention(q, k, v, scale: float, mask, step, zero_point, bits: int):
    """softmax(q k^T * scale + mask) quantized with (step, zero_point), times v, for a chunk of
    (sample, head) rows. Pure: every tensor comes in as an argument, so the recomputation of a
    checkpointed chunk in the backward pass sees the same parameters (also under functional_call)."""
    scores = q @ k.transpose(-1, -2)
    if torch.is_grad_enabled():
        scores = scores * scale
        if mask is not None:
            scores = scores + mask
    else:  # the same values, without two more attention-map-sized temporaries
        scores.mul_(scale)
        if mask is not None:
            scores.add_(mask)
    probs = scores.softmax(dim=-1)
    if step is not None:
        probs = fake_quantize(probs, step, zero_point, bits)
    return probs @ v


class QuantAttentionCore(nn.Module):
    """softmax(Q K^T * scale) V with quantized Q, K, V and probabilities (unsigned).

    Bounded memory: with ``max_chunk_bytes`` set, the (sample, head) slices of the attention map are
    computed a chunk at a time, each chunk under activation checkpointing (only its inputs are kept;
    the backward recomputes it), so the map never exists whole. Slices are independent — softmax
    normalises rows, and the gradients of q, k and v of a slice depend on that slice alone — so the
    chunked result equals the whole computation bit for bit, forward and backward. The one sum across
    slices, the gradient of the probabilities' learned step size, is made order-independent by
    giving every slice its own (broadcast) copy of the step: each slice's contribution is reduced
    over that slice alone and the slices' contributions are summed in one reduction, whichever
    chunking produced them. (Chunking over query rows inside a slice would make the gradients of k,
    v and the step sums over chunks, whose float order depends on the chunk size.)
    """

    def __init__(self, bits: int, prob_bits: int | None = None, momentum: float = 0.95, symmetric: bool = False,
                 range_method: str = "ema", num_groups: int = 1, max_chunk_bytes: int | None = None):
        super().__init__()
        kw = dict(momentum=momentum, range_method=range_method, num_groups=num_groups)
        self.q_quantizer = ActQuantizer(bits, symmetric=symmetric, **kw)
        self.k_quantizer = ActQuantizer(bits, symmetric=symmetric, **kw)
        self.v_quantizer = ActQuantizer(bits, symmetric=symmetric, **kw)
        self.prob_quantizer = ActQuantizer(prob_bits or bits, unsigned=True, **kw)
        self.use_act_quant = False
        self.max_chunk_bytes = max_chunk_bytes  # None: the whole attention map at once

    def act_quantizers(self) -> list[ActQuantizer]:
        return [self.q_quantizer, self.k_quantizer, self.v_quantizer, self.prob_quantizer]

    def chunk_rows(self, rows: int, q_tokens: int, k_tokens: int, element_size: int) -> int:
        """(sample, head) slices per chunk under ``max_chunk_bytes`` (at least one)."""
        if self.max_chunk_bytes is None:
            return rows
        per_slice = ATTENTION_WORKING_COPIES * q_tokens * k_tokens * element_size
        return max(1, min(rows, self.max_chunk_bytes // per_slice))

    def forward(self, q, k, v, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v: [batch, heads, tokens, head_dim]; mask broadcastable to [batch, heads, q tokens, k tokens]."""
        q, k, v = self.q_quantizer(q), self.k_quantizer(k), self.v_quantizer(v)
        batch, heads, tq, dh = q.shape
        tk = k.shape[2]
        rows = batch * heads
        # [batch * heads, tokens, head_dim]: sample-major rows, what timestep-aware quantizers expect.
        qf, kf, vf = (_ContiguousGrad.apply(t.reshape(rows, t.shape[2], t.shape[3])) for t in (q, k, v))
        maskf = None
        if mask is not None:
            maskf = mask.expand(batch, heads, mask.shape[-2], mask.shape[-1]).reshape(rows, mask.shape[-2], tk)
        pq = self.prob_quantizer
        step = zero_point = None
        if pq.observing:
            out = self._observe(qf, kf, vf, scale, maskf, rows, tq, tk)
        else:
            if pq.is_initialized:
                step, zero_point = pq.step_per_row(rows)
            out = self._compute(qf, kf, vf, scale, maskf, step, zero_point, pq.bits, rows, tq, tk)
        return out.reshape(batch, heads, tq, v.shape[-1])

    def _compute(self, q, k, v, scale, mask, step, zero_point, bits, rows, tq, tk):
        n = self.chunk_rows(rows, tq, tk, q.element_size())
        if n >= rows:
            return _chunk_attention(q, k, v, scale, mask, step, zero_point, bits)
        outs = []
        for start in range(0, rows, n):
            sl = slice(start, start + n)
            args = (q[sl], k[sl], v[sl], scale, None if mask is None else mask[sl],
                    None if step is None else step[sl], None if zero_point is None else zero_point[sl], bits)
            if torch.is_grad_enabled():
                outs.append(checkpoint(_chunk_attention, *args, use_reentrant=False))
            else:
                outs.append(_chunk_attention(*args))
        return torch.cat(outs)

    @torch.no_grad()
    def _observe(self, q, k, v, scale, mask, rows, tq, tk):
        """Observing pass: the probability quantizer sees every chunk's probabilities as one tensor
        (ActQuantizer.observe_parts: the statistics of the whole map, not an EMA over chunks)."""
        n = self.chunk_rows(rows, tq, tk, q.element_size())
        parts, outs = [], []
        for start in range(0, rows, n):
            sl = slice(start, start + n)
            scores = (q[sl] @ k[sl].transpose(-1, -2)) * scale
            if mask is not None:
                scores = scores + mask[sl]
            probs = scores.softmax(dim=-1)
            parts.append(self.prob_quantizer.part_summary(probs, start, rows))
            outs.append(probs @ v[sl])
        self.prob_quantizer.observe_parts(parts)
        return torch.cat(outs)
