"""diffusers-gaq: post-training quantization of diffusers pipelines with gradient-aligned calibration."""

from .config import GradientAlignedQuantizer
from .models.quantized import (QuantizedDiTTransformer2DModel, QuantizedTransformer2DModel,
                               QuantizedUNet2DConditionModel, QuantizedUNet2DModel)
from .pipeline import quantize_pipeline
from .pipelines import ClassConditionalDDIMPipeline
from .sensitivity import analyze_sensitivity
from .diffusers_registry import register as _register_with_diffusers

# `UNet2DModel.from_pretrained(quantized folder)` then returns the quantized model (diffusers_registry.py).
_register_with_diffusers()

__version__ = "0.1.0"

__all__ = ["ClassConditionalDDIMPipeline", "GradientAlignedQuantizer", "QuantizedDiTTransformer2DModel",
           "QuantizedTransformer2DModel", "QuantizedUNet2DConditionModel", "QuantizedUNet2DModel", "analyze_sensitivity",
           "quantize_pipeline", "__version__"]
