"""diffusers' loading options on a saved quantized model: what applies, and the refusals by name
(before anything is read) of what cannot. Half precision is accepted: see quantized_forward.py."""

from __future__ import annotations

import torch

QUANTIZE_ON_LOAD_REFUSAL = (
    "diffusers-gaq does not quantize while loading: its calibration samples the whole FP pipeline (the "
    "scheduler's trajectory, the conditioning from its encoders) and learns from those samples, which a "
    "per-model loading hook cannot do. Load the FP pipeline, then call "
    "diffusers_gaq.quantize_pipeline(pipe, GradientAlignedQuantizer(...)) (CLI: diffusers-gaq quantize); save "
    "the result with save_pretrained and load that folder with DiffusionPipeline.from_pretrained after "
    "`import diffusers_gaq`")


def check_torch_dtype(torch_dtype) -> None:
    """float32, float16 and bfloat16 load (quantized_forward.py); anything else is refused."""
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
