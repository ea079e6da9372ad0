"""Save and load quantized models: packed integer weights, scales, zero points, activation steps.

A checkpoint folder holds
    config.json                          the base model's diffusers config
    quantization_config.json             GradientAlignedQuantizer + per-layer bit widths, splits, kept-FP layers
    diffusion_pytorch_model.safetensors  weights as packed integer codes (two 4-bit codes per byte),
                                         per-channel scales / zero points, activation quantizer state,
                                         and every non-quantized tensor (norms, kept-FP layers)
    calibration_report.safetensors/.json learned sample weights with their timesteps, per-unit losses
    README.md                            the model card
Only safetensors and JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint_checks as checks
from .config import CONFIG_NAME, FP_TAG, GradientAlignedQuantizer, precision_tag, sorted_fields
from .diffusers_registry import config_json_entry
from .quant.layers import QuantLayer
from .quant.quantizers import ActQuantizer
from .quant.packing import pack_bits, packed_nbytes, unpack_bits
from .utils import atomic_directory, atomic_save_safetensors, atomic_write_text

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MODEL_CONFIG_NAME = "config.json"
REPORT_TENSORS = "calibration_report.safetensors"
REPORT_JSON = "calibration_report.json"
# 2: quantization_config.json records weights_sha256, the digest of the weights file's tensors.
# Version 1 checkpoints (no digest) still load.
FORMAT_VERSION = 2
PACKED_SUFFIX = ".weight_packed"


class CheckpointError(ValueError):
    """A folder is not a readable diffusers-gaq checkpoint; the message names the file and the problem."""


def _base_class(model) -> type:
    from .models.quantized import QuantizedModelMixin

    return next(c for c in type(model).__mro__ if c is not QuantizedModelMixin and not issubclass(c, QuantizedModelMixin))


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


def _restore_quantizers(model, state: dict, table: dict, per_channel: bool, weights_path: Path) -> None:
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


# ---- what a checkpoint holds, per precision ---------------------------------------------------
_SAFETENSORS_BITS = {"F16": 16, "BF16": 16, "F32": 32, "F64": 64}


@dataclass
class WeightBits:
    """Storage of a quantized model's Conv2d / Linear weights: integer codes at their bit widths,
    full-precision weights at their dtype's (32, or 16 for a half-precision model)."""

    quantized_weights: int = 0
    fp_weights: int = 0
    total_bits: int = 0
    packed_bytes: int = 0  # bytes of the packed codes (as stored in gaq.weight_codes)

    def add(self, numel: int, bits: int | None, fp_bits: int) -> None:
        if bits is None:
            self.fp_weights += numel
            self.total_bits += numel * fp_bits
        else:
            self.quantized_weights += numel
            self.total_bits += numel * bits
            self.packed_bytes += packed_nbytes(numel, bits)

    @property
    def bits_per_weight(self) -> float:
        total = self.quantized_weights + self.fp_weights
        return self.total_bits / total if total else 0.0


def model_weight_bits(model) -> WeightBits:
    """WeightBits of a wrapped model: every Conv2d / Linear, wrapped (codes) or not (its dtype)."""
    from torch import nn

    result, inner = WeightBits(), set()
    for module in model.modules():
        if isinstance(module, QuantLayer):
            inner.add(id(module.layer))
            wq = module.weight_quantizer
            weight = module.layer.weight
            result.add(weight.numel(), wq.bits if wq is not None else None, weight.element_size() * 8)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in inner:
            result.add(module.weight.numel(), None, module.weight.element_size() * 8)
    return result


def checkpoint_weight_bits(folder: str | os.PathLike) -> WeightBits:
    """WeightBits of a saved quantized model (the folder holding quantization_config.json), from
    its layer table and the safetensors header (shapes and dtypes of the FP weights; nothing is loaded)."""
    from safetensors import safe_open

    folder = Path(folder)
    qcfg = _read_json(folder / CONFIG_NAME)
    result = WeightBits()
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as tensors:
        keys = set(tensors.keys())

        def fp_bits(key: str) -> int:
            return _SAFETENSORS_BITS.get(tensors.get_slice(key).get_dtype(), 32) if key in keys else 32

        for name, entry in qcfg.get("layers", {}).items():
            numel = 1
            for dim in entry["weight_shape"]:
                numel *= dim
            result.add(numel, entry["weight_bits"], fp_bits(f"{name}.layer.weight"))
        for name in qcfg.get("kept_fp", []):
            key = f"{name}.weight"
            if key in keys:
                shape = tensors.get_slice(key).get_shape()
                numel = 1
                for dim in shape:
                    numel *= dim
                result.add(numel, None, fp_bits(key))
    return result


def precision_groups(layers: dict[str, dict], kept_fp=()) -> dict[str, list[str]]:
    """{precision tag ("w4a8", "w8", "a8", "fp"): layer names}, the largest group first; ``layers``
    is a layer table (quantization_config.json's "layers"), ``kept_fp`` the unwrapped layers."""
    groups: dict[str, list[str]] = {}
    for name, entry in layers.items():
        groups.setdefault(precision_tag(entry["weight_bits"], entry["act_bits"]), []).append(name)
    if kept_fp:
        groups.setdefault(FP_TAG, []).extend(kept_fp)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def format_precision_groups(groups: dict[str, list[str]], max_names: int = 4) -> str:
    """One line: "w4a8: 58 layers; fp: conv_in, conv_out; ..." (names when a group is small)."""
    parts = []
    for tag, names in groups.items():
        parts.append(f"{tag}: {', '.join(names)}" if len(names) <= max_names else f"{tag}: {len(names)} layers")
    return "; ".join(parts)


def save_quantized(model, save_directory: str | os.PathLike, *, overwrite: bool = False,
                   model_card: bool = True, **_ignored) -> Path:
    """Write the checkpoint folder atomically: it is built beside the target and renamed into place,
    so an interrupted save leaves the previous folder (or none). An existing folder is replaced
    only when it is empty or holds nothing but an earlier quantized save (check_replaceable)."""
    target = Path(save_directory)
    # Like diffusers' save_pretrained, a save replaces an earlier save; unlike it, never other files
    # (overwrite=True allows no more than that: it is accepted for symmetry with the pipeline save).
    check_replaceable(target, pipeline=False)
    state = quantized_state_dict(model)
    with atomic_directory(target) as tmp:
        base = _base_class(model)
        cfg = dict(model.config)
        cfg["_class_name"] = base.__name__
        # Makes `<Base>.from_pretrained(folder)` load the quantized model, or refuse: never FP-looking weights.
        cfg["quantization_config"] = config_json_entry(base.__name__)
        atomic_write_text(tmp / MODEL_CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True, default=list) + "\n")
        wrap = model.gaq_wrap
        qcfg = {
            "quant_method": "gaq",
            "format_version": FORMAT_VERSION,
            "base_class": base.__name__,
            "config": sorted_fields(model.gaq_config.to_dict()),
            "layers": layer_table(model),
            "base_model": _public_base_model(getattr(model, "gaq_base_model", None)),  # uploaded by push: no local path
            "kept_fp": list(wrap.kept_fp) if wrap else [],
            "attention": list(wrap.attention) if wrap else [],
            checks.DIGEST_FIELD: checks.weights_digest(state),  # verified at load: catches a flipped byte
        }
        groups = getattr(model, "gaq_timestep_groups", None)
        if groups is not None:
            qcfg["timestep_groups"] = groups.to_dict()
        # Not sort_keys: layer_precision's order decides which pattern wins, and the layer table reads
        # best in module order.
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(sorted_fields(qcfg), indent=2) + "\n")
        atomic_save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "gaq_format_version": str(FORMAT_VERSION)})
        if model.gaq_report is not None:
            from .calibration.report_io import report_to_files

            report_to_files(model.gaq_report, tmp / REPORT_TENSORS, tmp / REPORT_JSON)
        if model_card:
            from .hub import write_model_card

            write_model_card(model, tmp)
    logger.info("saved quantized model to %s", target)
    return target


# ---- what a save may replace ------------------------------------------------------------------
# A save replaces its target folder as a whole, so it may only replace what a save of ours wrote:
# everything else in the folder (an input model, a user's notes) would be deleted without a word.
CARD_FILE = "README.md"
MODEL_INDEX = "model_index.json"
EVALUATION_DIR = "evaluation"  # `diffusers-gaq evaluate`'s default report folder
_MODEL_FILES = frozenset({MODEL_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME, REPORT_TENSORS, REPORT_JSON, CARD_FILE})
# What diffusers / transformers save_pretrained write into a component folder (configs, weights,
# tokenizer vocabularies).
_COMPONENT_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
_SHOWN_FILES = 5


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
    components = _model_index_components(folder / MODEL_INDEX)
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


def _model_index_components(path: Path) -> set[str] | None:
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


def _read_json(path: Path) -> dict:
    """A JSON file whose top level is an object (anything else is damage), as a dict."""
    try:
        return checks.verify_json_object(json.loads(path.read_text(encoding="utf-8")), path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {path.parent} is not a diffusers-gaq checkpoint "
                              "(expected config.json, quantization_config.json and diffusion_pytorch_model.safetensors)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from None


def quantized_model_dir(folder: Path) -> Path:
    """The folder holding the quantized model's config: ``folder`` itself for a saved model, its
    denoiser's subfolder (``unet/``, ``transformer/``) for a saved pipeline."""
    from .models import FAMILIES

    for component in dict.fromkeys(f.component for f in FAMILIES):
        if (folder / component / CONFIG_NAME).is_file():
            return folder / component
    return folder


def resolve_checkpoint(path_or_repo: str | os.PathLike, **hub_kwargs) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded with huggingface_hub."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder")
    from huggingface_hub import snapshot_download

    from .hub import check_repo_id

    check_repo_id(str(path_or_repo))
    allowed = hub_kwargs.pop("allow_patterns", ["*.json", "*.safetensors", "*.md", "*.png"])
    return Path(snapshot_download(str(path_or_repo), allow_patterns=allowed, **hub_kwargs))


def _read_quantization_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    qcfg = checks.verify_quantization_config(_read_json(path), path, FORMAT_VERSION)
    if checks.DIGEST_FIELD not in qcfg:
        logger.debug("%s has no %s (format version %s): the weights are loaded without a digest check",
                     path, checks.DIGEST_FIELD, qcfg.get("format_version", 0))
    return qcfg


def _saved_quantizer_config(qcfg: dict, path: Path) -> GradientAlignedQuantizer:
    saved_config = dict(qcfg["config"])
    # Checkpoints from before per-layer precision quantized the first and last layers like the rest.
    saved_config.setdefault("first_last_precision", "same")
    try:
        return GradientAlignedQuantizer.from_dict(saved_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: field config (the quantizer settings) is invalid ({e}); the file was edited "
                              "or is damaged: restore it from the original save") from None


def _build_base_model(qcfg: dict, folder: Path):
    """The saved base class, built from config.json with random weights (they are all overwritten)."""
    import diffusers

    model_cfg_path = folder / MODEL_CONFIG_NAME
    model_cfg = _read_json(model_cfg_path)
    base_name = qcfg.get("base_class", model_cfg.get("_class_name"))
    base = getattr(diffusers, base_name, None) if isinstance(base_name, str) else None
    if not isinstance(base, type) or not hasattr(base, "from_config"):
        raise CheckpointError(f"{folder / CONFIG_NAME}: unknown base class {base_name!r}")
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


def _read_weights(weights_path: Path, qcfg: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} cannot be read ({e}); the file is truncated or corrupt") from None
    checks.verify_digest(state, qcfg.get(checks.DIGEST_FIELD), weights_path, CONFIG_NAME)
    return state


def _read_optional_report(folder: Path):
    """The calibration report, or None: it only documents the run, so a damaged one costs a warning,
    never the model."""
    if not (folder / REPORT_TENSORS).is_file():
        return None
    from .calibration.report_io import report_from_files

    try:
        return report_from_files(folder / REPORT_TENSORS, folder / REPORT_JSON)
    except Exception as e:  # noqa: BLE001 - whatever the damage, the model itself is intact
        logger.warning("skipped the calibration report %s / %s: it cannot be read (%s: %s); the model loads "
                       "without it (gaq_report is None)", folder / REPORT_TENSORS, REPORT_JSON, type(e).__name__, e)
        return None


def load_quantized(path_or_repo: str | os.PathLike, device: str | torch.device | None = None, **hub_kwargs):
    """Rebuild a quantized model that computes bit-identically to the one that was saved. Everything
    read is verified (checkpoint_checks.py); a checkpoint that disagrees with itself raises CheckpointError."""
    from .models import family_for
    from .models.quantized import mark_quantized
    from .models.timestep_groups import TimestepGroups, install_timestep_groups
    from .models.wrap import set_quant_state, wrap_model
    from .quant.quantizers import has_timestep_aware

    folder = resolve_checkpoint(path_or_repo, **hub_kwargs)
    qcfg = _read_quantization_config(folder)
    config = _saved_quantizer_config(qcfg, folder / CONFIG_NAME)
    model = _build_base_model(qcfg, folder)
    family = family_for(model)
    try:
        wrap = wrap_model(model, config, family)
    except ValueError as e:  # a layer_precision pattern that matches no layer of this model
        raise CheckpointError(f"{folder / CONFIG_NAME}: field config does not fit the model in "
                              f"{MODEL_CONFIG_NAME} ({e}): restore the files from the original save") from None
    wrap.kept_fp = list(qcfg.get("kept_fp", wrap.kept_fp))
    table = qcfg.get("layers", {})
    # The rebuilt model's bit widths come from "config"; the table must say the same.
    checks.verify_layer_table(model, table, folder / CONFIG_NAME, MODEL_CONFIG_NAME)

    weights_path = folder / WEIGHTS_NAME
    state = _read_weights(weights_path, qcfg)
    _restore_quantizers(model, state, table, config.weight_granularity == "per_channel", weights_path)
    # Buffers that are None until calibration (AdaRound's floor) are not in a frozen model.
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise CheckpointError(f"{weights_path}: its tensors do not fit the model built from {MODEL_CONFIG_NAME} "
                              f"({e}): restore the folder from the original save") from None
    if unexpected:
        raise CheckpointError(f"{weights_path}: unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    if missing:
        raise CheckpointError(f"{weights_path}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    report = _read_optional_report(folder)
    if has_timestep_aware(model):
        if "timestep_groups" not in qcfg:
            raise CheckpointError(f"{folder / CONFIG_NAME}: the model has timestep-aware activation quantizers but "
                                  "no 'timestep_groups' entry; the file is incomplete")
        groups = qcfg["timestep_groups"]
        checks.verify_timestep_groups_fit(groups["groups"], config.num_act_timestep_groups, folder / CONFIG_NAME)
        install_timestep_groups(model, TimestepGroups.from_dict(groups))
    set_quant_state(model, weight=True, act=config.quantizes_activations)
    mark_quantized(model, config, wrap, report)
    model.gaq_base_model = qcfg.get("base_model")
    if device is not None:
        model.to(device)
    return model


def load_quantized_pipeline(path_or_repo: str | os.PathLike, **kwargs):
    """Reload a pipeline saved with ``pipeline.save_pretrained`` (its denoiser quantized): the same
    as ``DiffusionPipeline.from_pretrained(path)``, which finds ``diffusers_gaq``'s quantized class
    (``QuantizedUNet2DModel``, ``QuantizedDiTTransformer2DModel``, ...) through model_index.json.
    A pipeline class diffusers does not ship (``ClassConditionalDDIMPipeline``) is looked up here."""
    from diffusers import DiffusionPipeline

    kwargs.setdefault("local_files_only", Path(path_or_repo).is_dir())
    index = Path(path_or_repo) / "model_index.json"
    pipeline_class = DiffusionPipeline
    if index.is_file():
        from . import pipelines

        # diffusers resolves `_class_name` in its own namespace only.
        pipeline_class = getattr(pipelines, _read_json(index).get("_class_name", ""), DiffusionPipeline)
    return pipeline_class.from_pretrained(str(path_or_repo), **kwargs)


def save_quantized_pipeline(pipe, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a whole pipeline whose denoiser is quantized (model_index.json, scheduler/, unet/ or
    transformer/ in the quantized format, the other components as diffusers saves them, the model
    card also at the top), atomically: built beside the target, then renamed into place. A
    non-empty target is refused unless ``overwrite``, and even then unless it holds nothing but an
    earlier quantized pipeline save (check_replaceable)."""
    from .models import denoiser_of

    _, component, _ = denoiser_of(pipe)
    target = Path(save_directory)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {target} exists and is not empty; pass overwrite=True "
                              "(CLI: --overwrite) or choose another folder")
    check_replaceable(target, pipeline=True)  # overwrite=True replaces an earlier save of ours, nothing else
    with atomic_directory(target) as tmp:
        pipe.save_pretrained(tmp)
        for item in (tmp / component).iterdir():
            if item.suffix in (".md", ".png"):
                shutil.copy2(item, tmp / item.name)
    return target


def _public_base_model(name_or_path):
    from .hub import public_base_model

    return public_base_model(name_or_path)
