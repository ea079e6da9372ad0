"""Where a quantized model's folder comes from: a local folder, a saved pipeline's component, or a Hub
repo (model or pipeline), downloaded with huggingface_hub, only the model's own files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import snapshot_download

from .checkpoint_layout import COMPONENT_LIBRARY, REPORT_JSON, REPORT_TENSORS, CheckpointError
from .config import CONFIG_NAME
from .hub.repo import check_repo_id, fetch_beside
from .serialization import read_json

logger = logging.getLogger(__name__)

_CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.md", "*.png")


def quantized_components(index: dict) -> list[str]:
    """The components of a saved pipeline's model_index.json that are diffusers-gaq quantized models."""
    return [name for name, entry in index.items()
            if isinstance(entry, list) and len(entry) == 2 and entry[0] == COMPONENT_LIBRARY]


def saved_quantized_components(folder: Path) -> list[str]:
    """The quantized components of the pipeline saved in ``folder`` (none without a model_index.json)."""
    index = Path(folder) / "model_index.json"
    return quantized_components(read_json(index)) if index.is_file() else []


def fetch_missing_files(folder: Path) -> None:
    """diffusers' loaders fetch only config.json and the weights of a model folder from the Hub: a
    cached snapshot gets the rest of the checkpoint from the same commit. Other folders are left as
    they are."""
    if not (folder / CONFIG_NAME).is_file():
        fetch_beside(folder, [CONFIG_NAME], [REPORT_JSON, REPORT_TENSORS])


def _pick_component(index: dict, where: str) -> str:
    """The quantized component of a saved pipeline: loading a pipeline folder or repo as a model
    loads its one quantized denoiser, as the model card's snippet does."""
    names = quantized_components(index)
    if len(names) != 1:
        raise CheckpointError(f"{where} is a pipeline with {len(names)} quantized components ({', '.join(names) or 'none'}); "
                              "pass subfolder='<component>' to load one, or load the whole pipeline with "
                              "DiffusionPipeline.from_pretrained after `import diffusers_gaq`")
    logger.info("%s is a saved pipeline: loading its quantized %s", where, names[0])
    return names[0]


def _hub_component(repo_id: str, hub_kwargs: dict) -> str | None:
    """The quantized component of a pipeline repo (from its model_index.json), None for a model repo."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index = hf_hub_download(repo_id, "model_index.json", **hub_kwargs)
    except EntryNotFoundError:
        return None
    return _pick_component(read_json(Path(index)), repo_id)


def resolve_checkpoint(path_or_repo: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> Path:
    """The folder of a quantized model: a local folder as is, a Hub repo id downloaded with huggingface_hub
    (only the model's files). ``subfolder`` names a pipeline's component; a pipeline given without
    it resolves to its one quantized component."""
    path = Path(path_or_repo)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if subfolder is None and not (folder / CONFIG_NAME).is_file() and (folder / "model_index.json").is_file():
            folder = folder / _pick_component(read_json(folder / "model_index.json"), str(folder))
        fetch_missing_files(folder)
        return folder
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder")
    repo_id = check_repo_id(str(path_or_repo))
    hub_kwargs.pop("allow_patterns", None)
    if subfolder is None:
        subfolder = _hub_component(repo_id, hub_kwargs)
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    root = Path(snapshot_download(repo_id, allow_patterns=[prefix + p for p in _CHECKPOINT_PATTERNS], **hub_kwargs))
    return root / subfolder if subfolder else root
