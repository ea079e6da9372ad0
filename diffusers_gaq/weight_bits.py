"""How many bits a quantized model's weights take: per precision group, and in bits per weight,
for a model in memory and for a saved checkpoint (read from its header, nothing loaded)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import nn

from .config import CONFIG_NAME, FP_TAG, parse_precision, precision_tag
from .quant.layers import QuantLayer
from .quant.packing import packed_nbytes
from .runtime import IntegerLayer
from .serialization import WEIGHTS_NAME, read_json

_SAFETENSORS_BITS = {"F16": 16, "BF16": 16, "F32": 32, "F64": 64}


@dataclass
class WeightBits:
    """Storage of a quantized model's Conv2d / Linear weights: integer codes at their bit widths,
    full-precision weights at their dtype's (32, or 16 for a half-precision model)."""

    quantized_weights: int = 0
    fp_weights: int = 0
    total_bits: int = 0
    packed_bytes: int = 0  # bytes of the packed codes (as stored in gaq.weight_codes)
    quantized_bits: int = 0  # the integer codes' bits alone

    def add(self, numel: int, bits: int | None, fp_bits: int) -> None:
        if bits is None:
            self.fp_weights += numel
            self.total_bits += numel * fp_bits
        else:
            self.quantized_weights += numel
            self.total_bits += numel * bits
            self.quantized_bits += numel * bits
            self.packed_bytes += packed_nbytes(numel, bits)

    @property
    def bits_per_weight(self) -> float:
        total = self.quantized_weights + self.fp_weights
        return self.total_bits / total if total else 0.0

    @property
    def average_quantized_bits(self) -> float:
        """Bits per quantized weight, full-precision layers left out: what
        GradientAlignedQuantizer.average_weight_bits budgets."""
        return self.quantized_bits / self.quantized_weights if self.quantized_weights else 0.0


def model_weight_bits(model) -> WeightBits:
    """WeightBits of a wrapped model: every Conv2d / Linear, wrapped (codes) or not (its dtype)."""
    result, inner = WeightBits(), set()
    for module in model.modules():
        if isinstance(module, QuantLayer):
            inner.add(id(module.layer))
            wq = module.weight_quantizer
            weight = module.layer.weight
            result.add(weight.numel(), wq.bits if wq is not None else None, weight.element_size() * 8)
        elif isinstance(module, IntegerLayer):  # the integer runtime: the codes' width, whatever the container
            result.add(math.prod(module.weight_shape), module.weight_bits, 32)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in inner:
            result.add(module.weight.numel(), None, module.weight.element_size() * 8)
    return result


def checkpoint_weight_bits(folder: str | os.PathLike) -> WeightBits:
    """WeightBits of a saved quantized model (the folder holding quantization_config.json), from
    its layer table and the safetensors header (shapes and dtypes of the FP weights; nothing is loaded)."""
    folder = Path(folder)
    qcfg = read_json(folder / CONFIG_NAME)
    result = WeightBits()
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as tensors:
        keys = set(tensors.keys())

        def fp_bits(key: str) -> int:
            return _SAFETENSORS_BITS.get(tensors.get_slice(key).get_dtype(), 32) if key in keys else 32

        for name, entry in qcfg.get("layers", {}).items():
            numel = 1
            for dim in entry["weight_shape"]:
                numel *= dim
            result.add(numel, entry["weight_bits"], fp_bits(f"{name}.layer.weight"))
        for name in qcfg.get("kept_fp", []):
            key = f"{name}.weight"
            if key in keys:
                shape = tensors.get_slice(key).get_shape()
                numel = 1
                for dim in shape:
                    numel *= dim
                result.add(numel, None, fp_bits(key))
    return result


def precision_groups(layers: dict[str, dict], kept_fp=()) -> dict[str, list[str]]:
    """{precision tag ("w4a8", "w8", "a8", "fp"): layer names}, the largest group first; ``layers``
    is a layer table (quantization_config.json's "layers"), ``kept_fp`` the unwrapped layers."""
    groups: dict[str, list[str]] = {}
    for name, entry in layers.items():
        groups.setdefault(precision_tag(entry["weight_bits"], entry["act_bits"]), []).append(name)
    if kept_fp:
        groups.setdefault(FP_TAG, []).extend(kept_fp)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def format_precision_groups(groups: dict[str, list[str]], max_names: int = 4) -> str:
    """One line: "w4a8: 58 layers; fp: conv_in, conv_out; ..." (names when a group is small)."""
    parts = []
    for tag, names in groups.items():
        parts.append(f"{tag}: {', '.join(names)}" if len(names) <= max_names else f"{tag}: {len(names)} layers")
    return "; ".join(parts)



def format_allocation(budget: float | None, allocated, layer_precision: dict, storage: WeightBits) -> str | None:
    """One line on a measured mixed-precision allocation, None without a budget: "4.49 average weight
    bits (budget 4.5), 6 layers at 8 bits chosen by sensitivity: a, b, ..."."""
    if budget is None:
        return None
    widths = sorted({parse_precision(layer_precision[name])[0] for name in allocated})
    at = "/".join(str(w) for w in widths) or "higher"
    chosen = f"{len(allocated)} layer{'s' if len(allocated) != 1 else ''} at {at} bits chosen by sensitivity"
    return (f"{storage.average_quantized_bits:.2f} average weight bits (budget {budget:g}), {chosen}"
            + (f": {', '.join(allocated)}" if allocated else ""))
