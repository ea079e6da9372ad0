"""Build optimum-quanto runtime modules (``QLinear`` / ``QConv2d``) from our quantization result.

Our result for one ``nn.Linear`` / ``nn.Conv2d`` layer (see ``quant/quantizers.py``):

* weight: uint8 codes ``w_int`` in [0, 2**bits - 1], per-output-channel ``scale`` and integer
  ``zero_point``, ``w_hat = scale * (w_int - zero_point)``;
* optionally the layer *input*: per-tensor step ``act_scale`` and integer ``act_zero_point``,
  ``x_hat = act_scale * (clamp(round(x / act_scale) + act_zero_point, 0, 2**act_bits - 1) - act_zero_point)``.
  ``act_zero_point=None`` means the symmetric signed quantizer
  ``act_scale * clamp(round(x / act_scale), -2**(act_bits-1), 2**(act_bits-1) - 1)``, which is the
  same thing as ``act_zero_point = 2**(act_bits-1)`` (the repo's "symmetric" convention).

What optimum-quanto 0.2.7 can express, and why (paths relative to ``optimum/quanto``):

* **2/4-bit weights: always exactly.** ``WeightQBitsTensor`` (tensor/weights/qbits.py) stores
  uint8 codes plus ``_scale`` and ``_shift``; with an *integer* shift the dequantizer
  (tensor/qbits.py ``QBitsDequantizer``) computes ``scale * (data - shift)``, which is our formula
  to the bit. Integer shifts in [0, 2**bits - 1] are quanto's own ``zeropoint=True`` convention
  (tensor/optimizers/affine_optimizer.py). quanto quantizes 2/4-bit weights *group-wise*: the
  group size is not stored but re-derived by ``QModuleMixin.__init__`` from the layer shape
  (None if in_features <= 128, else 128/96/64/32 if it divides in_features), so we use exactly
  that group size, repeating our per-channel scale/zero point over the groups of a channel.
  (A float shift, ``scale * data - shift`` with ``shift = zero_point * scale``, would round twice
  and is therefore not used.)
* **8-bit weights: only when symmetric.** ``WeightQBytesTensor`` (tensor/weights/qbytes.py) is
  symmetric per-axis: int8 data times scale, no shift (``quantize_weight`` even raises if a shift
  is passed for 8-bit qtypes). Our weights are exactly expressible iff every shifted code
  ``w_int - zero_point`` fits int8 [-128, 127] -- always true for the symmetric convention
  ``zero_point = 128``; an asymmetric channel that uses its full code range is not, and raises.
* **Activations: only 8-bit, only symmetric, only per tensor.** quanto quantizes activations with
  ``quantize_symmetric`` (library/quantize.py): ``clamp(round(x / scale), -128, 127)`` with a scalar
  scale and no zero point (qint8; float8 types are not our scheme). Our quantizer matches this
  exactly iff ``act_bits == 8`` and ``act_zero_point`` is None or 128; an asymmetric or unsigned
  quantizer (zero point z != 128) clamps to [-z, 255 - z] instead and raises ValueError, as do
  other bit widths and (at the caller) split/multiple input quantizers.
* **Input-only activation quantization is not quanto's activation semantics.** A quanto module
  with ``activations=qint8`` also quantizes its *output* with ``output_scale`` (a forward hook
  from ``QModuleMixin.__init__``), and ``QConv2d.qcreate`` never passes ``quantize_input=True``, so
  a QConv2d does not quantize its own input at all (quanto expects the producer's quantized
  output). We therefore remove the output hook and, for QConv2d, register quanto's own
  ``quantize_input`` pre-hook. Hooks are not saved: quanto's ``requantize`` rebuilds modules with
  the output hook and without the conv input hook. To make that mistake loud instead of silent,
  exported modules store ``output_scale = NaN`` (plain quanto reloads then produce NaN), and
  :func:`requantize_exported` / :func:`restore_input_only_activations` use that marker to re-apply
  our semantics after loading. The same caveat is why quanto's ``Calibration(streamline=True)``
  (the default) is not reproducible by ``requantize``: streamlining calls
  ``disable_output_quantization`` on some modules, which is saved nowhere; only
  ``streamline=False`` models reload exactly. Do not run quanto ``Calibration`` on exported
  modules either: it would overwrite ``input_scale``.

Numerics: the quanto weight dequantizes *bit-exactly* to ``w_hat`` and the input quantization is
bit-exactly ``x_hat`` (same ``x / scale``, ``torch.round``, clamp). Outputs then differ from
``F.linear`` / ``F.conv2d`` on (``x_hat``, ``w_hat``) only by float32 accumulation order: 2/4-bit
weights and all convolutions dequantize and call the same float op; 8-bit Linear with 8-bit
activations on CPU goes through ``torch._int_mm`` (exact int32 accumulation, then one multiply by
``act_scale * scale``). Documented bound: ``max|y - y_ref| <= 1e-5 * max|y_ref|`` (measured: exactly 0
for the small test layers except 8-bit Linear with activations, ~3e-7; <= 3e-7 for a 1280x1280 Linear).

Other facts worth knowing: the first unpacking of a 2/4-bit weight on CPU JIT-compiles quanto's
C++ extension (``torch.ops.quanto.unpack``, library/extensions/cpp) into site-packages -- about
30 s on an idle machine, about a minute on a busy one, a few seconds to load afterwards; it needs
a C++ compiler. Only float32 layers are supported, because quanto stores scales in the layer's
dtype (and refuses to change a quantized weight's dtype) and a cast would change our numerics.

Whole models: :func:`export_to_quanto` turns a calibrated ``QuantizedUNet2DModel`` into a plain
``UNet2DModel`` of quanto modules (or refuses, naming every layer quanto cannot express and why);
:func:`save_quanto` / :func:`load_quanto` store it in quanto's own folder layout (``config.json``,
``quanto_qmap.json``, ``diffusion_pytorch_model.safetensors``) and reload it bit-identically.
End to end, a W4A8 export computes exactly what our model computes (every path dequantizes and runs
the same float op). A W8A8 export's 8-bit Linear layers sum in int32, and the resulting ~1e-7
relative differences can move a value across the rounding boundary of a later 8-bit activation
quantizer, i.e. by one whole step; since the time embedding is added to every pixel, one such flip
can shift a whole sample (our own model shifts the same way when only the batch split changes).
Layer by layer the export is exact to the bound above; tests/test_quanto_export.py states the
end-to-end tolerances it uses.
"""


from .io import load_quanto, save_quanto
from .layers import OUTPUT_SCALE_MARKER, requantize_exported, restore_input_only_activations, to_quanto_module
from .model import MODEL_CONFIG_NAME, QMAP_NAME, WEIGHTS_NAME, export_to_quanto

__all__ = [
    "to_quanto_module",
    "restore_input_only_activations",
    "requantize_exported",
    "export_to_quanto",
    "save_quanto",
    "load_quanto",
    "OUTPUT_SCALE_MARKER",
    "MODEL_CONFIG_NAME",
    "QMAP_NAME",
    "WEIGHTS_NAME",
]
