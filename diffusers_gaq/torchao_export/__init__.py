"""Export a calibrated model to torchao tensors that stock diffusers loads through ``TorchAoConfig``.

torchao is diffusers' maintained quantization backend, and diffusers loads a torchao-quantized
model saved as safetensors (torchao >= 0.16 flattens its tensor subclasses into plain tensors and
JSON metadata). This export writes such a folder from our calibration result, so the model loads
with ``UNet2DModel.from_pretrained(folder)`` or ``DiffusionPipeline.from_pretrained(folder)`` on a
machine that has torchao and has never installed diffusers-gaq.

What it covers: the **weights** of every quantized ``Conv2d`` and ``Linear`` layer, exactly. Each
becomes torchao's ``IntxUnpackedToInt8Tensor`` (the format of ``IntxWeightOnlyConfig`` with
per-output-channel granularity and asymmetric mapping, for 2 to 8 bits): int8 data
``codes - 2**(bits-1)``, our per-channel float32 scale, and an int8 zero point
``zero_point - 2**(bits-1)``. torchao dequantizes ``(data - zero_point) * scale``, which is our
``(codes - zero_point) * scale`` to the bit.

What it cannot carry, said plainly: the **activation quantization** (our per-tensor input steps,
possibly asymmetric, per timestep group or split over a skip concatenation, and the quantized
attention matmuls). torchao's static-activation config is Linear-only, symmetric-weight and has no
timestep groups, so the export is weight-only: its outputs are those of our model with activation
quantization switched off. Layers we keep in full precision stay plain float layers. On every device
torchao computes these layers by dequantizing the weight and calling the float op: the export is
for portability and weight memory (one byte per weight, any bit width), not for speed; the
integer runtime (``diffusers_gaq.runtime``) is the fast path.
"""

from .model import export_to_torchao, save_torchao_pipeline, torchao_config
from .tensors import intx_weight

__all__ = ["export_to_torchao", "intx_weight", "save_torchao_pipeline", "torchao_config"]
