"""Per-layer precision tags: "w<bits>a<bits>" (both quantized), "w<bits>" (activations FP),
"a<bits>" (weights FP) or "fp", and the bit widths they may name."""

from __future__ import annotations

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

