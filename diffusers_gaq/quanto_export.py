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

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optimum.quanto import qint2, qint4, qint8, quantization_map, requantize
from optimum.quanto.nn import QConv2d, QLinear, QModuleMixin
from optimum.quanto.tensor import group
from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor

__all__ = [
    "to_quanto_module",
    "restore_input_only_activations",
    "requantize_exported",
    "export_to_quanto",
    "save_quanto",
    "load_quanto",
    "OUTPUT_SCALE_MARKER",
]

logger = logging.getLogger(__name__)

_WEIGHT_QTYPES = {2: qint2, 4: qint4, 8: qint8}
# quanto's only integer activation qtype: symmetric signed int8 [-128, 127] with a scalar scale.
_ACT_BITS = 8
_ACT_SYMMETRIC_ZERO_POINT = 2 ** (_ACT_BITS - 1)
# Stored in ``output_scale`` of modules whose activations are quantized at the input only.
OUTPUT_SCALE_MARKER = float("nan")


def _per_channel(t: Any, name: str, out_channels: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t).detach().to(device=device, dtype=torch.float32)
    if t.numel() != out_channels:
        raise ValueError(f"{name} must have one entry per output channel ({out_channels}), got shape {tuple(t.shape)}")
    t = t.reshape(out_channels)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains non-finite values")
    return t


def _check_weight(module: nn.Module, w_int: torch.Tensor, scale: Any, zero_point: Any, bits: int):
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"module must be an nn.Linear or nn.Conv2d, got {type(module).__name__}")
    if module.weight.dtype != torch.float32:
        raise ValueError(
            f"only float32 layers are supported (got {module.weight.dtype}): quanto stores the scales in the "
            "layer dtype, so a lower-precision layer would not reproduce our float32 scales exactly"
        )
    if bits not in _WEIGHT_QTYPES:
        raise ValueError(
            f"quanto has integer weight qtypes for 2, 4 and 8 bits only (qint2/qint4/qint8), got bits={bits}"
        )
    if not isinstance(w_int, torch.Tensor) or w_int.dtype.is_floating_point or w_int.dtype == torch.bool:
        raise TypeError("w_int must be an integer tensor of weight codes")
    if w_int.shape != module.weight.shape:
        raise ValueError(f"w_int shape {tuple(w_int.shape)} != weight shape {tuple(module.weight.shape)}")
    device = module.weight.device
    w_int = w_int.detach().to(device)
    lo, hi = int(w_int.min()), int(w_int.max())
    if lo < 0 or hi > 2**bits - 1:
        raise ValueError(f"w_int values must be in [0, {2**bits - 1}] for bits={bits}, got min={lo}, max={hi}")
    out_channels = module.weight.shape[0]
    scale = _per_channel(scale, "scale", out_channels, device)
    zero_point = _per_channel(zero_point, "zero_point", out_channels, device)
    if not torch.equal(zero_point, zero_point.round()):
        raise ValueError("zero_point must hold integer values")
    return w_int, scale, zero_point


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((-1,) + (1,) * (ndim - 1))


def _qbits_weight(qmodule: QModuleMixin, w_int: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
    """2/4-bit: WeightQBitsTensor with integer (uint8) shift = our zero point, in quanto's group layout."""
    qtype = qmodule.weight_qtype
    zp_lo, zp_hi = int(zero_point.min()), int(zero_point.max())
    if zp_lo < 0 or zp_hi > 2**qtype.bits - 1:
        # quanto's integer shift convention (affine_optimizer zeropoint=True) is uint8 in [0, 2**bits - 1].
        raise ValueError(
            f"quanto {qtype.name} stores integer zero points as codes in [0, {2**qtype.bits - 1}]; "
            f"got zero_point range [{zp_lo}, {zp_hi}]"
        )
    weight = qmodule.weight
    group_size = qmodule.weight_group_size  # derived by quanto from the shape; requantize re-derives it
    data = w_int.to(torch.uint8)
    if group_size is None:
        # Per-axis: scale/shift broadcast over all but the first dim.
        scale_t = _channel_view(scale, weight.dim()).clone()
        shift_t = _channel_view(zero_point, weight.dim()).to(torch.uint8)
    else:
        # Rows of the (out * groups, group_size) layout are consecutive chunks of one channel.
        n_groups = weight[0].numel() // group_size
        data = group(data, axis=0, group_size=group_size)
        scale_t = scale.repeat_interleave(n_groups)[:, None].clone()
        shift_t = zero_point.repeat_interleave(n_groups)[:, None].to(torch.uint8)
    return WeightQBitsTensor.create(
        qtype, 0, group_size, weight.size(), weight.stride(), data.contiguous(), scale_t, shift_t.contiguous()
    )


def _qbytes_weight(qmodule: QModuleMixin, w_int: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
    """8-bit: WeightQBytesTensor (symmetric int8 per axis), exact iff every w_int - zero_point fits int8."""
    weight = qmodule.weight
    shifted = w_int.to(torch.int16) - _channel_view(zero_point, weight.dim()).to(torch.int16)
    lo = shifted.reshape(shifted.shape[0], -1).amin(dim=1)
    hi = shifted.reshape(shifted.shape[0], -1).amax(dim=1)
    bad = ((lo < -128) | (hi > 127)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(f"{c} (zero_point={int(zero_point[c])})" for c in bad[:5])
        raise ValueError(
            "quanto qint8 weights are symmetric (int8 data * per-channel scale, no zero point/shift), so an "
            "8-bit affine weight is exact only if every code minus its zero point fits int8 [-128, 127] "
            f"(always true for the symmetric zero point 128); {len(bad)} channel(s) do not, e.g. {shown}"
        )
    return WeightQBytesTensor.create(
        qint8,
        0,
        weight.size(),
        weight.stride(),
        shifted.to(torch.int8).contiguous(),
        _channel_view(scale, weight.dim()).clone(),
        activation_qtype=qmodule.activation_qtype,
    )


def _check_activation(act_scale: Any, act_zero_point: Any, act_bits: int | None) -> float | None:
    """Validate the input quantizer; return the scale if quantized, None otherwise."""
    if act_scale is None:
        if act_zero_point is not None or act_bits is not None:
            raise ValueError("act_zero_point / act_bits given without act_scale")
        return None
    if act_bits != _ACT_BITS:
        raise ValueError(
            f"quanto quantizes activations to qint8 only (8-bit symmetric, library/quantize.py quantize_symmetric); "
            f"act_bits={act_bits} is not expressible"
        )
    scale = torch.as_tensor(act_scale, dtype=torch.float32)
    if scale.numel() != 1:
        raise ValueError("quanto activation scales are per tensor: act_scale must be a scalar")
    scale = float(scale.reshape(()))
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"act_scale must be finite and > 0, got {scale}")
    if act_zero_point is not None:
        zp = float(torch.as_tensor(act_zero_point, dtype=torch.float32).reshape(()))
        if zp != _ACT_SYMMETRIC_ZERO_POINT:
            raise ValueError(
                f"quanto activations are symmetric int8: clamp(round(x/s), -128, 127) with no zero point. Our "
                f"asymmetric quantizer with act_zero_point={zp:g} clamps round(x/s) to [{-zp:g}, {255 - zp:g}], "
                f"which quanto cannot express; only act_zero_point=None or {_ACT_SYMMETRIC_ZERO_POINT} can be exported"
            )
    return scale


def _use_input_only_activations(qmodule: QModuleMixin) -> None:
    """Quantize the module input (quanto's own pre-hook, scale ``input_scale``), never its output."""
    hook = qmodule._quantize_hooks.pop("output", None)
    if hook is not None:
        hook.remove()
    if "input" not in qmodule._quantize_hooks:  # QConv2d: quanto never registers it (qcreate)
        qmodule._quantize_hooks["input"] = qmodule.register_forward_pre_hook(qmodule.quantize_input)
    qmodule.output_scale.fill_(OUTPUT_SCALE_MARKER)


@torch.no_grad()
def to_quanto_module(
    module: nn.Module,
    w_int: torch.Tensor,
    scale: Any,
    zero_point: Any,
    bits: int,
    act_scale: Any = None,
    act_zero_point: Any = None,
    act_bits: int | None = None,
) -> QModuleMixin:
    """A frozen quanto ``QLinear`` / ``QConv2d`` computing exactly our quantized layer.

    Args:
        module: the float32 ``nn.Linear`` / ``nn.Conv2d`` (bias and conv hyper-parameters are taken
            from it; its weight values are not used; the module itself is left untouched).
        w_int: integer codes, same shape as ``module.weight``, in [0, 2**bits - 1].
        scale, zero_point: per-output-channel step and integer zero point (any shape with
            ``out_channels`` elements); ``w_hat = scale * (w_int - zero_point)``.
        bits: 2 or 4 (quanto qint2/qint4, affine) or 8 (qint8, symmetric: see module docstring).
        act_scale, act_zero_point, act_bits: optional per-tensor input quantizer. Exportable only
            with ``act_bits == 8`` and ``act_zero_point`` None or 128 (symmetric int8).

    Returns:
        The quanto module, frozen (its weight is a quanto QTensor) and in inference-ready state.
        With an input quantizer its ``activations`` qtype is qint8, its input is quantized with
        ``input_scale = act_scale`` and its output is *not* quantized (``output_scale`` holds the
        NaN marker; reload with :func:`requantize_exported`).

    Raises:
        ValueError: when quanto cannot express the scheme exactly (the message says what).
    """
    w_int, scale, zero_point = _check_weight(module, w_int, scale, zero_point, bits)
    act_step = _check_activation(act_scale, act_zero_point, act_bits)
    act_qtype = None if act_step is None else qint8
    qcls = QConv2d if isinstance(module, nn.Conv2d) else QLinear
    # from_module reuses module.weight / module.bias: the weight is replaced below, the bias copied.
    qmodule = qcls.from_module(module, weights=_WEIGHT_QTYPES[bits], activations=act_qtype)
    build = _qbytes_weight if bits == 8 else _qbits_weight
    qmodule.weight = nn.Parameter(build(qmodule, w_int, scale, zero_point), requires_grad=False)
    if module.bias is not None:
        qmodule.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    if act_step is not None:
        qmodule.input_scale.fill_(act_step)
        _use_input_only_activations(qmodule)
    logger.debug(
        "built %s: %d-bit weights (group_size=%s), activations=%s",
        qcls.__name__, bits, qmodule.weight_group_size, "none" if act_qtype is None else act_qtype.name,
    )
    return qmodule


def restore_input_only_activations(model: nn.Module) -> list[str]:
    """Re-apply our activation semantics after a quanto reload; returns the affected module names.

    quanto's ``requantize`` rebuilds every module with ``activations=qint8`` using quanto's hooks
    (output quantized, QConv2d input not). Modules exported by :func:`to_quanto_module` are
    recognised by their NaN ``output_scale`` and get the output hook removed and the input hook
    added. Other (genuinely quanto-calibrated) modules are left alone. Idempotent.
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, QModuleMixin) and m.activation_qtype is not None and torch.isnan(m.output_scale).all():
            _use_input_only_activations(m)
            names.append(name)
    return names


def requantize_exported(
    model: nn.Module,
    state_dict: dict[str, Any],
    quantization_map: dict[str, dict[str, str]],
    device: torch.device | None = None,
) -> nn.Module:
    """quanto ``requantize`` followed by :func:`restore_input_only_activations` (in place; returns ``model``)."""
    requantize(model, state_dict, quantization_map, device=device)
    names = restore_input_only_activations(model)
    if names:
        logger.info("restored input-only activation quantization on %d module(s)", len(names))
    return model


# ----------------------------------------------------------------------------- whole models

# The folder layout of optimum-quanto's own ``QuantizedDiffusersModel`` (models/diffusers_models.py):
# the base model's config, its state dict with quanto's flattened QTensors, and quanto's quantization map.
MODEL_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
QMAP_NAME = "quanto_qmap.json"

_WEIGHT_SHIFT_LIMITS = (-128, 127)  # qint8 data range; see _qbytes_weight
_GAQ_ATTRIBUTES = ("gaq_config", "gaq_wrap", "gaq_report", "gaq_evaluation", "gaq_base_model")

# Reasons a model is refused; the keys group the offending layers in the error message.
_R_NOT_FROZEN = "weights are not calibrated (weight quantizer not frozen); quantize with quantize_pipeline() first"
_R_FP_WEIGHT_QUANT_ACT = (
    "full-precision weights with a quantized input (a per-layer 'a<A>' precision): a quanto module built "
    "here quantizes its weight; give these layers weight bits (e.g. 'w8a8') or 'fp'"
)
_R_WEIGHT_OFF = (
    "weight quantization is switched off (set_quant_state): the model computes with float weights, "
    "which a quanto module cannot"
)
_R_ASYM_W8 = (
    "asymmetric 8-bit weights: quanto's qint8 weights are symmetric (int8 data times a per-channel scale, no "
    "zero point), and here some code minus its zero point leaves int8 [-128, 127] (quantize with weight_symmetric=True)"
)
_R_SPLIT = (
    "split input (split_shortcut=True): two activation quantizers on the two halves of a skip concatenation, "
    "but a quanto module has a single input scale (quantize with split_shortcut=False)"
)
_R_ASYM_ACT = (
    "asymmetric activation quantizer (act_symmetric=False): quanto's qint8 activations are symmetric, "
    "clamp(round(x/s), -128, 127) with no zero point (quantize with act_symmetric=True)"
)
_R_ACT_BITS = "activations other than 8-bit: quanto quantizes activations to qint8 only"
_R_TIMESTEP_AWARE = (
    "timestep-aware activation quantizers (one step size per timestep group): quanto's activation scale is one "
    "static value per module"
)
_R_OBSERVING = "activation quantizer is still observing (calibration did not finish)"
_R_ATTENTION = (
    "quantized attention matmuls (quantize_attention=True): q, k, v and the softmax probabilities are quantized "
    "inside the attention product, which quanto has no module for (quantize with quantize_attention=False)"
)


def _base_class(model: nn.Module) -> type:
    """The diffusers class under our ``Quantized*`` subclass (the model's own class if it has none)."""
    from .models.quantized import QuantizedModelMixin

    return next(c for c in type(model).__mro__ if not issubclass(c, QuantizedModelMixin))


def _per_out_channel(t: torch.Tensor, out_channels: int) -> torch.Tensor:
    # A per-tensor weight quantizer is the per-channel one with every channel equal.
    t = t.detach().reshape(-1)
    return t.expand(out_channels) if t.numel() == 1 else t


def _act_is_applied(layer) -> bool:
    """Whether the wrapper quantizes its input in its current state (mirrors QuantLayer.forward)."""
    aq = layer.act_quantizer
    return bool(layer.use_act_quant and aq is not None and (aq.observing or bool(aq.initialized)))


def _layer_plan(layer, activations: bool) -> tuple[dict | None, str | None]:
    """``to_quanto_module`` keyword arguments for one QuantLayer, or the reason quanto cannot express it."""
    wq = layer.weight_quantizer
    if wq is None:  # a per-layer "a<A>" tag: weights kept in full precision
        if activations and _act_is_applied(layer):
            return None, _R_FP_WEIGHT_QUANT_ACT
        return {}, None  # nothing quantized: the layer stays a plain nn.Conv2d / nn.Linear
    if wq.mode != "frozen" or wq.codes is None:
        return None, _R_NOT_FROZEN
    if not layer.use_weight_quant:
        return None, _R_WEIGHT_OFF
    if wq.bits not in _WEIGHT_QTYPES:
        return None, f"{wq.bits}-bit weights: quanto has qint2, qint4 and qint8 weights only"
    out_channels = layer.layer.weight.shape[0]
    scale = _per_out_channel(wq.scale, out_channels)
    zero_point = _per_out_channel(wq.zero_point, out_channels)
    if wq.bits == 8:
        # Checked here (to_quanto_module would too) to report it once for all layers, in our terms.
        shifted = wq.codes.to(torch.int16) - _channel_view(zero_point, wq.codes.dim()).to(torch.int16)
        if int(shifted.min()) < _WEIGHT_SHIFT_LIMITS[0] or int(shifted.max()) > _WEIGHT_SHIFT_LIMITS[1]:
            return None, _R_ASYM_W8
    kwargs = dict(w_int=wq.codes, scale=scale, zero_point=zero_point, bits=wq.bits)
    if activations and _act_is_applied(layer):
        aq = layer.act_quantizer
        if aq.observing:
            return None, _R_OBSERVING
        if aq.timestep_aware:
            return None, _R_TIMESTEP_AWARE
        if layer.split_quantizer is not None:
            return None, _R_SPLIT
        if aq.bits != _ACT_BITS:
            return None, _R_ACT_BITS
        if aq.unsigned or float(aq.zero_point) != _ACT_SYMMETRIC_ZERO_POINT:
            return None, _R_ASYM_ACT
        # The step our ActQuantizer uses in its forward, to the bit (float32 arithmetic).
        kwargs.update(act_scale=aq.scale.detach().abs() + 1e-12, act_zero_point=aq.zero_point.detach(), act_bits=aq.bits)
    return kwargs, None


def _format_problems(problems: dict[str, list[str]], activations: bool) -> str:
    lines = [
        "cannot export this model to optimum-quanto exactly; nothing was exported. "
        f"{sum(map(len, problems.values()))} module(s) use what quanto cannot express:"
    ]
    for reason, names in problems.items():
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        lines.append(f"  - {reason}: {shown}")
    if activations and set(problems) <= {_R_SPLIT, _R_ASYM_ACT, _R_ACT_BITS, _R_ATTENTION, _R_FP_WEIGHT_QUANT_ACT,
                                         _R_TIMESTEP_AWARE}:
        lines.append(
            "Every problem is in the activation quantization: export_to_quanto(model, activations=False) exports the "
            "weights exactly and drops activation quantization (outputs then differ from this fake-quant model)."
        )
    return "\n".join(lines)


@torch.no_grad()
def export_to_quanto(quantized_unet: nn.Module, *, activations: bool = True) -> nn.Module:
    """A new model running on optimum-quanto modules that computes what our fake-quant model computes.

    The result is a copy of ``quantized_unet`` as its base diffusers class (e.g. ``UNet2DModel``, not
    our ``QuantizedUNet2DModel``: it has no diffusers-gaq state) in which every fake-quant wrapper
    (``QuantConv2d`` / ``QuantLinear``) is replaced by a frozen quanto ``QConv2d`` / ``QLinear`` built
    with :func:`to_quanto_module` from our integer codes, scales and zero points (and, with
    ``activations=True``, the wrapper's input quantizer). Layers kept in full precision stay plain
    ``nn.Conv2d`` / ``nn.Linear``; attention modules get back the processor our
    ``QuantAttnProcessor`` replaced. ``quantized_unet`` is not modified, and the float weights of
    the quantized layers are not copied. Types are per module (per-layer precision): a layer with
    8-bit weights gets qint8, with 4-bit qint4, with 2-bit qint2, and a layer whose weights are
    full precision (``layer_precision`` tag ``"fp"``, ``"a<A>"`` with ``activations=False``, or
    ``keep_fp``) stays a plain layer.

    Args:
        quantized_unet: a calibrated model from :func:`diffusers_gaq.quantize_pipeline` or
            ``QuantizedUNet2DModel.from_pretrained`` (float32).
        activations: ``True`` (default) exports the activation quantization too, so that the quanto
            model reproduces ours up to float32 summation order (see the module docstring). This
            requires what quanto can express: 8-bit symmetric activations (``act_symmetric=True``),
            one quantizer per input (``split_shortcut=False``) and unquantized attention matmuls
            (``quantize_attention=False``). ``False`` exports the weights only: every weight still
            dequantizes bit-exactly to ours, but the inputs of the layers and the attention
            matmuls are no longer quantized, so **the outputs differ from our fake-quant model**
            (they are those of the weight-quantized, activation-FP model). A warning says what
            was dropped.

    Returns:
        The quanto model, in eval mode, without gradients. Save it with :func:`save_quanto`.

    Raises:
        ValueError: when quanto cannot express the model exactly: the message lists every
            offending layer with the reason (asymmetric 8-bit weights, weight bit widths other
            than 2/4/8, asymmetric / unsigned or non-8-bit activations, split inputs, quantized
            attention matmuls, uncalibrated layers). Nothing is silently changed.
    """
    from .models.attention import QuantAttnProcessor
    from .quant.layers import QuantLayer

    layers = [(n, m) for n, m in quantized_unet.named_modules() if isinstance(m, QuantLayer)]
    attention = [(n, m) for n, m in quantized_unet.named_modules()
                 if isinstance(getattr(m, "processor", None), QuantAttnProcessor)]
    if not layers:
        raise ValueError(f"{type(quantized_unet).__name__} has no quantized layers (QuantConv2d / QuantLinear): "
                         "quantize it with diffusers_gaq.quantize_pipeline() first")

    problems: dict[str, list[str]] = defaultdict(list)
    plans, dropped = {}, []
    for name, layer in layers:
        kwargs, reason = _layer_plan(layer, activations)
        if reason is not None:
            problems[reason].append(name)
        else:
            plans[name] = kwargs
            if _act_is_applied(layer) and "act_scale" not in kwargs:
                dropped.append(name)
    for name, module in attention:
        if module.processor.core.use_act_quant:
            if activations:
                problems[_R_ATTENTION].append(name)
            else:
                dropped.append(name)
    if problems:
        raise ValueError(_format_problems(problems, activations))

    # Build every quanto module before copying anything: to_quanto_module re-validates each layer,
    # and an error there must leave no half-exported model behind.
    qmodules = {}
    for name, layer in layers:
        if not plans[name]:  # per-module types: a full-precision layer stays a plain copy of itself
            qmodules[name] = copy.deepcopy(layer.layer)
            continue
        try:
            qmodules[name] = to_quanto_module(layer.layer, **plans[name])
        except (ValueError, TypeError) as e:
            raise ValueError(f"cannot export layer {name} to optimum-quanto: {e}") from e

    # Deep-copy the model with each wrapper swapped for its quanto module on the way (deepcopy's memo
    # returns the memoised object instead of copying), so the wrappers' float weights are never copied.
    memo = {id(layer): qmodules[name] for name, layer in layers}
    for attr in _GAQ_ATTRIBUTES:
        value = quantized_unet.__dict__.get(attr)
        if value is not None and not isinstance(value, (str, int, float, bool)):
            memo[id(value)] = None  # our calibration state does not belong in the export
    exported = copy.deepcopy(quantized_unet, memo)
    exported.__class__ = _base_class(quantized_unet)
    for attr in _GAQ_ATTRIBUTES:
        exported.__dict__.pop(attr, None)
    for name, _ in attention:
        module = exported.get_submodule(name)
        # quanto computes plain attention; the processor our wrapper replaced does exactly that.
        module.set_processor(module.processor.original_processor)

    if dropped:
        logger.warning(
            "weight-only export: activation quantization of %d module(s) was dropped (e.g. %s); the weights are exact "
            "but the quanto model's outputs differ from the fake-quant model's", len(dropped), ", ".join(dropped[:3]))
    n_act = sum(1 for p in plans.values() if "act_scale" in p)
    n_fp = sum(1 for p in plans.values() if not p)
    logger.info("exported %d layer(s) to optimum-quanto (%d with int8 input quantization), %d kept in full precision, "
                "%d attention processor(s) restored", len(qmodules) - n_fp, n_act, n_fp, len(attention))
    return exported.eval().requires_grad_(False)


def _check_exported(model: nn.Module) -> dict[str, dict[str, str]]:
    from .models.attention import QuantAttnProcessor
    from .quant.layers import QuantLayer

    leftovers = [n for n, m in model.named_modules() if isinstance(m, (QuantLayer, QuantAttnProcessor))]
    if leftovers:
        raise ValueError(f"the model still holds diffusers-gaq fake-quant modules ({', '.join(leftovers[:3])}); "
                         "save our format with save_pretrained, or export_to_quanto() first")
    qmap = quantization_map(model)
    if not qmap:
        raise ValueError("the model has no optimum-quanto modules; build one with export_to_quanto()")
    unfrozen = [n for n, m in model.named_modules() if isinstance(m, QModuleMixin) and not m.frozen]
    if unfrozen:
        raise ValueError(f"quanto modules {unfrozen[:3]} are not frozen: their float weights would be saved "
                         "unquantized; call optimum.quanto.freeze(model) first")
    return qmap


def save_quanto(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a model from :func:`export_to_quanto` in optimum-quanto's folder layout.

    The folder holds ``config.json`` (the base diffusers config), ``quanto_qmap.json`` (quanto's
    ``quantization_map``) and ``diffusion_pytorch_model.safetensors`` (the state dict, quantized
    weights flattened by quanto into integer data, scales and shifts), as quanto's own
    ``QuantizedDiffusersModel`` writes it. No quanto ``Calibration`` is ever run: the activation
    scales are ours, stored in ``input_scale``, with the NaN ``output_scale`` marker that makes
    :func:`load_quanto` (and :func:`requantize_exported`) restore input-only activation
    quantization; in quanto's terms this is the ``streamline=False`` state, whose reload is exact.
    A plain quanto reload of a model with activations gives NaN outputs instead of silently wrong ones.

    The folder is built beside ``directory`` and renamed into place; a non-empty ``directory`` is
    refused unless ``overwrite``.
    """
    from .utils import atomic_directory, atomic_save_safetensors, atomic_write_text

    qmap = _check_exported(model)
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose an empty folder or pass overwrite=True")
    # NaN is legitimate here (the output_scale marker), so unlike save_quantized there is no finiteness check.
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(target) as tmp:
        atomic_write_text(tmp / MODEL_CONFIG_NAME, model.to_json_string())
        atomic_write_text(tmp / QMAP_NAME, json.dumps(qmap, indent=2, sort_keys=True) + "\n")
        atomic_save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "exported_by": "diffusers-gaq"})
    logger.info("saved optimum-quanto model (%d quantized modules) to %s", len(qmap), target)
    return target


def _architecture(config) -> dict:
    # Keys starting with "_" (class name, diffusers version, source path) do not change the model.
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def load_quanto(directory: str | os.PathLike, base_config=None, *, device: str | torch.device | None = None) -> nn.Module:
    """Reload a :func:`save_quanto` folder: computes bit-identically to the model that was saved.

    Args:
        directory: the folder.
        base_config: the base model's diffusers config (a dict or ``model.config``); the folder's
            ``config.json`` when None. If both exist they must describe the same architecture.
        device: where to put the model (default CPU).

    The model is built without allocating float weights (accelerate's ``init_empty_weights``), then
    quanto's ``requantize`` replaces the layers named in ``quanto_qmap.json`` and loads the state dict,
    and our input-only activation semantics are restored (:func:`requantize_exported`). quanto
    loads with ``strict=False``; here every tensor of the model must come from the file, or
    ValueError names the missing / unexpected ones.
    """
    import diffusers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    folder = Path(directory)
    qmap_path, weights_path, config_path = folder / QMAP_NAME, folder / WEIGHTS_NAME, folder / MODEL_CONFIG_NAME
    for path in (qmap_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a folder written by save_quanto "
                                    f"(expected {MODEL_CONFIG_NAME}, {QMAP_NAME} and {WEIGHTS_NAME})")
    qmap = json.loads(qmap_path.read_text(encoding="utf-8"))
    saved_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    if base_config is None:
        if saved_config is None:
            raise FileNotFoundError(f"{config_path} is missing; pass base_config")
        base_config = saved_config
    base_config = dict(base_config)
    if saved_config is not None:
        given, saved = _architecture(base_config), _architecture(saved_config)
        differ = sorted(k for k in set(given) | set(saved) if given.get(k) != saved.get(k))
        if differ:
            raise ValueError(f"base_config differs from {config_path} in {differ}: the weights were saved for "
                             "another architecture")
    class_name = base_config.get("_class_name") or (saved_config or {}).get("_class_name") or "UNet2DModel"
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"unknown diffusers model class {class_name!r} in the config")

    with init_empty_weights():  # parameters on the meta device; requantize materialises them
        model = cls.from_config(base_config)
    state = load_file(str(weights_path))
    requantize_exported(model, state, qmap, device=torch.device(device) if device is not None else torch.device("cpu"))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval().requires_grad_(False)
