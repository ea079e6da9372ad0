"""The checkpoint format of a quantized model: packed integer weights, scales, zero points, activation steps.

A checkpoint folder holds
    config.json                          the base model's diffusers config
    quantization_config.json             GradientAlignedQuantizer + per-layer bit widths, splits, kept-FP layers
    diffusion_pytorch_model.safetensors  weights as packed integer codes (two 4-bit codes per byte),
                                         per-channel scales / zero points, activation quantizer state,
                                         and every non-quantized tensor (norms, kept-FP layers)
    calibration_report.safetensors/.json learned sample weights with their timesteps, per-unit losses
    README.md                            the model card
Only safetensors and JSON: nothing is unpickled. This module writes and reads those files and
nothing else: modeling.py builds the model from them, hub/ writes the card and uploads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import diffusers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import checkpoint_checks as checks
from .calibration.report_io import report_from_files, report_to_files
from .checkpoint_layout import (
    FORMAT_VERSION,
    MODEL_CONFIG_NAME,
    PACKED_SUFFIX,
    REPORT_JSON,
    REPORT_TENSORS,
    WEIGHTS_NAME,
    CheckpointError,
    config_json_entry,
)
from .config import CONFIG_NAME, GradientAlignedQuantizer, sorted_fields
from .file_digests import FILES_DIGEST_FIELD, check_files_digest_field, files_digests, verify_files_digests
from .files import atomic_save_safetensors, atomic_write_text
from .models.plain import base_class
from .quant.layers import QuantLayer
from .quant.packing import pack_bits, packed_nbytes, unpack_bits
from .quant.quantizers import ActQuantizer
from .runtime import is_integer_runtime

logger = logging.getLogger(__name__)



# Per-layer quantizer tensors are stored as a few flat tensors: a checkpoint of a small model
# with one entry per tiny tensor spends more bytes on the safetensors JSON header than on scales.
CODES_KEY = "gaq.weight_codes"  # every layer's packed codes, concatenated in module order
WEIGHT_SCALES_KEY = "gaq.weight_scales"  # float32, per output channel (or one per layer)
WEIGHT_ZEROS_KEY = "gaq.weight_zero_points"  # uint8 (codes are at most 8-bit)
ACT_SCALES_KEY = "gaq.act_scales"  # float32, one per activation quantizer, in module order
ACT_ZEROS_KEY = "gaq.act_zero_points"
_ACT_BUFFERS = ("scale", "zero_point", "running_min", "running_max", "initialized")


def _quant_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.weight_quantizer is not None]


def _act_quantizers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantizer)]


def quantized_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors with every hardened weight replaced by packed codes, and the quantizer
    state flattened into the ``gaq.*`` tensors above."""
    if is_integer_runtime(model):
        raise ValueError("the model runs on the integer runtime, which holds its weights in the kernels' layout only: "
                         "load it with runtime='simulated' to save it")
    state = model.state_dict()
    codes, scales, zeros = [], [], []
    for name, layer in _quant_layers(model):
        wq = layer.weight_quantizer
        if wq.mode != "frozen":
            raise ValueError(f"layer {name} is not calibrated (weight quantizer mode {wq.mode!r}); "
                             "quantize the model with quantize_pipeline() before saving")
        for key in ("layer.weight", "weight_quantizer.codes", "weight_quantizer.scale", "weight_quantizer.zero_point"):
            state.pop(f"{name}.{key}")
        codes.append(pack_bits(wq.codes, wq.bits))
        scales.append(wq.scale.detach().float().flatten())
        zeros.append(wq.zero_point.detach().flatten())
    if codes:
        state[CODES_KEY] = torch.cat(codes)
        state[WEIGHT_SCALES_KEY] = torch.cat(scales)
        state[WEIGHT_ZEROS_KEY] = torch.cat(zeros).round().to(torch.uint8)
    acts = _act_quantizers(model)
    for name, q in acts:
        if not bool(q.initialized):
            raise ValueError(f"activation quantizer {name} was never calibrated; quantize the model before saving")
        for key in _ACT_BUFFERS:
            state.pop(f"{name}.{key}")
    if acts:
        # One value per quantizer, or one per timestep group for timestep-aware ones, concatenated.
        # |s|: the quantizer computes with |s| (LSQ may step through zero), so the stored step is
        # positive and a load can refuse a negative one as damage.
        state[ACT_SCALES_KEY] = torch.cat([q.scale.detach().float().abs().flatten() for _, q in acts])
        state[ACT_ZEROS_KEY] = torch.cat([q.zero_point.detach().float().flatten() for _, q in acts])
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FloatingPointError(f"refusing to save: tensor {key} holds NaN/Inf")
    return {k: v.contiguous() for k, v in state.items()}


def restore_quantizers(model, state: dict, table: dict, per_channel: bool, weights_path: Path) -> None:
    """Inverse of quantized_state_dict's flattening: put codes, scales and zero points back into the
    freshly wrapped ``model`` and the per-module entries back into ``state``, checking every value
    on the way (the table itself was checked against the model by checks.verify_layer_table)."""
    _restore_weight_quantizers(model, state, table, per_channel, weights_path)
    _restore_act_quantizers(model, state, weights_path)


def _restore_weight_quantizers(model, state: dict, table: dict, per_channel: bool, weights_path: Path) -> None:
    layers = _quant_layers(model)
    if not layers:
        return
    need_codes = sum(packed_nbytes(m.layer.weight.numel(), table[n]["weight_bits"]) for n, m in layers)
    need_scales = sum(m.layer.weight.shape[0] if per_channel else 1 for _, m in layers)
    blob = checks.verify_flat_tensor(state, CODES_KEY, weights_path, dtype=torch.uint8)
    if len(blob) != need_codes:
        raise CheckpointError(f"{weights_path}: {CODES_KEY} holds {len(blob)} bytes, but the layers in {CONFIG_NAME} "
                              f"need {need_codes}; the bit widths in {CONFIG_NAME} disagree with the tensors: "
                              "restore the folder from the original save")
    scales = checks.verify_flat_tensor(state, WEIGHT_SCALES_KEY, weights_path, length=need_scales)
    zeros = checks.verify_flat_tensor(state, WEIGHT_ZEROS_KEY, weights_path, length=need_scales)
    for key in (CODES_KEY, WEIGHT_SCALES_KEY, WEIGHT_ZEROS_KEY):
        state.pop(key)
    at_code = at_scale = 0
    for name, layer in layers:
        bits, shape = table[name]["weight_bits"], tuple(layer.layer.weight.shape)
        need = packed_nbytes(int(torch.tensor(shape).prod()), bits)
        k = shape[0] if per_channel else 1
        wq = layer.weight_quantizer
        wq.bits = bits  # per-layer bit widths may differ from the default
        codes = unpack_bits(blob[at_code : at_code + need], bits, shape)
        checks.verify_codes(codes, bits, weights_path, f"{name}{PACKED_SUFFIX}")
        scale = scales[at_scale : at_scale + k].clone()
        zp = zeros[at_scale : at_scale + k].float()
        checks.verify_scales(scale, weights_path, f"{WEIGHT_SCALES_KEY} (layer {name})")
        checks.verify_zero_points(zp, bits, weights_path, f"{WEIGHT_ZEROS_KEY} (layer {name})")
        if not per_channel:
            scale, zp = scale.reshape(()), zp.reshape(())
        at_code, at_scale = at_code + need, at_scale + k
        wq.load_codes(codes, scale, zp)
        layer.layer.weight.data = wq(layer.layer.weight).detach().clone()
        state[f"{name}.layer.weight"] = layer.layer.weight.data
        state[f"{name}.weight_quantizer.codes"] = wq.codes
        state[f"{name}.weight_quantizer.scale"] = scale
        state[f"{name}.weight_quantizer.zero_point"] = zp


def _restore_act_quantizers(model, state: dict, weights_path: Path) -> None:
    acts = _act_quantizers(model)
    if not acts:
        return
    need = sum(q.scale.numel() for _, q in acts)  # timestep-aware quantizers hold one per group
    act_scales = checks.verify_flat_tensor(state, ACT_SCALES_KEY, weights_path, length=need)
    act_zeros = checks.verify_flat_tensor(state, ACT_ZEROS_KEY, weights_path, length=need)
    state.pop(ACT_SCALES_KEY), state.pop(ACT_ZEROS_KEY)
    at = 0
    for name, q in acts:
        k, shape = q.scale.numel(), q.scale.shape
        scale, zp = act_scales[at : at + k], act_zeros[at : at + k]
        checks.verify_scales(scale, weights_path, f"{ACT_SCALES_KEY} (activation quantizer {name})")
        checks.verify_zero_points(zp, q.bits, weights_path, f"{ACT_ZEROS_KEY} (activation quantizer {name})")
        state[f"{name}.scale"] = scale.reshape(shape)
        state[f"{name}.zero_point"] = zp.reshape(shape)
        state[f"{name}.initialized"] = torch.tensor(True)
        state[f"{name}.running_min"] = torch.full(shape, float("inf"))
        state[f"{name}.running_max"] = torch.full(shape, float("-inf"))
        at += k


def layer_table(model) -> dict[str, dict]:
    table = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLayer):
            table[name] = {
                "type": type(layer.layer).__name__,
                "weight_shape": list(layer.layer.weight.shape),
                "weight_bits": layer.weight_quantizer.bits if layer.weight_quantizer else None,
                "act_bits": layer.act_quantizer.bits if layer.act_quantizer else None,
                "split_at": layer.split_at,
            }
            if layer.weight_quantizer is not None:
                numel = layer.layer.weight.numel()
                table[name]["codes_nbytes"] = packed_nbytes(numel, layer.weight_quantizer.bits)
    return table


# ---- writing -----------------------------------------------------------------------------------
def write_quantized_files(model, folder: Path, *, config: GradientAlignedQuantizer, wrap, report=None,
                          base_model: str | None = None, timestep_groups=None) -> None:
    """Write config.json, quantization_config.json, the packed weights and (when there is one) the
    calibration report into ``folder``, each file atomically. ``base_model`` is recorded as given: the
    caller makes it publishable (hub.public_base_model), since a push uploads this file."""
    state = quantized_state_dict(model)
    cfg = dict(model.config)
    base = base_class(model)
    cfg["_class_name"] = base.__name__
    # Makes `<Base>.from_pretrained(folder)` load the quantized model, or refuse: never FP-looking weights.
    cfg["quantization_config"] = config_json_entry(base.__name__)
    cfg_text = json.dumps(cfg, indent=2, sort_keys=True, default=list) + "\n"
    atomic_write_text(folder / MODEL_CONFIG_NAME, cfg_text)
    qcfg = {
        "quant_method": "gaq",
        "format_version": FORMAT_VERSION,
        "base_class": base.__name__,
        "config": sorted_fields(config.to_dict()),
        "layers": layer_table(model),
        "base_model": base_model,
        "kept_fp": list(wrap.kept_fp) if wrap else [],
        "attention": list(wrap.attention) if wrap else [],
        checks.DIGEST_FIELD: checks.weights_digest(state),  # verified at load: catches a flipped byte
    }
    if timestep_groups is not None:
        qcfg["timestep_groups"] = timestep_groups.to_dict()
    # Not sort_keys: layer_precision's order decides which pattern wins, and the layer table reads
    # best in module order.
    qcfg = sorted_fields(qcfg)
    # Digests of the files as a reader parses them (tuples become lists), verified at load.
    qcfg[FILES_DIGEST_FIELD] = files_digests(json.loads(cfg_text), json.loads(json.dumps(qcfg)))
    atomic_write_text(folder / CONFIG_NAME, json.dumps(qcfg, indent=2) + "\n")
    atomic_save_safetensors(state, folder / WEIGHTS_NAME,
                            metadata={"format": "pt", "gaq_format_version": str(FORMAT_VERSION)})
    if report is not None:
        report_to_files(report, folder / REPORT_TENSORS, folder / REPORT_JSON)


# ---- reading -----------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """A JSON file whose top level is an object (anything else is damage), as a dict."""
    if path.exists() and not path.is_file():  # a folder, or a FIFO that would block the read forever
        raise CheckpointError(f"{path} is not a regular file; restore it from the original save")
    try:
        return checks.verify_json_object(json.loads(path.read_text(encoding="utf-8")), path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {path.parent} is not a diffusers-gaq checkpoint "
                              "(expected config.json, quantization_config.json and diffusion_pytorch_model.safetensors)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None



def read_quantization_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    qcfg = checks.verify_quantization_config(read_json(path), path, FORMAT_VERSION)
    version = qcfg.get("format_version", 0)
    if version >= 3:
        check_files_digest_field(qcfg.get(FILES_DIGEST_FIELD), path)
    elif checks.DIGEST_FIELD in qcfg:
        logger.info("%s: format version %s records no %s: only the tensors are verified against a digest, not "
                    "%s or %s", path, version, FILES_DIGEST_FIELD, MODEL_CONFIG_NAME, CONFIG_NAME)
    else:
        logger.info("%s: format version %s records no digest: the files are loaded without a digest check",
                    path, version)
    return qcfg


def verify_config_files(folder: Path, qcfg: dict) -> None:
    """config.json and quantization_config.json against the digests recorded at save (format 3+)."""
    if FILES_DIGEST_FIELD in qcfg:
        verify_files_digests(folder, read_json(folder / MODEL_CONFIG_NAME), qcfg)


def saved_quantizer_config(qcfg: dict, path: Path) -> GradientAlignedQuantizer:
    saved_config = dict(qcfg["config"])
    # Checkpoints from before per-layer precision quantized the first and last layers like the rest.
    saved_config.setdefault("first_last_precision", "same")
    try:
        return GradientAlignedQuantizer.from_dict(saved_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: field config (the quantizer settings) is invalid ({e}); the file was edited "
                              "or is damaged: restore it from the original save") from None


def build_base_model(qcfg: dict, folder: Path):
    """The saved base class, built from config.json with random weights (they are all overwritten)."""
    model_cfg_path = folder / MODEL_CONFIG_NAME
    model_cfg = read_json(model_cfg_path)
    base_name = qcfg.get("base_class", model_cfg.get("_class_name"))
    base = getattr(diffusers, base_name, None) if isinstance(base_name, str) else None
    if not isinstance(base, type) or not issubclass(base, diffusers.ModelMixin):
        raise CheckpointError(f"{folder / CONFIG_NAME}: {base_name!r} is not a diffusers model class; the file was "
                              "edited or is damaged: restore it from the original save")
    try:
        model = base.from_config(model_cfg)
        if type(model) is not base:
            # from_config remaps some legacy classes (Transformer2DModel with ada_norm_zero -> DiTTransformer2DModel);
            # the checkpoint's layer table is the saved class's, so build exactly that one.
            init_kwargs, _, _ = base.extract_init_dict(model_cfg)
            model = base(**init_kwargs)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{model_cfg_path}: cannot build a {base_name} from it ({type(e).__name__}: {e}); the "
                              "file was edited or is damaged: restore it from the original save") from None
    return model.eval().requires_grad_(False)


def read_weights(weights_path: Path, qcfg: dict) -> dict[str, torch.Tensor]:
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} cannot be read ({e}); the file is truncated or corrupt") from None
    checks.verify_digest(state, qcfg.get(checks.DIGEST_FIELD), weights_path, CONFIG_NAME)
    checks.verify_finite(state, weights_path)
    return state


def read_optional_report(folder: Path):
    """The calibration report, or None: it only documents the run, so a damaged one costs a warning,
    never the model."""
    if not (folder / REPORT_TENSORS).is_file():
        return None
    try:
        return report_from_files(folder / REPORT_TENSORS, folder / REPORT_JSON)
    except Exception as e:  # noqa: BLE001 - whatever the damage, the model itself is intact
        logger.warning("skipped the calibration report %s / %s: it cannot be read (%s: %s); the model loads "
                       "without it (gaq_report is None)", folder / REPORT_TENSORS, REPORT_JSON, type(e).__name__, e)
        return None

