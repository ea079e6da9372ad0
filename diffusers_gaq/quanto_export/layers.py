"""One quantized layer to one optimum-quanto module (QLinear / QConv2d), exactly (see the package docstring)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from optimum.quanto import qint2, qint4, qint8, requantize
from optimum.quanto.nn import QConv2d, QLinear, QModuleMixin
from optimum.quanto.tensor import group
from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor
from torch import nn

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


