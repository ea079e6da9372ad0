"""diffusers' loading and saving options on a quantized model: what applies, and the refusals by name
(before anything is read or written) of what cannot. Half precision is accepted: see quantized_forward.py."""

from __future__ import annotations

from pathlib import Path

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


_PUSH_OPTIONS = {"token", "private", "commit_message", "create_pr"}


def check_save_options(variant, kwargs: dict) -> None:
    """``save_pretrained`` options: ``variant`` cannot apply (a quantized model is saved once, in its
    format); the Hub options go to the push; anything else is a typo."""
    if variant is not None:
        raise ValueError(f"variant={variant!r} cannot apply to a quantized model: it is saved once, in the quantized "
                         "format (the other components of a pipeline as they are)")
    unknown = sorted(set(kwargs) - _PUSH_OPTIONS - {"safe_serialization", "max_shard_size"})
    if unknown:
        raise TypeError(f"save_pretrained() got unexpected options {unknown}")


def push_saved(folder: Path, repo_id: str | None, kwargs: dict):
    """``save_pretrained(..., push_to_hub=True)``: upload exactly the folder just saved, to ``repo_id``
    (default: the folder's name, as diffusers does)."""
    from .hub import push_folder

    options = {k: v for k, v in kwargs.items() if k in _PUSH_OPTIONS}
    options["create_pr"] = bool(options.get("create_pr", False))
    return push_folder(folder, repo_id or Path(folder).name, **options)
