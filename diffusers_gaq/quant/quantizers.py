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
    level outside it.

    Without autograd the same operations run in place on one temporary: the values are identical
    (round_ste's forward is round: v + (round(v) - v) is exact in floating point)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        return x.div(scale).round_().add_(zero_point).clamp_(0, 2**bits - 1).sub_(zero_point).mul_(scale)
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


ACT_RANGE_METHODS = ("ema", "minmax", "percentile", "mse")


def _subsample(x: torch.Tensor, k: int) -> torch.Tensor:
    """k evenly strided values of x, plus its extremes (deterministic and cheap)."""
    flat = x.detach().flatten().float()
    if flat.numel() <= k:
        return flat
    return torch.cat([flat[_strided_indices(flat.numel(), k, flat.device)], flat.min().reshape(1),
                      flat.max().reshape(1)])


def _strided_indices(n: int, k: int, device) -> torch.Tensor:
    """k evenly strided indices into n values. The float32 linspace rounds n - 1 up past the end for
    some n > 2^24 (a minibatch of 8 at Stable Diffusion's size); clamping fixes that and leaves every
    index that was in range as it was."""
    return torch.linspace(0, n - 1, k, device=device).long().clamp_(max=n - 1)


@torch.no_grad()
def mse_range(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
              p: float = 2.0, grid: int = 100, step: float = 0.008):
    """Shrink [lo, hi] to [r*lo, r*hi], r = 1, 0.992, ..., and keep the r whose quantization error
    ||Q(x) - x||_p over ``values`` is smallest (the weights' search, on observed activations)."""
    best_err, best = math.inf, (lo, hi)
    for i in range(grid):
        r = 1.0 - i * step
        if r <= 0:
            break
        scale, zp = scale_from_range(lo * r, hi * r, bits, symmetric)
        err = (fake_quantize(values, scale, zp, bits) - values).abs().pow(p).sum().item()
        if err < best_err:
            best_err, best = err, (lo * r, hi * r)
    return best


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer: a range observed over the calibration inputs, then a
    learnable step size (LSQ).

    ``unsigned=True`` pins the range at 0 (softmax probabilities). Modes: ``observing`` passes the
    input through and records range statistics; :meth:`finalize` turns them into a step size and
    zero point (``range_method``: "ema" of per-batch min/max with ``momentum``, global "minmax",
    "percentile" (0.01 / 99.99 %), or an "mse" search of the clipping range), after which the
    quantizer quantizes.

    ``num_groups > 1`` makes the quantizer timestep-aware (TFMQ-DM's per-timestep calibration of
    temporal features): one step size and zero point per timestep group, each calibrated and
    learned on its own group's samples. Before every forward the caller sets :attr:`group_index`,
    the group of each sample of the batch (models/timestep_groups.py does it from the timestep the
    denoiser is called with).
    """

    POOL = 4096  # values kept per observed batch (per group) for the percentile / MSE ranges

    def __init__(self, bits: int, symmetric: bool = False, unsigned: bool = False, momentum: float = 0.95,
                 range_method: str = "ema", num_groups: int = 1):
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"activation bits must be in 2..16, got {bits}")
        if range_method not in ACT_RANGE_METHODS:
            raise ValueError(f"activation range method must be one of {ACT_RANGE_METHODS}, got {range_method!r}")
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.bits, self.symmetric, self.unsigned, self.momentum = bits, symmetric, unsigned, momentum
        self.range_method, self.num_groups = range_method, num_groups
        self.observing = False
        self.group_index: torch.Tensor | None = None
        shape = () if num_groups == 1 else (num_groups,)
        self.register_buffer("running_min", torch.full(shape, math.inf))
        self.register_buffer("running_max", torch.full(shape, -math.inf))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.is_initialized = False  # the buffer as a bool for forward: no sync, no torch.compile graph break
        self.scale = nn.Parameter(torch.ones(shape))
        self._pool: list[list[torch.Tensor]] = [[] for _ in range(num_groups)]
        self._global: list[list[float]] = [[math.inf, -math.inf] for _ in range(num_groups)]

    @property
    def timestep_aware(self) -> bool:
        return self.num_groups > 1

    def _sample_groups(self, x: torch.Tensor) -> torch.Tensor:
        """The group of every row of ``x`` (rows may be samples x heads, sample-major)."""
        g = self.group_index
        if g is None:
            raise RuntimeError("timestep-aware activation quantizer called without a timestep group: call the "
                               "quantized model itself (it sets the group from its timestep argument)")
        g = g.to(x.device)
        if len(g) != x.shape[0]:
            if x.shape[0] % len(g):
                raise RuntimeError(f"activation batch {x.shape[0]} does not fit the {len(g)} timestep groups set")
            g = g.repeat_interleave(x.shape[0] // len(g))
        return g

    @torch.no_grad()
    def _observe_group(self, g: int, x: torch.Tensor) -> None:
        pool = _subsample(x, self.POOL) if self.range_method in ("percentile", "mse") else None
        self._record(g, x.min().float(), x.max().float(), pool)

    @torch.no_grad()
    def _record(self, g: int, lo: torch.Tensor, hi: torch.Tensor, pool: torch.Tensor | None) -> None:
        rmin, rmax = self.running_min.view(-1), self.running_max.view(-1)
        if not torch.isfinite(rmin[g]):
            rmin[g], rmax[g] = lo, hi
        else:
            rmin[g] = self.momentum * rmin[g] + (1 - self.momentum) * lo
            rmax[g] = self.momentum * rmax[g] + (1 - self.momentum) * hi
        self._global[g] = [min(self._global[g][0], lo.item()), max(self._global[g][1], hi.item())]
        if pool is not None:
            self._pool[g].append(pool.cpu())

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not self.timestep_aware:
            self._observe_group(0, x)
            return
        groups = self._sample_groups(x)
        for g in torch.unique(groups).tolist():
            self._observe_group(int(g), x[groups == g])

    # ---- observing a tensor that exists only in parts (chunked attention maps) -------------------
    @torch.no_grad()
    def part_summary(self, part: torch.Tensor, start: int, rows: int) -> dict:
        """What :meth:`observe` would take from rows ``start:start + len(part)`` of a ``rows``-row
        tensor that is never built whole: per timestep group, the part's min, max and its share of
        the evenly strided pool (the indices ``_subsample`` picks from the whole group's values)."""
        part = part.detach()
        per_row = part[0].numel() if len(part) else 0
        if self.timestep_aware:
            groups = self._sample_groups(part.new_empty(rows, 0))
        else:
            groups = torch.zeros(rows, dtype=torch.long, device=part.device)
        mine = groups[start : start + len(part)]
        pooled = self.range_method in ("percentile", "mse")
        out = {}
        for g in torch.unique(mine).tolist():
            in_part = mine == g
            xs = part[in_part].flatten().float()
            entry = {"lo": xs.min(), "hi": xs.max(), "pool": None, "subsampled": False}
            if pooled:
                total = int((groups == g).sum()) * per_row
                first = int((groups[:start] == g).sum()) * per_row  # the group's values before this part
                if total <= self.POOL:
                    entry["pool"] = xs
                else:
                    entry["subsampled"] = True
                    idx = _strided_indices(total, self.POOL, part.device) - first
                    entry["pool"] = xs[idx[(idx >= 0) & (idx < xs.numel())]]
            out[int(g)] = entry
        return out

    @torch.no_grad()
    def observe_parts(self, summaries: list[dict]) -> None:
        """Observe the tensor whose parts :meth:`part_summary` summarised, in order: exactly what
        :meth:`observe` records for the whole tensor (min / max are exact; the pool holds the same
        strided values and extremes)."""
        for g in sorted({g for s in summaries for g in s}):
            entries = [s[g] for s in summaries if g in s]
            lo = torch.stack([e["lo"] for e in entries]).min()
            hi = torch.stack([e["hi"] for e in entries]).max()
            pool = None
            if entries[0]["pool"] is not None:
                pool = torch.cat([e["pool"] for e in entries])
                if entries[0]["subsampled"]:  # _subsample appends the extremes when it subsamples
                    pool = torch.cat([pool, lo.reshape(1), hi.reshape(1)])
            self._record(g, lo, hi, pool)

    def step_per_row(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step size and zero point as [rows, 1, 1] tensors (one per sample-major row of a
        [rows, ..., ...] tensor; timestep-aware: each row its sample's group), for callers that
        quantize a tensor in row chunks: each row then has its own broadcast copy of the step, so
        the step's gradient is a per-row reduction followed by one sum over rows, whatever the chunks."""
        scale, zero_point = self.scale.abs() + 1e-12, self.zero_point
        if self.timestep_aware:
            g = self._sample_groups(scale.new_empty(rows, 0))
            scale, zero_point = scale[g], zero_point[g]
        else:
            scale, zero_point = scale.expand(rows), zero_point.expand(rows)
        return scale.reshape(rows, 1, 1), zero_point.reshape(rows, 1, 1)

    @torch.no_grad()
    def _group_range(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        rmin, rmax = self.running_min.view(-1)[g], self.running_max.view(-1)[g]
        if self.range_method == "ema":
            return rmin, rmax
        lo, hi = torch.tensor(self._global[g][0]), torch.tensor(self._global[g][1])
        if self.range_method == "minmax":
            return lo, hi
        values = torch.cat(self._pool[g])
        if self.range_method == "percentile":
            q = torch.quantile(values, torch.tensor([1e-4, 1 - 1e-4]))
            return q[0], q[1]
        if self.unsigned:
            lo = torch.zeros(())
        return mse_range(values, lo, hi, self.bits, self.symmetric and not self.unsigned)

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the observed range(s) into step size(s) and zero point(s); stop observing."""
        rmin = self.running_min.view(-1)
        missing = [g for g in range(self.num_groups) if not torch.isfinite(rmin[g])]
        if missing:
            what = "any data" if len(missing) == self.num_groups else f"data of timestep group(s) {missing}"
            raise RuntimeError(f"activation quantizer finalised before observing {what}")
        pairs = []
        for g in range(self.num_groups):
            lo, hi = self._group_range(g)
            lo = torch.zeros(()) if self.unsigned else lo
            pairs.append(scale_from_range(lo, hi, self.bits, self.symmetric and not self.unsigned))
        scales, zps = zip(*pairs)
        self.scale.data.copy_(torch.stack(scales).reshape(self.scale.shape))
        self.zero_point.copy_(torch.stack(zps).reshape(self.zero_point.shape))
        self.initialized.fill_(True)
        self.is_initialized = True
        self.observing = False
        # The pooled values and global extremes belong to this pass: a later observing pass must not reuse them.
        self._pool = [[] for _ in range(self.num_groups)]
        self._global = [[math.inf, -math.inf] for _ in range(self.num_groups)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # keeps is_initialized = the buffer
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.is_initialized = bool(self.initialized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not self.is_initialized:
            return x
        scale, zero_point = self.scale.abs() + 1e-12, self.zero_point
        if self.timestep_aware:
            g = self._sample_groups(x)
            view = (-1,) + (1,) * (x.dim() - 1)
            scale, zero_point = scale[g].reshape(view), zero_point[g].reshape(view)
        return fake_quantize(x, scale, zero_point, self.bits)

    def extra_repr(self) -> str:
        kind = "unsigned" if self.unsigned else ("symmetric" if self.symmetric else "asymmetric")
        groups = f", timestep_groups={self.num_groups}" if self.timestep_aware else ""
        return f"bits={self.bits}, {kind}, range={self.range_method}{groups}"


def set_group_index(module: nn.Module, group_index: torch.Tensor | None) -> None:
    """Tell every timestep-aware activation quantizer under ``module`` the group of each sample of
    the next batch (``None`` clears it)."""
    for m in module.modules():
        if isinstance(m, ActQuantizer) and m.timestep_aware:
            m.group_index = group_index


def has_timestep_aware(module: nn.Module) -> bool:
    return any(isinstance(m, ActQuantizer) and m.timestep_aware for m in module.modules())
