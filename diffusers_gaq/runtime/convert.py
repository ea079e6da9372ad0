"""Turning a calibrated fake-quant model into its runtime form, and what that form holds.

``to_integer_runtime(model)`` replaces, in place, every calibrated ``QuantConv2d`` / ``QuantLinear``
by an :class:`~diffusers_gaq.runtime.layers.IntegerConv2d` / ``IntegerLinear`` that holds int8
weights and no float copy of them, and returns a :class:`RuntimeReport` saying which kernel runs each
layer. Attention matmuls (q k^T and the probabilities times v) stay in float on fake-quantized
operands, exactly as in the simulated model: no integer batched-matmul kernel is in reach here.

Pure torch: nothing here knows about diffusers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant.layers import QuantAttentionCore, QuantLayer
from . import kernels
from .layers import IntegerLayer, integer_layer

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "onednn", "dequantize", "simulated")


@dataclass
class RuntimeReport:
    """Which kernel computes each quantized layer, and why a layer is not on an integer kernel."""

    kernels: dict[str, str] = field(default_factory=dict)  # layer name -> "onednn" / "dequantize"
    reasons: dict[str, str] = field(default_factory=dict)  # layer name -> why not "onednn"
    simulated: list[str] = field(default_factory=list)  # fake-quant modules left as they are
    attention: list[str] = field(default_factory=list)  # attention cores: float matmuls on quantized q, k, v, probs

    def count(self, kernel: str) -> int:
        return sum(1 for k in self.kernels.values() if k == kernel)

    def summary(self) -> str:
        parts = [f"{self.count('onednn')} layers on oneDNN int8 kernels",
                 f"{self.count('dequantize')} on int8 weights dequantized per call"]
        if self.simulated:
            parts.append(f"{len(self.simulated)} left simulated (float weights)")
        if self.attention:
            parts.append(f"{len(self.attention)} attention cores in float on quantized operands")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"kernels": dict(self.kernels), "reasons": dict(self.reasons), "simulated": list(self.simulated),
                "attention": list(self.attention)}


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not one of {RUNTIMES}: 'auto' runs the fastest form that reproduces "
                         "the simulated model on this device, 'simulated' the fake-quant model calibration uses")
    if runtime == "onednn" and not kernels.onednn_available():
        raise ValueError("runtime='onednn' needs oneDNN's int8 kernels, which this torch build or CPU does not offer "
                         "exactly; use runtime='auto' (int8 weights dequantized per call) or 'simulated'")
    return runtime


def is_integer_runtime(model: nn.Module) -> bool:
    return any(isinstance(m, IntegerLayer) for m in model.modules())


def to_integer_runtime(model: nn.Module, runtime: str = "auto") -> RuntimeReport:
    """Convert ``model``'s calibrated fake-quant layers in place (see the module docstring).

    ``runtime``: "auto" puts every layer it can on oneDNN (x86 CPUs) and the rest on the exact
    dequantizing kernel; "onednn" refuses, naming the layer, any layer oneDNN cannot compute exactly;
    "dequantize" uses the dequantizing kernel everywhere (any device; bit-identical to the simulation)."""
    check_runtime(runtime)
    if runtime == "simulated":
        raise ValueError("runtime='simulated' is the fake-quant model itself: there is nothing to convert")
    if is_integer_runtime(model):
        raise ValueError("the model already runs on the integer runtime")
    use_onednn = runtime in ("auto", "onednn") and kernels.onednn_available()
    report = RuntimeReport()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    plan = []
    for name, qlayer in targets:
        if qlayer.weight_quantizer is None or not qlayer.use_weight_quant:
            report.simulated.append(name)  # activation-only precision: the float weight is the layer's weight
            continue
        if qlayer.weight_quantizer.mode != "frozen":
            raise ValueError(f"layer {name} is not calibrated (weight quantizer mode "
                             f"{qlayer.weight_quantizer.mode!r}): quantize the model with quantize_pipeline() first")
        layer = integer_layer(qlayer, "dequantize")
        reason = layer.onednn_refusal() if use_onednn else "oneDNN's int8 kernels are not in use"
        if reason is None:
            layer._pack()
        elif runtime == "onednn":
            raise ValueError(f"layer {name} cannot run on oneDNN's int8 kernel: {reason}. Load with runtime='auto' "
                             "(that layer then runs on int8 weights dequantized per call), or calibrate it with an "
                             "8-bit (or narrower) quantized input")
        else:
            report.reasons[name] = reason
        report.kernels[name] = layer.kernel
        plan.append((name, layer))
    for name, layer in plan:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    if report.count("onednn"):
        # oneDNN computes in channels-last order and returns it: with every 4-D weight in that order too,
        # the float layers between the integer ones (first / last convolutions) keep it, and no activation
        # is converted back and forth.
        model.to(memory_format=torch.channels_last)
    report.attention = [n for n, m in model.named_modules() if isinstance(m, QuantAttentionCore)]
    logger.info("integer runtime: %s", report.summary())
    return report


def runtime_weight_nbytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held in memory: integer layers count their int8 values,
    scales and biases; every other parameter and buffer counts whole (norms, embeddings, FP layers,
    quantizer steps)."""
    total = 0
    integer = [m for m in model.modules() if isinstance(m, IntegerLayer)]
    owned = set()
    for layer in integer:
        total += layer.weight_nbytes()
        owned.update(id(t) for t in (layer.weight_int8, layer.weight_scale, layer.weight_offset, layer.bias)
                     if t is not None)
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in owned:
            total += t.numel() * t.element_size()
    return total
