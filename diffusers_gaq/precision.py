"""Per-layer precision tags: "w<bits>a<bits>" (both quantized), "w<bits>" (activations FP),
"a<bits>" (weights FP) or "fp", and the bit widths they may name."""

from __future__ import annotations

import math
import re

WEIGHT_BITS_RANGE = (2, 8)
ACT_BITS_RANGE = (4, 16)
FP_TAG = "fp"
SAME_TAG = "same"  # first_last_precision only: no special treatment
_TAG_RE = re.compile(r"(?:w(\d+))?(?:a(\d+))?")
PRECISION_FORMS = (f"'w<W>a<A>' (e.g. 'w8a8', 'w4a16'), 'w<W>' (weights only, e.g. 'w8'), "
                   f"'a<A>' (activation only, e.g. 'a8') or 'fp', with W in {WEIGHT_BITS_RANGE[0]}..{WEIGHT_BITS_RANGE[1]} "
                   f"and A in {ACT_BITS_RANGE[0]}..{ACT_BITS_RANGE[1]}")


def parse_precision(tag: str) -> tuple[int | None, int | None]:
    """(weight bits, activation bits) of a precision tag, None meaning full precision.
    Raises ValueError naming the tag and the allowed forms."""
    match = _TAG_RE.fullmatch(tag) if isinstance(tag, str) else None
    if tag == FP_TAG:
        return None, None
    if match is None or not tag:
        raise ValueError(f"{tag!r} is not a precision tag; expected {PRECISION_FORMS}")
    w, a = (int(g) if g is not None else None for g in match.groups())
    if w is not None and not WEIGHT_BITS_RANGE[0] <= w <= WEIGHT_BITS_RANGE[1]:
        raise ValueError(f"{tag!r} asks for {w}-bit weights; weight bits must lie in "
                         f"{WEIGHT_BITS_RANGE[0]}..{WEIGHT_BITS_RANGE[1]} (expected {PRECISION_FORMS})")
    if a is not None and not ACT_BITS_RANGE[0] <= a <= ACT_BITS_RANGE[1]:
        raise ValueError(f"{tag!r} asks for {a}-bit activations; activation bits must lie in "
                         f"{ACT_BITS_RANGE[0]}..{ACT_BITS_RANGE[1]} (expected {PRECISION_FORMS})")
    return w, a


def precision_tag(weight_bits: int | None, act_bits: int | None) -> str:
    """The tag of a (weight bits, activation bits) pair; inverse of parse_precision."""
    text = (f"w{weight_bits}" if weight_bits else "") + (f"a{act_bits}" if act_bits else "")
    return text or FP_TAG



def validate_precision_fields(config) -> None:
    """Check a GradientAlignedQuantizer's per-layer precision fields: layer_precision,
    first_last_precision, and the mixed-precision budget (average_weight_bits, allocated_layers).
    Raises ValueError naming the field and what it may hold."""
    if not isinstance(config.layer_precision, dict):
        raise ValueError(f"GradientAlignedQuantizer.layer_precision={config.layer_precision!r} is invalid: expected "
                         "a mapping {module-name pattern: precision tag}")
    for pattern, tag in config.layer_precision.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"GradientAlignedQuantizer.layer_precision: pattern {pattern!r} (tag {tag!r}) is "
                             "invalid: patterns are non-empty fnmatch strings of module names, e.g. "
                             "'down_blocks.0.*'")
        try:
            parse_precision(tag)
        except ValueError as e:
            raise ValueError(f"GradientAlignedQuantizer.layer_precision[{pattern!r}]: {e}") from None
    if config.first_last_precision != SAME_TAG:
        try:
            parse_precision(config.first_last_precision)
        except ValueError as e:
            raise ValueError(f"GradientAlignedQuantizer.first_last_precision: {e}, or 'same' (no special "
                             "treatment)") from None
    _validate_budget(config)


def _validate_budget(config) -> None:
    """average_weight_bits lies in [weight_bits, 8]; allocated_layers (written by quantize_pipeline
    once the budget is allocated) name layer_precision entries, and only with a budget."""
    budget, allocated = config.average_weight_bits, config.allocated_layers
    if budget is not None:
        ok = isinstance(budget, (int, float)) and not isinstance(budget, bool) and math.isfinite(budget)
        if not ok or not config.weight_bits <= budget <= WEIGHT_BITS_RANGE[1]:
            raise ValueError(f"GradientAlignedQuantizer.average_weight_bits={budget!r} is invalid: expected None or "
                             f"a number in [weight_bits={config.weight_bits}, {WEIGHT_BITS_RANGE[1]}] (average bits "
                             "per quantized weight; layers are raised to 8 bits to spend what lies above weight_bits)")
    if not isinstance(allocated, tuple) or not all(isinstance(n, str) and n for n in allocated):
        raise ValueError(f"GradientAlignedQuantizer.allocated_layers={allocated!r} is invalid: expected a list of "
                         "module names")
    if allocated and budget is None:
        raise ValueError("GradientAlignedQuantizer.allocated_layers is set without average_weight_bits: it records "
                         "the layers a budget allocation raised; set average_weight_bits or leave it empty")
    missing = [n for n in allocated if n not in config.layer_precision]
    if missing:
        raise ValueError(f"GradientAlignedQuantizer.allocated_layers names {missing} without a layer_precision "
                         "entry of the same name: the allocation is written as exact layer_precision entries")
