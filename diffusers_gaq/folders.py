"""What a save may replace, and where a checkpoint's quantized model lives inside a folder.

A save replaces its target folder as a whole, so it may only replace what a save of ours wrote:
everything else in the folder (an input model, a user's notes) would be deleted without a word.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import CONFIG_NAME
from .models import FAMILIES
from .serialization import MODEL_CONFIG_NAME, REPORT_JSON, REPORT_TENSORS, WEIGHTS_NAME

CARD_FILE = "README.md"
MODEL_INDEX = "model_index.json"
EVALUATION_DIR = "evaluation"  # `diffusers-gaq evaluate`'s default report folder
_MODEL_FILES = frozenset({MODEL_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME, REPORT_TENSORS, REPORT_JSON, CARD_FILE})
# What diffusers / transformers save_pretrained write into a component folder (configs, weights,
# tokenizer vocabularies).
_COMPONENT_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
_SHOWN_FILES = 5


def check_new_or_empty(target: Path, flag: str = "overwrite=True (CLI: --overwrite)") -> None:
    """Refuse an output folder that exists and holds anything, naming ``flag`` as the way to allow it."""
    target = Path(target)
    if target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"output folder {target} exists and is not empty; pass {flag} or choose another folder")


def check_replaceable(target: Path, *, pipeline: bool) -> None:
    """Refuse, before any work, to replace ``target`` unless it is absent, an empty folder, or holds
    nothing but an earlier save of ours: a quantized model folder (``pipeline=False``: its
    quantization_config.json with quant_method "gaq", and only the files save_quantized writes), or
    a quantized pipeline folder (model_index.json, a quantized denoiser folder as above, component
    folders named in model_index.json holding configs / weights / vocabularies, the card and plots
    at the top, and an ``evaluation/`` report). The message lists the files that are not ours."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a folder; delete it or choose another folder")
    if not any(target.iterdir()):
        return
    problem = _pipeline_problem(target) if pipeline else _model_problem(target)
    if problem:
        raise FileExistsError(f"refusing to replace {target}: {problem}; nothing was changed. Move those files "
                              "elsewhere, delete the folder yourself if it is really not needed, or choose another "
                              "folder")


def _is_quantized_model_dir(folder: Path) -> bool:
    try:
        qcfg = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(qcfg, dict) and qcfg.get("quant_method") == "gaq"


def _model_problem(folder: Path) -> str | None:
    if not _is_quantized_model_dir(folder):
        return f"it holds no diffusers-gaq {CONFIG_NAME}, so it is not an earlier quantized save"
    return _foreign_files_problem(folder, [p for p in folder.iterdir() if not _is_model_file(p)])


def _is_model_file(path: Path) -> bool:
    return path.is_file() and (path.name in _MODEL_FILES or path.suffix == ".png")  # .png: the card's plots


def _pipeline_problem(folder: Path) -> str | None:
    components = model_index_components(folder / MODEL_INDEX)
    denoiser = quantized_model_dir(folder)
    if components is None or denoiser == folder or not _is_quantized_model_dir(denoiser):
        return (f"it holds no {MODEL_INDEX} with a diffusers-gaq quantized denoiser, so it is not an earlier "
                "quantized pipeline save")
    foreign = [p for p in denoiser.iterdir() if not _is_model_file(p)]
    for entry in folder.iterdir():
        if entry == denoiser:
            continue
        if entry.is_file():
            ours = entry.name in (MODEL_INDEX, CARD_FILE) or entry.suffix == ".png"
            foreign += [] if ours else [entry]
        elif entry.name == EVALUATION_DIR:
            foreign += [p for p in entry.iterdir() if not (p.is_file() and p.suffix in (".json", ".png"))]
        elif entry.name in components:
            foreign += [p for p in entry.iterdir() if not (p.is_file() and p.suffix in _COMPONENT_SUFFIXES)]
        else:
            foreign.append(entry)
    return _foreign_files_problem(folder, foreign)


def model_index_components(path: Path) -> set[str] | None:
    """The component names model_index.json lists, or None when it is missing or not an index."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    return {name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)}


def _foreign_files_problem(folder: Path, foreign: list[Path]) -> str | None:
    if not foreign:
        return None
    names = sorted(str(p.relative_to(folder)) + ("/" if p.is_dir() else "") for p in foreign)
    more = f" and {len(names) - _SHOWN_FILES} more" if len(names) > _SHOWN_FILES else ""
    return f"it holds files a quantized save does not write: {', '.join(names[:_SHOWN_FILES])}{more}"



def quantized_model_dir(folder: Path) -> Path:
    """The folder holding the quantized model's config: ``folder`` itself for a saved model, its
    denoiser's subfolder (``unet/``, ``transformer/``) for a saved pipeline."""
    for component in dict.fromkeys(f.component for f in FAMILIES):
        if (folder / component / CONFIG_NAME).is_file():
            return folder / component
    return folder

