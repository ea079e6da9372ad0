"""Checks a quantized load runs on what it reads (modeling.load_quantized).

A checkpoint is trusted only as far as it agrees with itself: the JSON has the structure
save_quantized writes, the layer table agrees with the model its "config" rebuilds, the tensors
match the digest written at save, and every scale / zero point is one a quantizer can hold.
Each check raises CheckpointError naming the file, the field and what to do.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoint_layout import PACKED_SUFFIX, WEIGHTS_NAME, CheckpointError
from .config import ACT_BITS_RANGE, WEIGHT_BITS_RANGE
from .digests import tensors_digest
from .quant.layers import QuantLayer
from .quant.packing import packed_nbytes

DIGEST_FIELD = "weights_sha256"
_RESTORE = "restore the folder from the original save (or download / copy it again)"


def _error(message: str) -> Exception:
    return CheckpointError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- JSON structure ------------------------------------------------------------------------------
def verify_json_object(data, path: Path) -> dict:
    """``data`` (a parsed JSON file) if it is an object; a list or a number at the top is damage."""
    if not isinstance(data, dict):
        raise _error(f"{path}: the top level is a JSON {type(data).__name__}, not an object; the file is "
                     f"damaged or was replaced: {_RESTORE}")
    return data


def _verify_bits_field(value, path: Path, field: str, allowed: tuple[int, int]) -> None:
    if value is not None and (not _is_int(value) or not allowed[0] <= value <= allowed[1]):
        raise _error(f"{path}: field {field} is {value!r}; expected null or an integer in "
                     f"{allowed[0]}..{allowed[1]}: {_RESTORE}")


def _verify_layer_entry(name: str, entry, path: Path) -> None:
    field = f"layers.{name}"
    if not isinstance(entry, dict):
        raise _error(f"{path}: field {field} is a {type(entry).__name__}, not an object: {_RESTORE}")
    for key in ("weight_bits", "act_bits"):
        if key not in entry:
            raise _error(f"{path}: field {field}.{key} is missing: {_RESTORE}")
    _verify_bits_field(entry["weight_bits"], path, f"{field}.weight_bits", WEIGHT_BITS_RANGE)
    _verify_bits_field(entry["act_bits"], path, f"{field}.act_bits", ACT_BITS_RANGE)
    shape = entry.get("weight_shape")
    if shape is not None and (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)):
        raise _error(f"{path}: field {field}.weight_shape is {shape!r}; expected a list of sizes: {_RESTORE}")
    for key in ("codes_nbytes", "split_at"):
        if entry.get(key) is not None and not (_is_int(entry[key]) and entry[key] >= 0):
            raise _error(f"{path}: field {field}.{key} is {entry[key]!r}; expected a non-negative integer: {_RESTORE}")


def _verify_name_list(qcfg: dict, key: str, path: Path) -> None:
    value = qcfg.get(key, [])
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise _error(f"{path}: field {key} is {value!r}; expected a list of layer names: {_RESTORE}")


def _verify_timestep_groups(qcfg: dict, path: Path) -> None:
    groups = qcfg.get("timestep_groups")
    if groups is None:
        return
    ok = isinstance(groups, dict) and all(
        isinstance(groups.get(k), list) and all(_is_int(v) for v in groups[k]) for k in ("timesteps", "groups"))
    if not ok or not groups["timesteps"] or len(groups["timesteps"]) != len(groups["groups"]):
        raise _error(f"{path}: field timestep_groups is {groups!r}; expected an object with equally long integer "
                     f"lists 'timesteps' and 'groups': {_RESTORE}")


def verify_quantization_config(qcfg, path: Path, format_version: int) -> dict:
    """The parsed quantization_config.json if its structure is what save_quantized writes (the
    values that depend on the model are checked once the model is rebuilt)."""
    qcfg = verify_json_object(qcfg, path)
    if qcfg.get("quant_method") != "gaq":
        raise _error(f"{path}: quant_method is {qcfg.get('quant_method')!r}, not 'gaq'; "
                     "this is not a diffusers-gaq checkpoint")
    version = qcfg.get("format_version", 0)
    if not _is_int(version) or version < 0:
        raise _error(f"{path}: field format_version is {version!r}; expected an integer: {_RESTORE}")
    if version > format_version:
        raise _error(f"{path}: format version {version} is newer than this diffusers-gaq understands "
                     f"({format_version}); upgrade diffusers-gaq")
    if not isinstance(qcfg.get("config"), dict):
        what = "missing" if "config" not in qcfg else f"a {type(qcfg['config']).__name__}, not an object"
        raise _error(f"{path}: field config (the quantizer settings) is {what}: {_RESTORE}")
    layers = qcfg.get("layers", {})
    if not isinstance(layers, dict):
        raise _error(f"{path}: field layers is a {type(layers).__name__}, not an object: {_RESTORE}")
    for name, entry in layers.items():
        _verify_layer_entry(name, entry, path)
    for key in ("kept_fp", "attention"):
        _verify_name_list(qcfg, key, path)
    if qcfg.get("base_class") is not None and not isinstance(qcfg["base_class"], str):
        raise _error(f"{path}: field base_class is {qcfg['base_class']!r}; expected a class name: {_RESTORE}")
    _verify_timestep_groups(qcfg, path)
    digest = qcfg.get(DIGEST_FIELD)
    if version >= 2 and not (isinstance(digest, str) and len(digest) == 64):
        what = "missing" if digest is None else f"{digest!r}, not a sha256 hex digest"
        raise _error(f"{path}: field {DIGEST_FIELD} is {what}; format version {version} records the digest of the "
                     f"weights file at save: {_RESTORE}")
    return qcfg


def verify_timestep_groups_fit(groups: list[int], num_groups: int, path: Path) -> None:
    """Every calibrated timestep's group must be one the quantizers hold a step size for."""
    if min(groups) < 0 or max(groups) >= num_groups:
        raise _error(f"{path}: field timestep_groups.groups holds groups {min(groups)}..{max(groups)}, but the "
                     f"activation quantizers hold {num_groups} (config.num_act_timestep_groups): {_RESTORE}")


# ---- the layer table against the rebuilt model ---------------------------------------------------
def _bits(quantizer) -> int | None:
    return quantizer.bits if quantizer is not None else None


def verify_layer_table(model, table: dict, config_path: Path, model_config_name: str) -> None:
    """Every wrapped layer of the freshly rebuilt ``model`` (wrapped from the saved "config", so
    with the bit widths its weight_bits / act_bits / layer_precision / first_last_precision /
    keep_fp resolve to) has a table entry that agrees with it: shape, packed size, bit widths and
    split; and the table names no other layer. Run before the table's weight bits are applied."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    for name, layer in wrapped:
        entry = table.get(name)
        if entry is None:
            raise _error(f"{config_path}: no entry for quantized layer {name} in field layers, but the quantizer "
                         f"settings under \"config\" quantize it: {_RESTORE}")
        shape = list(layer.layer.weight.shape)
        if entry.get("weight_shape") is not None and entry["weight_shape"] != shape:
            raise _error(f"{config_path}: layer {name} is recorded with weight shape {entry['weight_shape']}, but the "
                         f"model built from {model_config_name} has {shape}; the two files disagree (edited, or "
                         f"from different checkpoints): {_RESTORE}")
        bits = entry["weight_bits"]
        if bits is not None and entry.get("codes_nbytes") is not None:
            need = packed_nbytes(math.prod(shape), bits)
            if entry["codes_nbytes"] != need:
                raise _error(f"{config_path.parent / WEIGHTS_NAME}: {name}{PACKED_SUFFIX} holds {entry['codes_nbytes']} "
                             f"bytes but {bits}-bit codes of shape {tuple(shape)} need {need}; the bit widths in "
                             f"{config_path.name} disagree with the tensors: {_RESTORE}")
        for key, rebuilt in (("weight_bits", _bits(layer.weight_quantizer)), ("act_bits", _bits(layer.act_quantizer))):
            if entry[key] != rebuilt:
                raise _error(f"{config_path}: field layers.{name}.{key} is {entry[key]}, but the quantizer settings "
                             f"under \"config\" (weight_bits, act_bits, layer_precision, first_last_precision, "
                             f"keep_fp) give this layer {rebuilt}; one of the two was edited: {_RESTORE}")
        if "split_at" in entry and entry["split_at"] != layer.split_at:
            raise _error(f"{config_path}: field layers.{name}.split_at is {entry['split_at']}, but the rebuilt model "
                         f"splits this layer's input at {layer.split_at}: {_RESTORE}")
    extra = sorted(set(table) - {n for n, _ in wrapped})
    if extra:
        raise _error(f"{config_path}: field layers lists {extra[:5]}{'...' if len(extra) > 5 else ''}, which the "
                     f"quantizer settings under \"config\" do not quantize (or the model has no such layer): {_RESTORE}")


# ---- tensors ---------------------------------------------------------------------------------------
def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (the calibration checkpoint's digest)."""

    return tensors_digest(state)


def verify_digest(state: dict, expected: str | None, weights_path: Path, config_name: str) -> None:
    if expected is None:
        return  # format version 1: written before the digest existed (the caller logs it)
    if weights_digest(state) != expected:
        raise _error(f"{weights_path}: its tensors do not match {DIGEST_FIELD} in {config_name} (written at save); "
                     f"the file is corrupt or was edited: {_RESTORE}")


def verify_finite(state: dict, weights_path: Path) -> None:
    """Every float tensor must hold finite values: one NaN makes every output NaN. The ``gaq.*``
    quantizer tensors are left to their own, stricter checks (verify_scales, verify_zero_points)."""
    for key, t in state.items():
        if t.is_floating_point() and not key.startswith("gaq.") and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise _error(f"{weights_path}: tensor {key} holds NaN/Inf ({bad} of {t.numel()} values); a saved "
                         f"checkpoint holds finite values only: the file is corrupt or was edited: {_RESTORE}")


def verify_flat_tensor(state: dict, key: str, weights_path: Path, dtype: torch.dtype | None = None,
                       length: int | None = None) -> torch.Tensor:
    """The 1-D tensor ``state[key]`` of real numbers, of ``dtype`` and ``length`` when given."""
    if key not in state:
        raise _error(f"{weights_path}: tensor {key} is missing: {_RESTORE}")
    t = state[key]
    numeric = not (t.is_complex() or t.dtype == torch.bool)
    if t.dim() != 1 or (dtype is not None and t.dtype != dtype) or not numeric:
        kind = dtype if dtype is not None else "a real number dtype"
        raise _error(f"{weights_path}: tensor {key} has shape {list(t.shape)} and dtype {t.dtype}; expected one "
                     f"dimension and {kind}: {_RESTORE}")
    if length is not None and len(t) != length:
        raise _error(f"{weights_path}: tensor {key} holds {len(t)} values, but the layers in the checkpoint's "
                     f"quantization_config.json need {length}: {_RESTORE}")
    return t


def verify_scales(scale: torch.Tensor, weights_path: Path, field: str) -> None:
    """Step sizes must be finite and positive: NaN poisons every output, a sign flips them, zero
    sends every value to the clip level."""
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bad.any():
        value = scale.reshape(-1)[bad.reshape(-1).nonzero()[0, 0]].item()
        raise _error(f"{weights_path}: {field} holds {value} ({int(bad.sum())} of {scale.numel()} bad); step sizes "
                     f"must be finite and > 0: the file is corrupt or was edited: {_RESTORE}")


def verify_zero_points(zero_point: torch.Tensor, bits: int, weights_path: Path, field: str) -> None:
    """Zero points are integer codes: finite, integral, in [0, 2^bits - 1]."""
    zp = zero_point.double()
    bad = ~(torch.isfinite(zp) & (zp == zp.round()) & (zp >= 0) & (zp <= 2**bits - 1))
    if bad.any():
        value = zp.reshape(-1)[bad.reshape(-1).nonzero()[0, 0]].item()
        raise _error(f"{weights_path}: {field} holds {value}; a {bits}-bit zero point must be an integer in "
                     f"[0, {2**bits - 1}]: the file is corrupt, or the bit widths in quantization_config.json "
                     f"were edited: {_RESTORE}")


def verify_codes(codes: torch.Tensor, bits: int, weights_path: Path, field: str) -> None:
    # Unpacked sub-byte codes are in range by construction; 8-bit ones fill uint8: cheap to check anyway.
    if codes.numel() and int(codes.max()) > 2**bits - 1:
        raise _error(f"{weights_path}: {field} holds code {int(codes.max())}, more than {bits} bits hold: {_RESTORE}")


__all__ = ["DIGEST_FIELD", "verify_codes", "verify_digest", "verify_finite", "verify_flat_tensor", "verify_json_object",
           "verify_layer_table", "verify_quantization_config", "verify_scales", "verify_timestep_groups_fit", "verify_zero_points",
           "weights_digest"]
