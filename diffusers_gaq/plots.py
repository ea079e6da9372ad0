"""Figures for model cards and evaluation reports.

Everything here draws on ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, never
through ``pyplot``: pyplot keeps a global registry of open figures (and may pick an interactive
backend), which leaks memory in long processes and breaks on machines without a display.
Files are written atomically, so a crash never leaves a half-written PNG beside a model card.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .files import atomic_path

logger = logging.getLogger(__name__)

# More panels than this make unreadable thumbnails on a model card; callers may ask for more.
DEFAULT_MAX_UNITS = 8
DEFAULT_MAX_CONFLICT_UNITS = 4  # two heatmaps each
_PANEL_INCHES = (3.0, 2.3)
_DPI = 110


# ---- shared helpers ---------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches an Agg canvas: no pyplot, no display needed
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        # The temporary name ends in ".tmp": name the format explicitly.
        fig.savefig(tmp, format="png")
    logger.info("wrote %s", path)
    return path


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _select_units(report, units, has, limit: int = DEFAULT_MAX_UNITS) -> list:
    """The UnitReports to draw: those named / indexed in ``units`` (all must qualify), or, when
    ``units`` is None, up to ``limit`` of them evenly spread over the network (first and last included)."""
    candidates = [u for u in report.units if has(u)]
    if units is None:
        if len(candidates) <= limit:
            return candidates
        step = (len(candidates) - 1) / (limit - 1)
        return [candidates[round(i * step)] for i in range(limit)]
    by_name = {u.name: u for u in report.units}
    chosen = []
    for key in ([units] if isinstance(units, (str, int)) else units):
        in_range = isinstance(key, int) and -len(report.units) <= key < len(report.units)
        unit = (report.units[key] if in_range else None) if isinstance(key, int) else by_name.get(key)
        if unit is None:
            raise ValueError(f"no calibration unit named {key!r}; units: {', '.join(by_name) or '(none)'}")
        if not has(unit):
            raise ValueError(f"unit {unit.name!r} has no data for this plot")
        chosen.append(unit)
    return chosen


def _timestep_stats(timesteps: torch.Tensor, omega: torch.Tensor):
    """Per distinct timestep (ascending): mean, min and max of the weights of its samples."""
    ts = timesteps.flatten().long()
    omega = omega.flatten().float()
    if len(ts) != len(omega):
        raise ValueError(f"report holds {len(ts)} training timesteps but {len(omega)} sample weights")
    uniq = torch.unique(ts)
    stats = [(omega[ts == t].mean().item(), omega[ts == t].min().item(), omega[ts == t].max().item()) for t in uniq]
    mean, lo, hi = zip(*stats) if stats else ((), (), ())
    return uniq.tolist(), list(mean), list(lo), list(hi)


# ---- sample weights ---------------------------------------------------------------------------
def plot_sample_weights(report, path: str | os.PathLike, units: Iterable[str | int] | str | int | None = None) -> Path:
    """Learned sample weight omega against diffusion timestep, one small panel per unit.

    Each panel shows the mean weight of the calibration samples at each timestep and a band
    from the smallest to the largest weight there; the dashed line at 1 is uniform weighting
    (omega sums to the number of samples, so its mean is 1)."""
    if report is None or report.train_timesteps is None:
        raise ValueError("the calibration report has no training timesteps; cannot plot sample weights")
    chosen = _select_units(report, units, lambda u: u.omega is not None)
    if not chosen:
        raise ValueError("no calibration unit recorded sample weights (omega)")
    rows, cols = _grid(len(chosen))
    fig = _new_figure(cols * _PANEL_INCHES[0], rows * _PANEL_INCHES[1] + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for ax, unit in zip(axes.flat, chosen):
        ts, mean, lo, hi = _timestep_stats(report.train_timesteps, unit.omega)
        ax.fill_between(ts, lo, hi, alpha=0.25, color="tab:blue", linewidth=0, label="min-max")
        ax.plot(ts, mean, marker="o", markersize=3, color="tab:blue", label="mean")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8, label="uniform")
        ax.set_title(unit.name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("timestep", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("weight ω", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="best")
    fig.suptitle("Learned calibration sample weights by timestep", fontsize=10)
    return _save(fig, path)


# ---- gradient conflict ------------------------------------------------------------------------
def _group_labels(report, num_groups: int) -> list[str]:
    """"t=999-800"-style labels for the T consecutive timestep groups, as calibration formed
    them (group = step_index * T // S over S calibration steps); plain indices when unknown."""
    ts, idx = report.train_timesteps, report.train_step_index
    if ts is None or idx is None or len(ts) == 0:
        return [str(g) for g in range(num_groups)]
    steps = int(idx.max()) + 1
    group = idx.long() * num_groups // steps
    labels = []
    for g in range(num_groups):
        members = ts[group == g]
        if not len(members):
            labels.append(str(g))
        else:
            hi, lo = int(members.max()), int(members.min())
            labels.append(f"{hi}-{lo}" if hi != lo else str(hi))
    return labels


def _has_conflict(unit) -> bool:
    return unit.conflict_before is not None or unit.conflict_after is not None


def plot_conflict(report, path: str | os.PathLike, units: Iterable[str | int] | str | int | None = None) -> Path:
    """Heatmaps of the T x T cosine similarity between timestep-group gradients, one column per
    unit: top row with uniform weights (before), bottom row with the learned weights (after).
    Negative cells are groups whose gradients conflict.

    Raises ValueError when no unit recorded the matrices (calibration runs without
    ``record_conflict=True`` do not compute them)."""
    if report is None or not any(_has_conflict(u) for u in report.units):
        raise ValueError("no gradient-conflict matrices were recorded in this calibration report; "
                         "run quantize_pipeline(..., record_conflict=True) to record them")
    chosen = _select_units(report, units, _has_conflict, limit=DEFAULT_MAX_CONFLICT_UNITS)
    fig = _new_figure(len(chosen) * 2.6 + 1.0, 2 * 2.6 + 0.5)
    axes = fig.subplots(2, len(chosen), squeeze=False)
    image = None
    for col, unit in enumerate(chosen):
        for row, (label, matrix) in enumerate((("uniform weights", unit.conflict_before),
                                               ("learned weights", unit.conflict_after))):
            ax = axes[row, col]
            ax.set_title(f"{unit.name}\n{label}", fontsize=7)
            if matrix is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
                continue
            m = matrix.detach().float().cpu()
            image = ax.imshow(m.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
            labels = _group_labels(report, m.shape[0])
            ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=6)
            ax.set_yticks(range(len(labels)), labels if col == 0 else [], fontsize=6)
            if m.shape[0] <= 6:  # numbers stay legible on small matrices only (the paper uses T = 5)
                for i in range(m.shape[0]):
                    for j in range(m.shape[1]):
                        value = float(m[i, j])
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5,
                                color="white" if abs(value) > 0.6 else "black")  # legible on dark cells
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.7, label="cosine similarity")
    fig.suptitle("Gradient alignment across timestep groups (labels: timestep ranges)", fontsize=9)
    return _save(fig, path)


# ---- fidelity ---------------------------------------------------------------------------------
def _bits_label(bits) -> str:
    return str(bits) if not isinstance(bits, int) else f"W{bits}"


def plot_fidelity_bars(rows: Sequence[dict], path: str | os.PathLike, metric: str) -> Path:
    """Grouped bar chart of ``metric``: one group per bit width, one bar per method.

    ``rows``: dicts with keys ``method``, ``bits`` (e.g. "W4A8" or 4), ``value`` and optionally
    ``err`` (drawn as an error bar). Groups and methods keep their order of first appearance."""
    if not rows:
        raise ValueError("plot_fidelity_bars needs at least one row")
    for i, row in enumerate(rows):
        missing = [k for k in ("method", "bits", "value") if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks {missing}; each row needs method, bits, value (and optional err)")
    bit_groups = list(dict.fromkeys(_bits_label(r["bits"]) for r in rows))
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    width = 0.8 / len(methods)
    fig = _new_figure(max(4.0, 1.2 * len(bit_groups) * max(1, len(methods) / 2) + 1.5), 3.4)
    ax = fig.add_subplot()
    for k, method in enumerate(methods):
        xs, values, errs = [], [], []
        for g, group in enumerate(bit_groups):
            match = [r for r in rows if str(r["method"]) == method and _bits_label(r["bits"]) == group]
            if match:
                xs.append(g - 0.4 + width * (k + 0.5))
                values.append(float(match[-1]["value"]))
                err = match[-1].get("err")
                errs.append(float("nan") if err is None else float(err))  # NaN: no error bar drawn
        has_err = any(e == e for e in errs)
        bars = ax.bar(xs, values, width, label=method, yerr=errs if has_err else None, capsize=3)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    ax.set_xticks(range(len(bit_groups)), bit_groups)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by method and bit width", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    return _save(fig, path)


__all__ = ["plot_sample_weights", "plot_conflict", "plot_fidelity_bars"]
