"""Resumable calibration: the calibration state on disk, saved after every finished unit.

A checkpoint folder (``quantize_pipeline(..., checkpoint_dir=...)``, CLI ``--checkpoint-dir``)
holds two files, each written atomically (temporary file, fsync, rename: files.atomic_path), so
a crash at any moment leaves the previous complete file, or none:

    calibration_data.safetensors    the calibration set, written once, right after it is collected
    calibration_state.safetensors   rewritten after every finished reconstruction unit: the wrapped
                                    model's whole state (finished units hold their integer codes and
                                    learned step sizes, the others their defaults), the sample
                                    scores and the per-unit reports

Each file carries a manifest (JSON in its safetensors metadata) with

- the *fingerprint* of the run: the quantization config (every field but ``device``), the base
  model's class, config and a digest of each of its tensors, the scheduler config (it shapes the
  sampled calibration data) or the digest of calibration data the caller gave;
- a digest of the file's own tensors, so that a corrupt or edited file is refused, not used.

Resuming (``resume=True`` / ``--resume``) refuses a checkpoint whose fingerprint differs from the
current run and says what differs (config fields, model config keys, tensors). Calibration draws
its random numbers from per-unit generators seeded from the config (calibrate.py) and the state
is restored bit-exactly, so a resumed run writes the same quantized weights, byte for byte, as an
uninterrupted one. Only the main process writes (distributed.py); every process reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ._version import __version__
from .calibration.calibrate import CalibrationReport, CalibrationStart, UnitHook, UnitReport
from .calibration.data import CalibrationData
from .config import GradientAlignedQuantizer
from .digests import tensor_digest, tensors_digest
from .files import atomic_save_safetensors, check_writable_location
from .models import family_for
from .quant.layers import QuantLayer
from .serialization import CheckpointError

logger = logging.getLogger(__name__)

DATA_NAME = "calibration_data.safetensors"
STATE_NAME = "calibration_state.safetensors"
FORMAT_VERSION = 1
_MANIFEST_KEY = "gaq_calibration_checkpoint"
# Config fields that do not change the result: a run may be resumed on another device.
_RESULT_NEUTRAL_FIELDS = ("device",)


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by a run with another config, model or calibration data."""


# ---- digests and fingerprints -----------------------------------------------------------------------
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


# ---- the folder, before any work ---------------------------------------------------------------
def has_checkpoint(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / DATA_NAME).exists() or (d / STATE_NAME).exists()


def check_checkpoint_dir(directory: str | os.PathLike | None, resume: bool, need_bytes: int = 0) -> None:
    """Refuse, before any work, what cannot end well: ``resume`` without a folder, a folder that is
    a file or cannot be written, an existing checkpoint that would be overwritten without
    ``resume``, too little free space for ``need_bytes``."""
    if directory is None:
        if resume:
            raise ValueError("resume=True needs checkpoint_dir= (CLI: --resume needs --checkpoint-dir) to resume from")
        return
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"checkpoint folder {d} is a file; choose a folder")
    if has_checkpoint(d) and not resume:
        raise FileExistsError(f"{d} already holds a calibration checkpoint; pass resume=True (CLI: --resume) to "
                              "continue it, or delete it / choose another folder to start over")
    try:  # a folder under a file used to pass here and fail only when the data was saved
        probe = check_writable_location(d)
    except (NotADirectoryError, PermissionError) as e:
        raise type(e)(f"checkpoint folder {d}: {e}") from None
    free = shutil.disk_usage(probe).free
    if need_bytes and free < need_bytes:
        raise OSError(f"the calibration checkpoint needs about {need_bytes / 2**20:.0f} MiB but only "
                      f"{free / 2**20:.0f} MiB are free under {probe}; free some space or choose another folder")


def estimated_checkpoint_bytes(model, config: GradientAlignedQuantizer, family=None) -> int:
    """Room the checkpoint needs: the state file twice (the old one stays until the new one is
    whole) at about 1.5x the model (FP weights plus codes and quantizer state), plus the data
    (counted with two conditioning branches, classifier-free guidance's upper bound)."""
    family = family or family_for(model)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    c, h, w = family.sample_shape(model)
    per_sample = c * h * w * 4 + family.conditioning_bytes_per_sample(model)
    data = 2 * config.num_calibration_timesteps * config.samples_per_timestep * per_sample
    return int(3 * weights + data) + 16 * 2**20


# ---- what a resumed run starts from ------------------------------------------------------------
@dataclass
class ResumePoint(CalibrationStart):
    """Where calibration starts: nothing (a fresh run), the calibration data, or data plus the state
    after ``next_unit`` finished units (with the sample scores they carried)."""

    data: CalibrationData | None = None
    data_seconds: float = 0.0
    unit_names: list[str] = field(default_factory=list)
    model_state: dict[str, torch.Tensor] | None = None
    units: list[UnitReport] = field(default_factory=list)

    @torch.no_grad()
    def restore(self, model, units: list[tuple[str, nn.Module]]) -> None:
        """Put the finished units' state into a freshly wrapped ``model`` whose reconstruction units
        are ``units`` (a no-op for a fresh start)."""
        if self.model_state is None:
            return
        names = [n for n, _ in units]
        if names != self.unit_names:
            raise CheckpointMismatchError(
                f"the checkpoint's reconstruction units ({len(self.unit_names)}) differ from this model's "
                f"({len(names)}): was it written by another diffusers-gaq version? Delete it to start over")
        device = next(model.parameters()).device
        state = {k: v.to(device) for k, v in self.model_state.items()}
        # A finished unit's weight quantizers are frozen: their codes (and per-channel scales, whose
        # shape differs from a fresh quantizer's) are put in place first, the rest is copied below.
        for name, layer in model.named_modules():
            if isinstance(layer, QuantLayer) and layer.weight_quantizer is not None:
                codes = state.get(f"{name}.weight_quantizer.codes")
                if codes is not None:
                    layer.weight_quantizer.load_codes(codes, state[f"{name}.weight_quantizer.scale"],
                                                      state[f"{name}.weight_quantizer.zero_point"])
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointMismatchError(f"the checkpoint's model state does not fit this model: {err}") from None

    def merge_into(self, report: CalibrationReport) -> CalibrationReport:
        """``calibrate_model`` reports only the units it ran: put the earlier ones in front."""
        report.units[:0] = self.units
        report.calibration_seconds += sum(u.seconds for u in self.units)
        return report


# ---- files -----------------------------------------------------------------------------------
def _split_unit(unit: UnitReport) -> tuple[dict, dict[str, torch.Tensor]]:
    """A unit report as JSON fields and tensors. Python's JSON writes floats exactly (NaN as NaN),
    so the losses read back bit-identical; tensors go to safetensors."""
    fields, tensors = {}, {}
    for f in dataclasses.fields(UnitReport):
        value = getattr(unit, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value
        else:
            fields[f.name] = value
    return fields, tensors


def _join_unit(fields: dict, tensors: dict[str, torch.Tensor]) -> UnitReport:
    known = {f.name for f in dataclasses.fields(UnitReport)}  # a report field may have been added since
    return UnitReport(**{k: v for k, v in {**fields, **tensors}.items() if k in known})


class CalibrationCheckpoint:
    """The checkpoint folder of one run, identified by its fingerprint (see :func:`run_fingerprint`)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, dist=None):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.dist = dist  # distributed.Dist of a multi-process run: only its main process writes

    @property
    def data_path(self) -> Path:
        return self.directory / DATA_NAME

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_NAME

    # -- writing (main process only) --
    def _write(self, path: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        # The report's diagnostics may legitimately hold NaN (a cosine of a zero gradient); the state a
        # run resumes from may not. Every process holds the same state, so every process refuses.
        for key, value in tensors.items():
            if not key.startswith("report.") and value.is_floating_point() and torch.isnan(value).any():
                raise FloatingPointError(f"refusing to write {path}: tensor {key} holds NaN")
        if self.dist is None or self.dist.is_main:
            manifest = dict(manifest, format_version=FORMAT_VERSION, fingerprint=self.fingerprint,
                            digest=tensors_digest(tensors), versions=_versions())
            text = json.dumps(manifest, sort_keys=True, default=str)  # default: a report field JSON cannot spell
            atomic_save_safetensors(tensors, path, metadata={_MANIFEST_KEY: text})
            logger.debug("wrote %s", path)
        # The others read these files only on a later resume, but they must not run ahead of a
        # failing write either.
        if self.dist is not None:
            self.dist.wait_for_everyone()

    def save_data(self, data: CalibrationData, data_seconds: float = 0.0) -> None:
        self._write(self.data_path, {f"data.{k}": v for k, v in data.to_tensors().items()},
                    {"kind": "data", "data_seconds": data_seconds})
        logger.info("checkpoint: calibration data saved to %s", self.data_path)

    def save_unit(self, index: int, model, unit_names: list[str], scores: torch.Tensor,
                  units: list[UnitReport]) -> None:
        """The state after unit ``index`` finished; ``units``: the reports of units 0..index."""
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors["scores"] = scores
        unit_fields = []
        for i, unit in enumerate(units):
            fields, unit_tensors = _split_unit(unit)
            unit_fields.append(fields)
            tensors.update({f"report.{i}.{name}": value for name, value in unit_tensors.items()})
        manifest = {"kind": "state", "next_unit": index + 1, "num_units": len(unit_names), "unit_names": unit_names,
                    "units": unit_fields}
        self._write(self.state_path, tensors, manifest)
        logger.info("checkpoint: unit %d/%d (%s) saved to %s", index + 1, len(unit_names), unit_names[index],
                    self.state_path)

    def unit_hook(self, model, units: list[tuple[str, nn.Module]], resumed: ResumePoint) -> UnitHook:
        """A per-unit hook for calibrate_model: save the state, with the reports of the units done
        before a resume in front."""
        names = [n for n, _ in units]

        def save(index: int, scores: torch.Tensor, report: CalibrationReport) -> None:
            self.save_unit(index, model, names, scores, resumed.units + report.units)

        return save

    # -- reading --
    def _read(self, path: Path, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
        hint = (f"delete {path.name} to resume from the calibration data" if kind == "state"
                else f"delete {self.directory} to start over")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} cannot be read ({e}); the file is truncated or corrupt: {hint}") from None
        try:
            manifest = json.loads(metadata[_MANIFEST_KEY])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has no readable diffusers-gaq manifest ({type(e).__name__}: {e}); "
                                  f"it is not a calibration checkpoint or it was edited: {hint}") from None
        if manifest.get("kind") != kind or manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: a {manifest.get('kind')!r} checkpoint of format "
                                  f"{manifest.get('format_version')}, expected {kind!r} format <= {FORMAT_VERSION}")
        if tensors_digest(tensors) != manifest.get("digest"):
            raise CheckpointError(f"{path}: its tensors do not match the digest it was written with; the file is "
                                  f"corrupt or was edited: {hint}")
        differences = describe_mismatch(manifest.get("fingerprint", {}), self.fingerprint)
        if differences:
            raise CheckpointMismatchError(f"{path} was written by a different run, refusing to resume from it: "
                                          + "; ".join(differences)
                                          + f". Resume with the same settings, or delete {self.directory} / choose "
                                          "another checkpoint folder to start over")
        if manifest.get("versions") != _versions():
            logger.warning("%s was written with %s, this is %s: the result may differ from an uninterrupted run in "
                           "the last bits", path, manifest.get("versions"), _versions())
        return manifest, tensors

    def load(self) -> ResumePoint:
        """The point to resume from; an empty ResumePoint when the folder holds no checkpoint.
        Raises CheckpointError (corrupt, truncated, edited) or CheckpointMismatchError (another run)."""
        if not self.data_path.exists():
            if self.state_path.exists():
                raise CheckpointError(f"{self.state_path} exists without {DATA_NAME}; the checkpoint is incomplete: "
                                      f"delete {self.directory} to start over")
            logger.info("no calibration checkpoint in %s: starting from the beginning", self.directory)
            return ResumePoint()
        manifest, tensors = self._read(self.data_path, "data")
        data = CalibrationData.from_tensors({k.split(".", 1)[1]: v for k, v in tensors.items()})
        data.check()  # never resume from NaN data
        point = ResumePoint(data=data, data_seconds=float(manifest.get("data_seconds", 0.0)))
        if not self.state_path.exists():
            logger.info("resuming from %s: calibration data only, calibrating from the first unit", self.data_path)
            return point
        manifest, tensors = self._read(self.state_path, "state")
        point.next_unit, point.unit_names = int(manifest["next_unit"]), list(manifest["unit_names"])
        point.model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        point.scores = tensors["scores"]
        for i, fields in enumerate(manifest["units"]):
            prefix = f"report.{i}."
            point.units.append(_join_unit(fields, {k[len(prefix):]: v for k, v in tensors.items()
                                                   if k.startswith(prefix)}))
        logger.info("resuming from %s: %d of %d units done, next %s", self.state_path, point.next_unit,
                    len(point.unit_names), point.unit_names[point.next_unit] if point.next_unit < len(point.unit_names)
                    else "(none: calibration finished)")
        return point


def open_checkpoint(directory: str | os.PathLike | None, resume: bool, family, model, scheduler_config,
                    config: GradientAlignedQuantizer, calibration_data: CalibrationData | None = None, dist=None
                    ) -> tuple[CalibrationCheckpoint | None, ResumePoint]:
    """quantize_pipeline's entry point: check the folder and, when resuming, read and verify the
    checkpoint, all before any sampling. ``model``: the FP denoiser (``family`` its family);
    ``dist``: the process group of a multi-process run (only its main process writes). Returns
    (checkpoint or None, where to start)."""
    check_checkpoint_dir(directory, resume, estimated_checkpoint_bytes(model, config, family) if directory else 0)
    if directory is None:
        return None, ResumePoint()
    checkpoint = CalibrationCheckpoint(directory, run_fingerprint(model, scheduler_config, config, calibration_data),
                                       dist=dist)
    return checkpoint, checkpoint.load() if resume else ResumePoint()


__all__ = ["CalibrationCheckpoint", "CheckpointMismatchError", "ResumePoint", "DATA_NAME", "STATE_NAME",
           "check_checkpoint_dir", "config_fingerprint", "describe_mismatch", "estimated_checkpoint_bytes",
           "open_checkpoint",
           "run_fingerprint", "tensor_digest"]
