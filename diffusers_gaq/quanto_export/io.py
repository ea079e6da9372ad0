"""Save and load an exported model in optimum-quanto's own folder layout."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn

from ..files import atomic_directory, atomic_save_safetensors, atomic_write_text
from .layers import requantize_exported
from .model import MODEL_CONFIG_NAME, QMAP_NAME, WEIGHTS_NAME, _check_exported

logger = logging.getLogger(__name__)

def save_quanto(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a model from :func:`export_to_quanto` in optimum-quanto's folder layout.

    The folder holds ``config.json`` (the base diffusers config), ``quanto_qmap.json`` (quanto's
    ``quantization_map``) and ``diffusion_pytorch_model.safetensors`` (the state dict, quantized
    weights flattened by quanto into integer data, scales and shifts), as quanto's own
    ``QuantizedDiffusersModel`` writes it. No quanto ``Calibration`` is ever run: the activation
    scales are ours, stored in ``input_scale``, with the NaN ``output_scale`` marker that makes
    :func:`load_quanto` (and :func:`requantize_exported`) restore input-only activation
    quantization; in quanto's terms this is the ``streamline=False`` state, whose reload is exact.
    A plain quanto reload of a model with activations gives NaN outputs instead of silently wrong ones.

    The folder is built beside ``directory`` and renamed into place; a non-empty ``directory`` is
    refused unless ``overwrite``.
    """
    qmap = _check_exported(model)
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose an empty folder or pass overwrite=True")
    # NaN is legitimate here (the output_scale marker), so unlike save_quantized there is no finiteness check.
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(target) as tmp:
        atomic_write_text(tmp / MODEL_CONFIG_NAME, model.to_json_string())
        atomic_write_text(tmp / QMAP_NAME, json.dumps(qmap, indent=2, sort_keys=True) + "\n")
        atomic_save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "exported_by": "diffusers-gaq"})
    logger.info("saved optimum-quanto model (%d quantized modules) to %s", len(qmap), target)
    return target


def _architecture(config) -> dict:
    # Keys starting with "_" (class name, diffusers version, source path) do not change the model.
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def load_quanto(directory: str | os.PathLike, base_config=None, *, device: str | torch.device | None = None) -> nn.Module:
    """Reload a :func:`save_quanto` folder: computes bit-identically to the model that was saved.

    Args:
        directory: the folder.
        base_config: the base model's diffusers config (a dict or ``model.config``); the folder's
            ``config.json`` when None. If both exist they must describe the same architecture.
        device: where to put the model (default CPU).

    The model is built without allocating float weights (accelerate's ``init_empty_weights``), then
    quanto's ``requantize`` replaces the layers named in ``quanto_qmap.json`` and loads the state dict,
    and our input-only activation semantics are restored (:func:`requantize_exported`). quanto
    loads with ``strict=False``; here every tensor of the model must come from the file, or
    ValueError names the missing / unexpected ones.
    """
    import diffusers
    folder = Path(directory)
    qmap_path, weights_path, config_path = folder / QMAP_NAME, folder / WEIGHTS_NAME, folder / MODEL_CONFIG_NAME
    for path in (qmap_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a folder written by save_quanto "
                                    f"(expected {MODEL_CONFIG_NAME}, {QMAP_NAME} and {WEIGHTS_NAME})")
    qmap = json.loads(qmap_path.read_text(encoding="utf-8"))
    saved_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    if base_config is None:
        if saved_config is None:
            raise FileNotFoundError(f"{config_path} is missing; pass base_config")
        base_config = saved_config
    base_config = dict(base_config)
    if saved_config is not None:
        given, saved = _architecture(base_config), _architecture(saved_config)
        differ = sorted(k for k in set(given) | set(saved) if given.get(k) != saved.get(k))
        if differ:
            raise ValueError(f"base_config differs from {config_path} in {differ}: the weights were saved for "
                             "another architecture")
    class_name = base_config.get("_class_name") or (saved_config or {}).get("_class_name") or "UNet2DModel"
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"unknown diffusers model class {class_name!r} in the config")

    with init_empty_weights():  # parameters on the meta device; requantize materialises them
        model = cls.from_config(base_config)
    state = load_file(str(weights_path))
    requantize_exported(model, state, qmap, device=torch.device(device) if device is not None else torch.device("cpu"))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval().requires_grad_(False)

