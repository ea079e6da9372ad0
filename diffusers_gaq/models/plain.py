"""A plain diffusers copy of a quantized model, for exports to other libraries' formats.

The copy is an instance of the base diffusers class (``UNet2DModel``, not ``QuantizedUNet2DModel``),
carries none of diffusers-gaq's calibration state, and holds, in place of each fake-quant wrapper,
the module the caller built for it. Attention modules get back the processor our quantized
processor replaced. The wrappers' float weights are never copied.
"""

from __future__ import annotations

import copy

from torch import nn

from .attention import QuantAttnProcessor
from .wrap import quant_layers

_GAQ_ATTRIBUTES = ("quantization",)  # the calibration state a Quantized* model carries


def base_class(model: nn.Module) -> type:
    """The diffusers class under our ``Quantized*`` subclass (the model's own class if it has none)."""
    return getattr(type(model), "diffusers_base_class", type(model))


def quantized_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules whose processor is ours, with its matmul quantization on or off."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(getattr(module, "processor", None), QuantAttnProcessor)]


def plain_copy(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Deep-copy ``model`` as its base diffusers class with every wrapper swapped for ``replacements[name]``.

    ``replacements`` must name every quantized layer of ``model``. The swap happens through
    deepcopy's memo (which returns the memoised object instead of copying it), so a wrapper's
    float weight is never duplicated; ``model`` itself is left unchanged.
    """
    layers = quant_layers(model)
    missing = [name for name, _ in layers if name not in replacements]
    if missing:
        raise ValueError(f"no replacement for the quantized layers {missing[:5]}")
    memo = {id(layer): replacements[name] for name, layer in layers}
    for attr in _GAQ_ATTRIBUTES:
        value = model.__dict__.get(attr)
        if value is not None and not isinstance(value, (str, int, float, bool)):
            memo[id(value)] = None  # calibration state does not belong in an export
    copied = copy.deepcopy(model, memo)
    copied.__class__ = base_class(model)
    for attr in _GAQ_ATTRIBUTES:
        copied.__dict__.pop(attr, None)
    for name, _ in quantized_attention(model):
        module = copied.get_submodule(name)
        module.set_processor(module.processor.original_processor)
    return copied
