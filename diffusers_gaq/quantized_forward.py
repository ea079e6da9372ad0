"""The forward of the Quantized* classes: half-precision inputs and the timestep groups.

A quantized model computes in float32: integer weights, float32 scales and activation steps, the
integer kernels' float32 interface. Inside a float16 / bfloat16 pipeline it takes half-precision
inputs, computes in float32 and returns its output in the input's dtype. Before the base class's
forward, timestep-aware activation quantizers get the group of each sample's timestep; doing it in
the forward rather than in a pre-hook lets torch.compile(model) capture one graph.
"""

from __future__ import annotations

import functools
import logging

import torch

from .models.timestep_groups import set_timestep_groups

logger = logging.getLogger(__name__)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def to_float32(value):
    """Half-precision tensors (also inside tuples, lists and dicts such as added_cond_kwargs) as float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in HALF_DTYPES else value
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


def quantized_forward(base_forward):
    """``base_forward`` (the diffusers class's forward) with the float32 bridge and the timestep-group
    lookup; ``functools.wraps`` keeps the base's signature, which diffusers inspects."""
    @functools.wraps(base_forward)
    def forward(self, *args, **kwargs):
        dtype = input_dtype(args, kwargs)
        half = dtype in HALF_DTYPES  # float32 and float64 (a float64 simulation) pass through as they are
        if half:
            args, kwargs = to_float32(args), to_float32(kwargs)
        set_timestep_groups(self, args, kwargs)
        output = base_forward(self, *args, **kwargs)
        return cast_output(output, dtype) if half else output
    return forward
