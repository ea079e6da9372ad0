"""Which files of a checkpoint folder a push uploads: an allow-list of what diffusers-gaq, diffusers
and transformers save, never anything else in the folder.

A saved quantized model: config.json, quantization_config.json, diffusion_pytorch_model.safetensors,
calibration_report.json / .safetensors, README.md and the card's *.png plots.
A saved pipeline (model_index.json at the top): model_index.json, README.md and *.png at the top;
the quantized denoiser's folder as above; each other component folder named in model_index.json,
its files directly inside with the suffixes those libraries save (*.json configs and tokenizers,
*.safetensors weights, *.txt vocabularies / merges, *.model sentencepiece models).
Both: ``evaluation/`` (the report of `diffusers-gaq evaluate`), its *.json and *.png.

Symbolic links are never followed nor read (one could point at any file on the machine), hidden
files and folders (``.env``, ``.git``) are never uploaded, and neither is anything else off the
list: each is skipped, and the skipped paths are listed in one warning.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint_layout import MODEL_CONFIG_NAME, REPORT_JSON, REPORT_TENSORS, WEIGHTS_NAME
from ..config import CONFIG_NAME
from ..folders import CARD_FILE, EVALUATION_DIR, MODEL_INDEX, model_index_components, quantized_model_dir

logger = logging.getLogger(__name__)

MODEL_FILES = frozenset({MODEL_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME, REPORT_JSON, REPORT_TENSORS, CARD_FILE})
COMPONENT_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
_SHOWN = 20


@dataclass(frozen=True)
class Selection:
    """``upload``: paths relative to the folder (posix) to upload; ``skipped``: {path: why}."""
    upload: list[str]
    skipped: dict[str, str]


def _walk(folder: Path):
    """(relative path, kind) of every entry under ``folder``, without following or reading links:
    kind is "file", "link", "hidden" (a hidden file or folder, not descended into) or "other"."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        for name in sorted(dirs):
            path = base / name
            if path.is_symlink() or name.startswith("."):
                dirs.remove(name)  # never descend into a link or a hidden folder
                yield path.relative_to(folder).as_posix() + "/", "link" if path.is_symlink() else "hidden"
        for name in sorted(files):
            path = base / name
            mode = os.lstat(path).st_mode  # lstat: a link's own entry, its target is never opened
            kind = "link" if stat.S_ISLNK(mode) else "hidden" if name.startswith(".") else \
                "file" if stat.S_ISREG(mode) else "other"
            yield path.relative_to(folder).as_posix(), kind


def _model_file(name: str) -> bool:
    return name in MODEL_FILES or name.endswith(".png")


def _allowed(rel: str, denoiser: str | None, components: set[str]) -> bool:
    """Whether ``rel`` (a regular file's path relative to the folder) belongs to the artefact.
    ``denoiser`` is the quantized model's folder name in a pipeline, None for a saved model."""
    parts = rel.split("/")
    if len(parts) == 2 and parts[0] == EVALUATION_DIR:
        return parts[1].endswith((".json", ".png"))
    if denoiser is None:
        return len(parts) == 1 and _model_file(rel)
    if len(parts) == 1:
        return rel in (MODEL_INDEX, CARD_FILE) or rel.endswith(".png")
    if len(parts) != 2 or parts[0] not in components:
        return False
    return _model_file(parts[1]) if parts[0] == denoiser else parts[1].endswith(COMPONENT_SUFFIXES)


def select_upload(folder: Path) -> Selection:
    """The allow-listed files of ``folder`` and the skipped entries with the reason for each."""
    folder = Path(folder)
    is_pipeline = (folder / MODEL_INDEX).is_file() and not (folder / MODEL_INDEX).is_symlink()
    denoiser = quantized_model_dir(folder).name if is_pipeline else None
    components = (model_index_components(folder / MODEL_INDEX) or set()) if is_pipeline else set()
    upload, skipped = [], {}
    for rel, kind in _walk(folder):
        if kind == "link":
            skipped[rel] = "a symbolic link (never followed)"
        elif kind == "hidden":
            skipped[rel] = "hidden"
        elif kind == "other" or not _allowed(rel, denoiser, components):
            skipped[rel] = "not a file a diffusers-gaq / diffusers save writes"
        else:
            upload.append(rel)
    return Selection(upload, skipped)


def warn_skipped(folder: Path, skipped: dict[str, str]) -> None:
    if not skipped:
        return
    shown = [f"{rel} ({why})" for rel, why in sorted(skipped.items())[:_SHOWN]]
    more = f" and {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
    logger.warning("not uploading %d path(s) of %s that are not part of the checkpoint: %s%s",
                   len(skipped), folder, ", ".join(shown), more)
