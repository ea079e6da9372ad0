"""Swap a model's Conv2d / Linear layers for fake-quant wrappers, list its reconstruction
units in execution order, and switch quantization on and off."""

from __future__ import annotations

import difflib
import fnmatch
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import SAME_TAG, GradientAlignedQuantizer, parse_precision
from ..quant.layers import QuantAttentionCore, QuantConv2d, QuantLayer, QuantLinear
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from .attention import QuantAttnProcessor

logger = logging.getLogger(__name__)


@dataclass
class WrapReport:
    """What was wrapped: per-layer bit widths, layers kept in FP, split inputs, attention cores."""

    layer_bits: dict[str, dict] = field(default_factory=dict)
    kept_fp: list[str] = field(default_factory=list)
    split_layers: dict[str, int] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def act_range_method(config: GradientAlignedQuantizer) -> str:
    """The ActQuantizer range method of ``config.act_range_init`` ("ema_shuffled" is "ema" over
    batches in shuffled order: the order is the calibration's business)."""
    return "ema" if config.act_range_init == "ema_shuffled" else config.act_range_init


def act_groups_for(name: str, config: GradientAlignedQuantizer) -> int:
    """Step sizes of the input activation quantizer(s) of layer / attention module ``name``."""
    return config.num_act_timestep_groups if _matches(name, config.timestep_aware_acts) else 1


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "processor")


def _pattern_targets(model: nn.Module) -> list[str]:
    """Names a precision pattern may match: every Conv2d / Linear, and attention modules (their matmuls)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) or (n and _is_attention(m))]


# The flag each pattern field comes from on the command line, for the messages.
_PATTERN_FLAGS = {"layer_precision": "--layer-precision", "keep_fp": "--config keep_fp",
                  "timestep_aware_acts": "--timestep-aware"}


def check_layer_patterns(model: nn.Module, config: GradientAlignedQuantizer, family=None) -> None:
    """Refuse a pattern of layer_precision, keep_fp or timestep_aware_acts that matches no layer or
    attention module of ``model``: a typo would otherwise silently leave the setting unused. One
    rule for every pattern field; the message names the field, the pattern and a few real names."""
    names = _pattern_targets(model)
    for option in ("layer_precision", "keep_fp", "timestep_aware_acts"):
        for pattern in getattr(config, option):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(_unmatched_message(option, pattern, names, type(model).__name__))
    first_last = set(family.first_last_layers(model)) if family is not None else set()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if layers and all(resolve_precision(n, config, first_last) == (None, None) for n in layers):
        raise ValueError(f"the precision settings keep all {len(layers)} Conv2d / Linear layers of this "
                         f"{type(model).__name__} in full precision (keep_fp / layer_precision 'fp' / "
                         "first_last_precision): nothing would be quantized; narrow the patterns")


def _unmatched_message(option: str, pattern: str, names: list[str], model_class: str) -> str:
    hint = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4) or names[:3] + names[-2:]
    return (f"GradientAlignedQuantizer.{option} pattern {pattern!r} matches no Conv2d / Linear layer or attention "
            f"module of this {model_class} (CLI: {_PATTERN_FLAGS[option]}); layer names look like "
            f"{', '.join(hint)} (fnmatch patterns: '*' matches dots too, e.g. 'down_blocks.0.*')")


def resolve_precision(name: str, config: GradientAlignedQuantizer, first_last=()) -> tuple[int | None, int | None]:
    """(weight bits, activation bits) of the module ``name``, None meaning full precision:
    keep_fp > layer_precision (first matching pattern) > first_last_precision (for names in
    ``first_last``) > the global weight_bits / act_bits."""
    if _matches(name, config.keep_fp):
        return None, None
    for pattern, tag in config.layer_precision.items():
        if fnmatch.fnmatchcase(name, pattern):
            return parse_precision(tag)
    if name in first_last and config.first_last_precision != SAME_TAG:
        return parse_precision(config.first_last_precision)
    return config.weight_bits, config.act_bits


def wrap_model(model: nn.Module, config: GradientAlignedQuantizer, family) -> WrapReport:
    """Replace every nn.Conv2d / nn.Linear of ``model`` in place by a wrapper with the quantizers
    its resolved precision asks for (see :func:`resolve_precision`; layers resolved to full
    precision stay as they are and are listed in ``kept_fp``) and give attention modules a
    quantized processor. Quantization starts off."""
    if any(isinstance(m, (QuantLayer, QuantAttnProcessor)) for m in model.modules()):
        raise ValueError("this model is already wrapped for quantization; wrap the original full-precision model")
    check_layer_patterns(model, config, family)
    report = WrapReport()
    splits = family.skip_splits(model) if config.split_shortcut else {}
    first_last = set(family.first_last_layers(model))
    act_kwargs = dict(symmetric=config.act_symmetric, momentum=config.act_ema_momentum,
                      range_method=act_range_method(config))
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        weight_bits, act_bits = resolve_precision(name, config, first_last)
        if weight_bits is None and act_bits is None:
            report.kept_fp.append(name)
            continue
        wq = None if weight_bits is None else WeightQuantizer(
            weight_bits, per_channel=config.weight_granularity == "per_channel", symmetric=config.weight_symmetric,
            init="minmax" if config.method == "minmax" else config.weight_init)
        groups = act_groups_for(name, config)
        aq = ActQuantizer(act_bits, num_groups=groups, **act_kwargs) if act_bits else None
        split = splits.get(name)
        sq = ActQuantizer(act_bits, num_groups=groups, **act_kwargs) if (split and aq is not None) else None
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        _set_submodule(model, name, cls(module, wq, aq, split_at=split if sq else None, split_quantizer=sq))
        report.layer_bits[name] = {"weight_bits": weight_bits, "act_bits": act_bits}
        if sq is not None:
            report.split_layers[name] = split
    if config.quantize_attention:
        _wrap_attention(model, config, report, act_kwargs)
    return report


def _wrap_attention(model: nn.Module, config: GradientAlignedQuantizer, report: WrapReport, act_kwargs: dict) -> None:
    """A quantized core for every attention module whose name resolves to quantized activations."""
    for name, module in model.named_modules():
        if not _is_attention(module):
            continue
        _, act_bits = resolve_precision(name, config)
        # A core outside any reconstruction unit would never be calibrated: units are made of wrapped layers.
        holds_wrapped = any(isinstance(m, QuantLayer) for m in module.modules())
        if act_bits and holds_wrapped:
            core = QuantAttentionCore(act_bits, num_groups=act_groups_for(name, config),
                                      max_chunk_bytes=config.attention_chunk_bytes, **act_kwargs)
            module.set_processor(QuantAttnProcessor(module.processor, core))
            report.attention.append(name)


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def attention_cores(model: nn.Module) -> list[tuple[str, QuantAttentionCore]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAttentionCore)]


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_quant_state(model: nn.Module, weight: bool, act: bool) -> None:
    """Switch weight / activation quantization of every wrapper under ``model``."""
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.use_weight_quant, m.use_act_quant = weight, act
        elif isinstance(m, QuantAttentionCore):
            m.use_act_quant = act


def set_observing(model: nn.Module, observing: bool) -> None:
    for q in act_quantizers(model):
        q.observing = observing


@torch.no_grad()
def reconstruction_units(model: nn.Module, family) -> list[tuple[str, nn.Module]]:
    """Reconstruction units in the order the forward pass runs them: the outermost modules of the
    family's unit types that hold quantized layers, plus quantized layers outside any unit."""
    qnames = [n for n, _ in quant_layers(model)]
    units: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, family.unit_types) and any(q.startswith(name + ".") for q in qnames):
            if not any(name.startswith(u + ".") for u in units):
                units[name] = module
    for name in qnames:
        if not any(name.startswith(u + ".") for u in units):
            units[name] = model.get_submodule(name)
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
             for n, m in units.items()]
    try:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        x, t, cond = family.example_input(model)
        family.forward(model, x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()})
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in units if n not in order]
    if missing:
        raise RuntimeError(f"reconstruction units never called in a forward pass: {missing}")
    return [(n, units[n]) for n in order]
