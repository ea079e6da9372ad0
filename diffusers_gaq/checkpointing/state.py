"""The calibration state on disk: the calibration data, and the state after every finished unit,
each a safetensors file with a manifest (see the package docstring), and what a resumed run
starts from."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..calibration.calibrate import CalibrationReport, CalibrationStart, UnitHook, UnitReport
from ..calibration.data import CalibrationData
from ..digests import tensors_digest
from ..files import atomic_save_safetensors
from ..quant.layers import QuantLayer
from ..serialization import CheckpointError
from .fingerprint import _versions, describe_mismatch

logger = logging.getLogger(__name__)

DATA_NAME = "calibration_data.safetensors"
STATE_NAME = "calibration_state.safetensors"
FORMAT_VERSION = 1
_MANIFEST_KEY = "gaq_calibration_checkpoint"


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by a run with another config, model or calibration data."""


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

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, dist=None, lock=None):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.dist = dist  # distributed.Dist of a multi-process run: only its main process writes
        self.lock = lock  # lock.CheckpointLock held by the main process while the run works

    def release(self) -> None:
        """Give the folder back to other runs (at the end of the run, and on any error)."""
        if self.lock is not None:
            self.lock.release()

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
