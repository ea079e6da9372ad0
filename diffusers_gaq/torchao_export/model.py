"""A whole calibrated model to a plain diffusers model with torchao weights, and the pipeline save.

The exported model carries diffusers' own torchao quantizer, set up as ``from_pretrained`` sets it
up for a pre-quantized checkpoint, so diffusers' ``save_pretrained`` / ``push_to_hub`` write the
format its ``TorchAoConfig`` loading path reads (safetensors with torchao's flattening metadata,
the config under ``quantization_config`` in ``config.json``).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_directory
from ..folders import check_new_or_empty
from ..models.plain import plain_copy, quantized_attention
from ..models.wrap import quant_layers
from ..runtime import is_integer_runtime
from .tensors import intx_weight

logger = logging.getLogger(__name__)


def _weight_config(bits: int):
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis

    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerAxis(0),
                                mapping_type=MappingType.ASYMMETRIC)


def torchao_config(layer_bits: dict[str, int], keep: list[str] = ()):
    """diffusers' ``TorchAoConfig`` describing the export: one ``IntxWeightOnlyConfig`` when every
    quantized layer (``layer_bits``: name to weight width) has the same width, else one per layer
    (``FqnToConfig``); the float ``Conv2d`` / ``Linear`` layers ``keep`` are listed in
    ``modules_to_not_convert``."""
    from diffusers import TorchAoConfig
    from torchao.quantization import FqnToConfig

    widths = set(layer_bits.values())
    keep = sorted(keep)
    if not widths:
        raise ValueError("no layer has quantized weights: nothing to export")
    if len(widths) == 1:
        quant_type = _weight_config(widths.pop())
    else:
        quant_type = FqnToConfig({name: _weight_config(bits) for name, bits in sorted(layer_bits.items())})
    return TorchAoConfig(quant_type=quant_type, modules_to_not_convert=keep or None)


def _exported_layer(name: str, layer: nn.Module) -> tuple[nn.Module, int | None]:
    """A plain copy of the wrapped layer whose weight is the torchao tensor (or stays float)."""
    wq = layer.weight_quantizer
    if wq is None:  # weights kept in full precision by the layer's precision tag
        return copy.deepcopy(layer.layer), None
    if wq.mode != "frozen" or wq.codes is None:
        raise ValueError(f"layer {name}: weights are not calibrated (quantizer mode {wq.mode!r}); "
                         "quantize with diffusers_gaq.quantize_pipeline() first")
    if not layer.use_weight_quant:
        raise ValueError(f"layer {name}: weight quantization is switched off (set_quant_state); switch it on "
                         "before exporting, or the export would not compute what the model computes")
    inner = layer.layer
    weight = intx_weight(wq.codes, wq.scale, wq.zero_point, wq.bits, dtype=inner.weight.dtype)
    # The float weight is replaced, never copied: the memo hands deepcopy the new parameter.
    memo = {id(inner.weight): nn.Parameter(weight, requires_grad=False)}
    return copy.deepcopy(inner, memo), wq.bits


def _attach_torchao_quantizer(model: nn.Module, config) -> None:
    # The steps diffusers' ModelMixin.from_pretrained takes for a pre-quantized torchao checkpoint;
    # with them, diffusers' save_pretrained flattens the torchao tensors into safetensors.
    from diffusers.quantizers import DiffusersAutoQuantizer

    quantizer = DiffusersAutoQuantizer.from_config(config, pre_quantized=True)
    quantizer.validate_environment(device_map=None)
    quantizer.preprocess_model(model, device_map=None)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    model.register_to_config(quantization_config=config)  # from_pretrained has it in the config dict it builds from


@torch.no_grad()
def export_to_torchao(quantized_model: nn.Module) -> nn.Module:
    """A plain diffusers model (``UNet2DModel``, ``DiTTransformer2DModel``, ...) whose quantized
    layers hold torchao ``IntxUnpackedToInt8Tensor`` weights equal to ours to the bit.

    Weight-only (see the package docstring): activation quantization and quantized attention are
    dropped, with a warning naming how many modules lose it. Save the result with its own
    ``save_pretrained`` (or ``push_to_hub``): stock diffusers loads it back with
    ``from_pretrained(folder, torch_dtype=torch.float32)`` when torchao is installed.

    Raises:
        ImportError: torchao is not installed.
        ValueError: the model runs on the integer runtime (export the simulated model), has no
            quantized layers, or a layer is not calibrated or has weight quantization switched off.
    """
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise ImportError("the torchao export needs torchao: pip install torchao") from e
    if is_integer_runtime(quantized_model):
        raise ValueError("the model runs on diffusers-gaq's integer runtime; export the simulated model instead: "
                         "Quantized<Class>.from_pretrained(path, runtime='simulated')")
    layers = quant_layers(quantized_model)
    if not layers:
        raise ValueError(f"{type(quantized_model).__name__} has no quantized layers: quantize it with "
                         "diffusers_gaq.quantize_pipeline() first")
    replacements, layer_bits = {}, {}
    for name, layer in layers:  # every layer is checked before anything is copied
        replacements[name], layer_bits[name] = _exported_layer(name, layer)
    dropped = [name for name, layer in layers if layer.act_quantizer is not None and layer.use_act_quant]
    dropped += [name for name, module in quantized_attention(quantized_model) if module.processor.core.use_act_quant]
    exported = plain_copy(quantized_model, replacements)
    layer_bits = {name: bits for name, bits in layer_bits.items() if bits is not None}
    keep = [name for name, module in exported.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in layer_bits]
    _attach_torchao_quantizer(exported, torchao_config(layer_bits, keep))
    if dropped:
        logger.warning("torchao export is weight-only: the activation quantization of %d module(s) (e.g. %s) is not "
                       "carried, so the exported model computes with float activations", len(dropped),
                       ", ".join(dropped[:3]))
    logger.info("exported %d layer(s) to torchao intx weights, %d kept in full precision", len(layer_bits), len(keep))
    return exported.eval().requires_grad_(False)


def save_torchao_pipeline(pipe, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save ``pipe`` with its quantized denoiser exported to torchao (:func:`export_to_torchao`), the
    other components as diffusers saves them, atomically. Stock diffusers loads the folder with
    ``DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)`` (torchao installed)."""
    component = next((name for name, value in pipe.components.items()
                      if isinstance(value, nn.Module) and quant_layers(value)), None)
    if component is None:
        raise TypeError(f"the {type(pipe).__name__} holds no quantized denoiser; quantize it with "
                        "diffusers_gaq.quantize_pipeline() or load a quantized folder with runtime='simulated'")
    exported = export_to_torchao(pipe.components[component])
    plain = type(pipe)(**{**pipe.components, component: exported})
    target = Path(save_directory)
    if not overwrite:
        check_new_or_empty(target)
    with atomic_directory(target) as tmp:
        plain.save_pretrained(tmp)
    logger.info("saved the pipeline with a torchao %s to %s", component, target)
    return target
