"""Mixed precision by measurement: spend a budget of average bits per quantized weight
(``GradientAlignedQuantizer.average_weight_bits``) on the layers whose weights lose the most to
quantization per added bit.

The denominator is every weight the config quantizes: Conv2d / Linear layers whose resolved
precision has weight bits (layers kept in full precision, by keep_fp, an "fp" / "a<A>" tag or
first_last_precision, are not counted), the same set as ``WeightBits.quantized_weights``
(weight_bits.py). Explicit precision (layer_precision entries, first_last_precision) wins and counts
toward the budget at its own width; every other layer starts at ``weight_bits`` and may be raised to
``HIGH_BITS``. The damage a raise removes is the layer's weight-only sensitivity row at
``weight_bits`` (its noise-prediction error with everything else FP; the 8-bit error is taken as
negligible), so a raise of layer i costs ``(HIGH_BITS - weight_bits) * numel_i`` bits and is worth
``damage_i / cost_i``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from torch import nn

from .calibration.data import CalibrationData
from .config import SAME_TAG, GradientAlignedQuantizer, precision_tag
from .models import denoiser_of
from .models.wrap import resolve_precision
from .sensitivity import analyze_sensitivity

logger = logging.getLogger(__name__)

HIGH_BITS = 8  # the one width a layer is raised to


@dataclass(frozen=True)
class LayerWeights:
    """One quantized weight tensor as the budget sees it."""

    name: str
    numel: int
    bits: int  # its width under the config's policy
    movable: bool  # at weight_bits by default: no keep_fp, layer_precision or first/last rule names it


def weight_layers(model: nn.Module, config: GradientAlignedQuantizer, family) -> list[LayerWeights]:
    """Every Conv2d / Linear of the FP ``model`` whose weights ``config`` quantizes, in module order."""
    first_last = set(family.first_last_layers(model))
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        bits, _ = resolve_precision(name, config, first_last)
        if bits is not None:
            layers.append(LayerWeights(name, module.weight.numel(), bits, not _explicit(name, config, first_last)))
    return layers


def _explicit(name: str, config: GradientAlignedQuantizer, first_last) -> bool:
    if any(fnmatch.fnmatchcase(name, p) for p in (*config.keep_fp, *config.layer_precision)):
        return True
    return name in first_last and config.first_last_precision != SAME_TAG


def average_bits(layers: Sequence[LayerWeights], raised: Sequence[str] = ()) -> float:
    """Average bits per quantized weight with the layers named in ``raised`` at HIGH_BITS."""
    raised = set(raised)
    total = sum(layer.numel for layer in layers)
    bits = sum(layer.numel * (HIGH_BITS if layer.name in raised else layer.bits) for layer in layers)
    return bits / total if total else 0.0


def damage_of(report) -> dict[str, float]:
    """{layer: damage of its weights alone} from a SensitivityReport's weight rows."""
    return {row.layer: row.damage for row in report.rows if row.kind == "weight"}


def check_budget(layers: Sequence[LayerWeights], budget: float) -> None:
    """Refuse a budget that the explicit precision alone already exceeds (before any work)."""
    start = average_bits(layers)
    if _total_bits(layers) > _limit(layers, budget):
        lowest = min(layer.bits for layer in layers)
        fixed = [layer.name for layer in layers if not layer.movable and layer.bits > lowest]
        raise ValueError(f"GradientAlignedQuantizer.average_weight_bits={budget} is below what the explicit precision "
                         f"already spends: {start:.4f} bits per quantized weight (layer_precision / "
                         f"first_last_precision entries count toward the budget; wider layers: "
                         f"{', '.join(fixed[:5]) or 'none'}); raise the budget or drop those entries")


def _total_bits(layers: Sequence[LayerWeights]) -> int:
    return sum(layer.numel * layer.bits for layer in layers)


def _limit(layers: Sequence[LayerWeights], budget: float) -> Fraction:
    # Exact arithmetic: the allocation must never exceed the budget by a rounding error.
    return Fraction(budget) * sum(layer.numel for layer in layers)


def allocate_bits(layers: Sequence[LayerWeights], damage: Mapping[str, float], budget: float) -> list[str]:
    """The movable layers to raise to HIGH_BITS, best damage per added bit first, within ``budget``
    average bits per weight of ``layers``. Greedy: a layer that does not fit is skipped and later,
    smaller ones may still fit. Layers without damage (or without a row in ``damage``) stay."""
    check_budget(layers, budget)
    limit, spent = _limit(layers, budget), _total_bits(layers)
    candidates = [layer for layer in layers
                  if layer.movable and layer.bits < HIGH_BITS and damage.get(layer.name, 0.0) > 0]
    # Ties by name, so the allocation does not depend on the order of the rows.
    candidates.sort(key=lambda layer: (-damage[layer.name] / _cost(layer), layer.name))
    chosen = []
    for layer in candidates:
        if spent + _cost(layer) <= limit:
            chosen.append(layer.name)
            spent += _cost(layer)
    return chosen


def _cost(layer: LayerWeights) -> int:
    return (HIGH_BITS - layer.bits) * layer.numel


def check_mixed_precision(fp_model: nn.Module, config: GradientAlignedQuantizer, family) -> None:
    """What quantize_pipeline refuses before sampling: a budget the explicit entries already exceed."""
    if config.average_weight_bits is not None and not config.allocated_layers:
        check_budget(weight_layers(fp_model, config, family), config.average_weight_bits)


def allocate_by_sensitivity(pipe, config: GradientAlignedQuantizer, calibration_data: CalibrationData, *,
                            progress: bool = True) -> GradientAlignedQuantizer:
    """``config`` with its budget allocated: the chosen layers as exact ``w8...`` layer_precision
    entries (after the user's, which never match them) and in allocated_layers. A config without a
    budget, or with an allocation already made (a saved checkpoint's config), is returned as it is."""
    if config.average_weight_bits is None or config.allocated_layers:
        return config
    family, _, fp_model = denoiser_of(pipe)
    layers = weight_layers(fp_model, config, family)
    check_budget(layers, config.average_weight_bits)
    # Weights only, noise error only: the images would cost a sampling run per layer.
    probe = config.replace(act_bits=None, average_weight_bits=None)
    report = analyze_sensitivity(pipe, probe, num_inference_steps=config.num_inference_steps, images=False,
                                 calibration_data=calibration_data, progress=progress)
    chosen = allocate_bits(layers, damage_of(report), config.average_weight_bits)
    tag = precision_tag(HIGH_BITS, config.act_bits)
    logger.info("mixed precision: %d layers raised to %s for %.4f average weight bits (budget %g): %s", len(chosen),
                tag, average_bits(layers, chosen), config.average_weight_bits, ", ".join(chosen) or "none")
    return config.replace(layer_precision={**config.layer_precision, **{name: tag for name in chosen}},
                          allocated_layers=tuple(chosen))


__all__ = ["HIGH_BITS", "LayerWeights", "allocate_bits", "allocate_by_sensitivity", "average_bits",
           "check_mixed_precision", "damage_of", "weight_layers"]
