"""diffusers-gaq: post-training quantization of diffusers pipelines with gradient-aligned calibration."""

import sys

from . import modeling
from ._version import __version__
from .class_conditional_pipeline import ClassConditionalDDIMPipeline
from .config import GradientAlignedQuantizer
from .diffusers_registry import register as _register_with_diffusers
from .modeling import (
                       QuantizedDiTTransformer2DModel,
                       QuantizedTransformer2DModel,
                       QuantizedUNet2DConditionModel,
                       QuantizedUNet2DModel,
)
from .quantize import quantize_pipeline
from .sensitivity import analyze_sensitivity

# Pipelines saved before 0.1.0's restructuring name their denoiser's class in model_index.json as
# ["diffusers_gaq.models.quantized", ...]; diffusers' loader imports that module name.
sys.modules.setdefault(f"{__name__}.models.quantized", modeling)

# `UNet2DModel.from_pretrained(quantized folder)` then returns the quantized model (diffusers_registry.py).
_register_with_diffusers()

__all__ = ["ClassConditionalDDIMPipeline", "GradientAlignedQuantizer", "QuantizedDiTTransformer2DModel",
           "QuantizedTransformer2DModel", "QuantizedUNet2DConditionModel", "QuantizedUNet2DModel", "analyze_sensitivity",
           "quantize_pipeline", "__version__"]

