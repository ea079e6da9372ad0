"""A whole quantized model to a plain diffusers model with optimum-quanto modules: the plan per
layer, the refusals with their reasons, the export."""

from __future__ import annotations

import copy
import logging
from collections import defaultdict

import torch
from optimum.quanto import quantization_map
from optimum.quanto.nn import QModuleMixin
from torch import nn

from ..models.attention import QuantAttnProcessor
from ..models.plain import plain_copy, quantized_attention
from ..models.wrap import quant_layers
from ..quant.layers import QuantLayer
from ..runtime import is_integer_runtime
from .layers import _ACT_BITS, _ACT_SYMMETRIC_ZERO_POINT, _WEIGHT_QTYPES, _channel_view, to_quanto_module

logger = logging.getLogger(__name__)


# The folder layout of optimum-quanto's own ``QuantizedDiffusersModel`` (models/diffusers_models.py):
# the base model's config, its state dict with quanto's flattened QTensors, and quanto's quantization map.
MODEL_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
QMAP_NAME = "quanto_qmap.json"

_WEIGHT_SHIFT_LIMITS = (-128, 127)  # qint8 data range; see _qbytes_weight

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
    if is_integer_runtime(quantized_unet):
        raise ValueError("the model runs on diffusers-gaq's integer runtime; export the simulated model instead: "
                         "Quantized<Class>.from_pretrained(path, runtime='simulated')")
    layers = quant_layers(quantized_unet)
    attention = quantized_attention(quantized_unet)
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

    exported = plain_copy(quantized_unet, qmodules)  # quanto computes plain attention: processors restored
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


