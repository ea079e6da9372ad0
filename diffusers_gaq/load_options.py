"""What a quantized model does with diffusers' loading options and with half precision.

A quantized model computes in float32: integer weights, float32 scales and activation steps, the
integer kernels' float32 interface. Inside a float16 / bfloat16 pipeline it takes half-precision
inputs, computes in float32 and returns its output in the input's dtype. Loading options that cannot
apply to a saved quantized model are refused by name, before anything is read.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

QUANTIZE_ON_LOAD_REFUSAL = (
    "diffusers-gaq does not quantize while loading: its calibration samples the whole FP pipeline (the "
    "scheduler's trajectory, the conditioning from its encoders) and learns from those samples, which a "
    "per-model loading hook cannot do. Load the FP pipeline, then call "
    "diffusers_gaq.quantize_pipeline(pipe, GradientAlignedQuantizer(...)) (CLI: diffusers-gaq quantize); save "
    "the result with save_pretrained and load that folder with DiffusionPipeline.from_pretrained after "
    "`import diffusers_gaq`")


def check_torch_dtype(torch_dtype) -> None:
    """float32, float16 and bfloat16 load (see the module docstring); anything else is refused."""
    if torch_dtype is not None and torch_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"torch_dtype={torch_dtype} cannot apply to a diffusers-gaq quantized model: it computes in "
                         "float32 (integer weights) and accepts float32, float16 or bfloat16 inputs")


def refuse_loading_options(kwargs: dict) -> None:
    if kwargs.get("quantization_config") is not None:
        raise ValueError(f"quantization_config= cannot apply to a saved diffusers-gaq model, which is quantized "
                         f"already. {QUANTIZE_ON_LOAD_REFUSAL}")
    for name in ("device_map", "variant"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}={kwargs[name]!r} cannot apply to a diffusers-gaq checkpoint (one float32 model "
                             "of integer weights, saved once); load it without it and move it with .to(device)")


def to_float32(value):
    """Floating tensors (also inside tuples, lists and dicts such as added_cond_kwargs) as float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def input_dtype(args: tuple, kwargs: dict) -> torch.dtype:
    # The sample (UNets) or hidden_states (transformers): the first tensor argument.
    first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    return first.dtype if isinstance(first, torch.Tensor) and first.is_floating_point() else torch.float32


def cast_output(output, dtype: torch.dtype):
    if isinstance(output, torch.Tensor):
        return output.to(dtype) if output.is_floating_point() else output
    if isinstance(output, tuple):
        return tuple(cast_output(v, dtype) for v in output)
    for key, value in list(output.items()):  # diffusers' BaseOutput is an ordered dict of its fields
        output[key] = cast_output(value, dtype)
    return output


def log_float32_compute(model, dtype: torch.dtype) -> None:
    if not getattr(model, "_told_float32_compute", False):
        model._told_float32_compute = True
        logger.info("%s keeps computing in float32 (integer weights, float32 scales); it takes and returns %s "
                    "tensors for the %s pipeline around it", type(model).__name__, dtype, dtype)
