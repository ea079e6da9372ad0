"""diffusers-gaq: post-training quantization of diffusers pipelines with gradient-aligned calibration."""

from .config import GradientAlignedQuantizer
from .models.quantized import QuantizedUNet2DModel
from .pipeline import quantize_pipeline

__version__ = "0.1.0"

__all__ = ["GradientAlignedQuantizer", "QuantizedUNet2DModel", "quantize_pipeline", "__version__"]
