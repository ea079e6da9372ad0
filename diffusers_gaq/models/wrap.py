"""Swap a model's Conv2d / Linear layers for fake-quant wrappers, list its reconstruction
units in execution order, and switch quantization on and off."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import GradientAlignedQuantizer
from ..quant.layers import QuantAttentionCore, QuantConv2d, QuantLayer, QuantLinear
from ..quant.quantizers import ActQuantizer, WeightQuantizer
from .attention import QuantAttnProcessor


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


def wrap_model(model: nn.Module, config: GradientAlignedQuantizer, family) -> WrapReport:
    """Replace every nn.Conv2d / nn.Linear of ``model`` in place (unless ``config.keep_fp``
    matches its name) and give attention modules a quantized processor. Quantization starts off."""
    if any(isinstance(m, (QuantLayer, QuantAttnProcessor)) for m in model.modules()):
        raise ValueError("this model is already wrapped for quantization; wrap the original full-precision model")
    report = WrapReport()
    splits = family.skip_splits(model) if config.split_shortcut and config.act_bits else {}
    act_kwargs = dict(symmetric=config.act_symmetric, momentum=config.act_ema_momentum,
                      range_method=act_range_method(config))
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if _matches(name, config.keep_fp):
            report.kept_fp.append(name)
            continue
        wq = WeightQuantizer(config.weight_bits, per_channel=config.weight_granularity == "per_channel",
                             symmetric=config.weight_symmetric,
                             init="minmax" if config.method == "minmax" else config.weight_init)
        groups = act_groups_for(name, config)
        aq = ActQuantizer(config.act_bits, num_groups=groups, **act_kwargs) if config.act_bits else None
        split = splits.get(name)
        sq = ActQuantizer(config.act_bits, num_groups=groups, **act_kwargs) if (split and aq is not None) else None
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        _set_submodule(model, name, cls(module, wq, aq, split_at=split if sq else None, split_quantizer=sq))
        report.layer_bits[name] = {"weight_bits": config.weight_bits, "act_bits": config.act_bits}
        if sq is not None:
            report.split_layers[name] = split
    if config.quantize_attention and config.act_bits:
        for name, module in model.named_modules():
            if hasattr(module, "set_processor") and hasattr(module, "processor") and not _matches(name, config.keep_fp):
                core = QuantAttentionCore(config.act_bits, num_groups=act_groups_for(name, config), **act_kwargs)
                module.set_processor(QuantAttnProcessor(module.processor, core))
                report.attention.append(name)
    return report


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
