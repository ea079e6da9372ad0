"""diffusers-gaq: post-training quantization of diffusers pipelines with gradient-aligned calibration."""

from .config import GradientAlignedQuantizer
from .diffusers_registry import register as _register_with_diffusers
# Imported here, not on first use: diffusers' pipeline loader only takes component classes from modules
# already imported (model_index.json names diffusers_gaq.models.quantized).
from .models.quantized import (QuantizedDiTTransformer2DModel, QuantizedTransformer2DModel,
                               QuantizedUNet2DConditionModel, QuantizedUNet2DModel)
from .pipeline import quantize_pipeline
from .sensitivity import analyze_sensitivity

# `UNet2DModel.from_pretrained(quantized folder)` then returns the quantized model (diffusers_registry.py).
_register_with_diffusers()

__version__ = "0.1.0"

__all__ = ["ClassConditionalDDIMPipeline", "GradientAlignedQuantizer", "QuantizedDiTTransformer2DModel",
           "QuantizedTransformer2DModel", "QuantizedUNet2DConditionModel", "QuantizedUNet2DModel", "analyze_sensitivity",
           "quantize_pipeline", "__version__"]


def __getattr__(name: str):
    # On first use: the pipeline class imports diffusers' DiffusionPipeline machinery (~0.15 s of import).
    if name == "ClassConditionalDDIMPipeline":
        from .pipelines import ClassConditionalDDIMPipeline

        return ClassConditionalDDIMPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
