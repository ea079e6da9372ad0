"""sha256 digests of the JSON files that decide a quantized model's computation.

quantization_config.json records, under ``files_sha256``, one digest per file:

    config.json               the base model's diffusers config
    quantization_config.json  itself, without ``files_sha256``; it holds ``weights_sha256``, the
                              digest of the weights file's tensors, so the tensors are covered too

Each digest is sha256 over the file's parsed JSON, re-serialised compactly in its own key order
(layer_precision's order decides which pattern wins, so order is content), without the fields a
save or a push rewrites and that do not change the computation: ``_name_or_path`` (made public by
a push), ``_diffusers_version``, and quantization_config.json's ``base_model``. Whitespace and
indentation do not count, so a push's rewrite of those fields keeps the digests valid.

A digest detects damage and accidental edits. It does not stop a deliberate edit: whoever edits the
files can recompute it. Pinning a Hub commit (``from_pretrained(repo, revision="<commit sha>")``)
is the defence against a repo that changes after it was checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checkpoint_layout import MODEL_CONFIG_NAME, CheckpointError
from .config import CONFIG_NAME

FILES_DIGEST_FIELD = "files_sha256"
_UNCOUNTED = {
    MODEL_CONFIG_NAME: ("_name_or_path", "_diffusers_version"),
    CONFIG_NAME: (FILES_DIGEST_FIELD, "base_model", "_name_or_path"),
}
_RESTORE = "restore the folder from the original save (or download / copy it again)"


def json_digest(data: dict, name: str) -> str:
    """sha256 of the parsed JSON file ``name`` without its uncounted fields (see module docstring)."""
    kept = {k: v for k, v in data.items() if k not in _UNCOUNTED.get(name, ())}
    text = json.dumps(kept, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def files_digests(model_cfg: dict, qcfg: dict) -> dict[str, str]:
    """The ``files_sha256`` entry for a checkpoint whose parsed files are ``model_cfg`` and ``qcfg``."""
    return {MODEL_CONFIG_NAME: json_digest(model_cfg, MODEL_CONFIG_NAME), CONFIG_NAME: json_digest(qcfg, CONFIG_NAME)}


def check_files_digest_field(value, path: Path) -> None:
    """``files_sha256`` must map both file names to sha256 hex digests."""
    ok = isinstance(value, dict) and all(
        isinstance(value.get(n), str) and len(value[n]) == 64 for n in (MODEL_CONFIG_NAME, CONFIG_NAME))
    if not ok:
        what = "missing" if value is None else f"{value!r}, not a digest for each of {MODEL_CONFIG_NAME} and {CONFIG_NAME}"
        raise CheckpointError(f"{path}: field {FILES_DIGEST_FIELD} is {what}; this format version records the "
                              f"digests of the checkpoint's configs at save: {_RESTORE}")


def verify_files_digests(folder: Path, model_cfg: dict, qcfg: dict) -> None:
    """Raise CheckpointError naming the file whose content no longer matches its digest."""
    recorded = qcfg[FILES_DIGEST_FIELD]
    actual = files_digests(model_cfg, qcfg)
    for name in (CONFIG_NAME, MODEL_CONFIG_NAME):  # quantization_config.json holds the digests: check it first
        if actual[name] != recorded[name]:
            raise CheckpointError(
                f"{folder / name}: its content does not match {FILES_DIGEST_FIELD}[{name!r}] in {CONFIG_NAME} "
                f"(written at save): the file was edited or is damaged, and it decides what the model computes: "
                f"{_RESTORE}")
