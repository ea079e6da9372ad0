"""diffusers-gaq: post-training quantization of diffusers pipelines with gradient-aligned calibration.

``import diffusers_gaq`` is light: the config and the registration with diffusers' quantizer registry.
Everything else (quantize_pipeline, the Quantized* model classes, ...) is imported on first use, since
the model classes pull in diffusers' model and pipeline modules (seconds of import).
"""

import importlib
import importlib.util
import sys
import types

from ._version import __version__
from .config import GradientAlignedQuantizer
from .diffusers_registry import register as _register_with_diffusers

# Public name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "quantize_pipeline": "quantize",
    "analyze_sensitivity": "sensitivity",
    "ClassConditionalDDIMPipeline": "class_conditional_pipeline",
    "QuantizedUNet2DModel": "modeling",
    "QuantizedUNet2DConditionModel": "modeling",
    "QuantizedDiTTransformer2DModel": "modeling",
    "QuantizedTransformer2DModel": "modeling",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _DeferredModule(types.ModuleType):
    """Stands in ``sys.modules`` for a submodule that is imported on its first attribute access.

    diffusers' pipeline loader takes a component's class only from a module already in sys.modules
    (model_index.json names ``diffusers_gaq.modeling``); importing modeling itself would cost the
    seconds of diffusers' model and pipeline classes on every ``import diffusers_gaq``. Dunder
    attributes (``__file__``, ``__path__``: what ``inspect`` scans sys.modules for) never load it."""

    def __init__(self, name: str, file: str):
        super().__init__(name)
        self.__file__ = file

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        real = self.__dict__.get("_real")
        if real is None:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = self.__dict__["_real"] = importlib.import_module(self.__name__)
        return getattr(real, attr)


def _deferred(name: str) -> types.ModuleType:
    full = f"{__name__}.{name}"
    if full not in sys.modules:
        sys.modules[full] = _DeferredModule(full, importlib.util.find_spec(full).origin)
    return sys.modules[full]


# Pipelines saved before the 0.1.0 restructuring name their denoiser's class in model_index.json as
# ["diffusers_gaq.models.quantized", ...]: that name is the modeling module too.
sys.modules.setdefault(f"{__name__}.models.quantized", _deferred("modeling"))

# `UNet2DModel.from_pretrained(quantized folder)` then returns the quantized model (diffusers_registry.py).
_register_with_diffusers()

__all__ = ["ClassConditionalDDIMPipeline", "GradientAlignedQuantizer", "QuantizedDiTTransformer2DModel",
           "QuantizedTransformer2DModel", "QuantizedUNet2DConditionModel", "QuantizedUNet2DModel", "analyze_sensitivity",
           "quantize_pipeline", "__version__"]
