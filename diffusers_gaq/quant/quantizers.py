"""Uniform affine quantizers: weights (round-to-nearest or AdaRound) and activations (EMA + LSQ).

Every quantizer here uses unsigned integer codes q in [0, 2^b - 1] with an integer zero
point z, so that x_hat = s * (q - z). A symmetric quantizer is the special case
z = 2^(b-1), which makes packing and export uniform (codes - 2^(b-1) is the signed int).

Pure torch: nothing here knows about diffusers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# AdaRound's rectified sigmoid stretch (Nagel et al., 2020).
ZETA, GAMMA = 1.1, -0.1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (d round(x)/dx := 1)."""
    return x + (x.round() - x).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """s * (clamp(round(x/s) + z, 0, 2^b-1) - z) with STE rounding; the gradient w.r.t. ``scale``
    is then exactly LSQ's (Esser et al., 2020): round(x/s) - x/s inside the range, the clip
    level outside it."""
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, 2**bits - 1)
    return (q - zero_point) * scale


def _reduce_dims(x: torch.Tensor, per_channel: bool) -> tuple[int, ...]:
    return tuple(range(1, x.dim())) if per_channel else tuple(range(x.dim()))


def scale_from_range(x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool):
    """Scale and integer zero point that map [x_min, x_max] (widened to include 0) onto the codes."""
    levels = 2**bits - 1
    x_min = torch.clamp(x_min, max=0.0)
    x_max = torch.clamp(x_max, min=0.0)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = torch.maximum(-x_min / half, x_max / (half - 1))
        scale = torch.clamp(scale, min=1e-8)
        zero_point = torch.full_like(scale, float(half))
    else:
        scale = torch.clamp((x_max - x_min) / levels, min=1e-8)
        zero_point = torch.clamp(torch.round(-x_min / scale), 0, levels)
    return scale, zero_point


def minmax_scale(w: torch.Tensor, bits: int, per_channel: bool = True, symmetric: bool = False):
    dims = _reduce_dims(w, per_channel)
    return scale_from_range(w.amin(dim=dims), w.amax(dim=dims), bits, symmetric)


@torch.no_grad()
def mse_scale(w: torch.Tensor, bits: int, per_channel: bool = True, symmetric: bool = False,
              p: float = 2.4, grid: int = 80, step: float = 0.01):
    """Search shrunken clipping ranges [r*min, r*max], r = 1, 0.99, ... and keep, per channel,
    the one with the smallest Lp quantization error (Q-Diffusion's weight initialisation)."""
    dims = _reduce_dims(w, per_channel)
    w_min, w_max = w.amin(dim=dims), w.amax(dim=dims)
    shape = (-1,) + (1,) * (w.dim() - 1) if per_channel else ()
    best_err = torch.full_like(w_min, math.inf)
    best_scale, best_zp = scale_from_range(w_min, w_max, bits, symmetric)
    for i in range(grid):
        r = 1.0 - i * step
        scale, zp = scale_from_range(w_min * r, w_max * r, bits, symmetric)
        err = (fake_quantize(w, scale.reshape(shape), zp.reshape(shape), bits) - w).abs().pow(p)
        err = err.sum(dim=dims) if dims else err.sum()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


class WeightQuantizer(nn.Module):
    """Per-channel (or per-tensor) affine weight quantizer with three modes:

    - ``"nearest"``: round to nearest, computed from the live weight;
    - ``"adaround"``: learnable rounding w_q = s*(clamp(floor(w/s) + h(V) + z) - z),
      h(V) = clamp(sigmoid(V)*(zeta-gamma)+gamma, 0, 1);
    - ``"frozen"``: integer codes stored in ``codes`` (after :meth:`harden`, or loaded from a
      checkpoint); the float weight is no longer consulted.
    """

    def __init__(self, bits: int, per_channel: bool = True, symmetric: bool = False, init: str = "mse"):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"weight bits must be in 2..8, got {bits}")
        self.bits, self.per_channel, self.symmetric, self.init_method = bits, per_channel, symmetric, init
        self.mode = "nearest"
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("w_floor", None)
        self.register_buffer("codes", None)
        self.alpha: nn.Parameter | None = None  # AdaRound's V

    def _view(self, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + (1,) * (w.dim() - 1)) if t.dim() == 1 else t

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor) -> None:
        """Set scale and zero point from the weight (MSE search or min-max)."""
        fn = mse_scale if self.init_method == "mse" else minmax_scale
        scale, zero_point = fn(w.detach(), self.bits, self.per_channel, self.symmetric)
        self.scale, self.zero_point = scale, zero_point

    @torch.no_grad()
    def start_adaround(self, w: torch.Tensor) -> nn.Parameter:
        """Switch to learnable rounding, V initialised so that h(V) equals the rounding remainder."""
        x = w.detach() / self._view(self.scale, w)
        self.w_floor = torch.floor(x)
        rest = (x - self.w_floor).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.mode = "adaround"
        return self.alpha

    def soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h(V) - 1|^beta): pushes every h(V) to 0 or 1 as beta anneals down."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self, w: torch.Tensor | None = None) -> None:
        """Fix the integer codes: AdaRound's h(V) >= 0.5 (i.e. V >= 0) rounds up; in nearest mode, round."""
        if self.mode == "adaround":
            q = self.w_floor + (self.alpha >= 0).to(self.w_floor.dtype)
        elif self.mode == "nearest":
            if w is None:
                raise ValueError("harden() in nearest mode needs the weight")
            q = torch.round(w.detach() / self._view(self.scale, w))
        else:
            return
        zp = self._view(self.zero_point, q)
        self.codes = torch.clamp(q + zp, 0, 2**self.bits - 1).to(torch.uint8)
        self.alpha, self.w_floor, self.mode = None, None, "frozen"

    def load_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.codes, self.scale, self.zero_point, self.mode = codes.to(torch.uint8), scale, zero_point, "frozen"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zp = self._view(self.scale, w), self._view(self.zero_point, w)
        if self.mode == "frozen":
            return (self.codes.to(scale.dtype) - zp) * scale
        if self.mode == "adaround":
            q = torch.clamp(self.w_floor + self.soft_rounding() + zp, 0, 2**self.bits - 1)
            return (q - zp) * scale
        return fake_quantize(w, scale, zp, self.bits)

    def extra_repr(self) -> str:
        gran = "per_channel" if self.per_channel else "per_tensor"
        return f"bits={self.bits}, {gran}, symmetric={self.symmetric}, mode={self.mode}"


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer: EMA min/max initialisation, then a learnable step size (LSQ).

    ``unsigned=True`` pins the range at 0 (softmax probabilities). Modes: ``observing`` passes the
    input through and updates the EMA; after :meth:`finalize` the quantizer quantizes.
    """

    def __init__(self, bits: int, symmetric: bool = False, unsigned: bool = False, momentum: float = 0.95):
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"activation bits must be in 2..16, got {bits}")
        self.bits, self.symmetric, self.unsigned, self.momentum = bits, symmetric, unsigned, momentum
        self.observing = False
        self.register_buffer("running_min", torch.tensor(math.inf))
        self.register_buffer("running_max", torch.tensor(-math.inf))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))
        self.scale = nn.Parameter(torch.ones(()))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if not torch.isfinite(self.running_min):
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
        else:
            self.running_min.mul_(self.momentum).add_((1 - self.momentum) * lo)
            self.running_max.mul_(self.momentum).add_((1 - self.momentum) * hi)

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the observed range into a step size and zero point; stop observing."""
        if not torch.isfinite(self.running_min):
            raise RuntimeError("activation quantizer finalised before observing any data")
        lo = torch.zeros(()) if self.unsigned else self.running_min
        scale, zp = scale_from_range(lo, self.running_max, self.bits, self.symmetric and not self.unsigned)
        self.scale.data.copy_(scale)
        self.zero_point.copy_(zp)
        self.initialized.fill_(True)
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not bool(self.initialized):
            return x
        return fake_quantize(x, self.scale.abs() + 1e-12, self.zero_point, self.bits)

    def extra_repr(self) -> str:
        kind = "unsigned" if self.unsigned else ("symmetric" if self.symmetric else "asymmetric")
        return f"bits={self.bits}, {kind}"
