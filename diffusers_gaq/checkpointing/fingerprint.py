"""The fingerprint of a calibration run: everything that determines its result, in a
JSON-comparable form, and the words for how two fingerprints differ."""

from __future__ import annotations

import json

import diffusers
import torch

from .._version import __version__
from ..calibration.data import CalibrationData
from ..config import GradientAlignedQuantizer
from ..digests import tensor_digest

# Config fields that do not change the result: a run may be resumed on another device.
_RESULT_NEUTRAL_FIELDS = ("device",)


def _jsonable(value):
    """The value as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _public_config(cfg) -> dict:
    # diffusers' private keys (_name_or_path, _diffusers_version, ...) say where a model came from,
    # not what it computes: the same model loaded from another folder is the same model.
    return _jsonable({k: v for k, v in dict(cfg).items() if not k.startswith("_")})


def config_fingerprint(config: GradientAlignedQuantizer) -> dict:
    """The config fields that determine the result, as they read back from JSON."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _RESULT_NEUTRAL_FIELDS}
    # Pairs, not a mapping: the order of layer_precision decides which pattern wins.
    fields["layer_precision"] = [list(item) for item in config.layer_precision.items()]
    return _jsonable(fields)


def run_fingerprint(model, scheduler_config, config: GradientAlignedQuantizer,
                    calibration_data: CalibrationData | None = None) -> dict:
    """Everything that determines the calibration result, in a JSON-comparable form. (A text
    encoder is not in it: its prompt embeddings are in the saved calibration data, which a
    resumed run reads instead of sampling again.)"""
    return {
        "config": config_fingerprint(config),
        "model_class": type(model).__name__,
        "model_config": _public_config(model.config),
        "model_tensors": {name: tensor_digest(t) for name, t in model.state_dict().items()},
        # Sampled data depends on the scheduler; data the caller gives does not.
        "scheduler_config": _public_config(scheduler_config) if calibration_data is None else None,
        "calibration_data": "sampled" if calibration_data is None else calibration_data.digest(),
    }


def _differences(label: str, saved: dict | None, current: dict | None, limit: int = 8) -> str | None:
    saved, current = saved or {}, current or {}
    missing = "<absent>"
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k, missing) != current.get(k, missing))
    if not keys:
        return None
    shown = ", ".join(f"{k} (checkpoint {saved.get(k, missing)!r}, now {current.get(k, missing)!r})"
                      for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{label} differ: {shown}{more}"


def describe_mismatch(saved: dict, current: dict) -> list[str]:
    """One line per part of the fingerprint that differs; empty when the runs match."""
    lines = [d for d in (_differences("config fields", saved.get("config"), current.get("config")),
                         _differences("model config keys", saved.get("model_config"), current.get("model_config")),
                         _differences("scheduler config keys", saved.get("scheduler_config"),
                                      current.get("scheduler_config")))
             if d]
    if saved.get("model_class") != current.get("model_class"):
        lines.append(f"model class differs: checkpoint {saved.get('model_class')}, now {current.get('model_class')}")
    a, b = saved.get("model_tensors") or {}, current.get("model_tensors") or {}
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if changed:
        lines.append(f"model weights differ in {len(changed)} tensor(s): {', '.join(changed[:5])}"
                     + (" ..." if len(changed) > 5 else ""))
    if saved.get("calibration_data") != current.get("calibration_data"):
        def what(v):
            return "sampled from the pipeline" if v == "sampled" else f"given by the caller (sha256 {str(v)[:12]})"
        lines.append(f"calibration data differs: checkpoint {what(saved.get('calibration_data'))}, "
                     f"now {what(current.get('calibration_data'))}")
    return lines


def _versions() -> dict:
    return {"diffusers_gaq": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
