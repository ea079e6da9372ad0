"""Calibration reports on disk: tensors (sample weights, timesteps, conflict matrices) in
safetensors, the rest in JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_save_safetensors, atomic_write_text
from .calibrate import CalibrationReport, UnitReport

_TENSOR_FIELDS = ("omega", "step_loss_init", "step_loss_final", "conflict_before", "conflict_after")


def report_to_files(report: CalibrationReport, tensor_path: Path, json_path: Path) -> None:
    tensors = {}
    if report.train_timesteps is not None:
        tensors["train_timesteps"] = report.train_timesteps
        tensors["train_step_index"] = report.train_step_index
    for i, unit in enumerate(report.units):
        for f in _TENSOR_FIELDS:
            value = getattr(unit, f)
            if value is not None:
                tensors[f"units.{i}.{f}"] = value
    atomic_save_safetensors(tensors, tensor_path)
    atomic_write_text(json_path, json.dumps(report.summary(), indent=2) + "\n")


def report_from_files(tensor_path: Path, json_path: Path) -> CalibrationReport:
    from safetensors.torch import load_file

    tensors = load_file(str(tensor_path))
    summary = json.loads(Path(json_path).read_text()) if Path(json_path).is_file() else {"units": []}
    report = CalibrationReport(train_timesteps=tensors.get("train_timesteps"),
                               train_step_index=tensors.get("train_step_index"),
                               data_seconds=summary.get("data_seconds", 0.0),
                               calibration_seconds=summary.get("calibration_seconds", 0.0))
    for i, info in enumerate(summary["units"]):
        unit = UnitReport(**{k: v for k, v in info.items() if k in UnitReport.__dataclass_fields__})
        for f in _TENSOR_FIELDS:
            if f"units.{i}.{f}" in tensors:
                setattr(unit, f, tensors[f"units.{i}.{f}"])
        report.units.append(unit)
    return report


__all__ = ["report_to_files", "report_from_files"]
