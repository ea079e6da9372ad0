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

from .config import CONFIG_NAME, FP_TAG, GradientAlignedQuantizer, precision_tag, sorted_fields
from .quant.layers import QuantLayer
from .quant.quantizers import ActQuantizer
from .quant.packing import pack_bits, packed_nbytes, unpack_bits
from .utils import atomic_directory, atomic_save_safetensors, atomic_write_text

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MODEL_CONFIG_NAME = "config.json"
REPORT_TENSORS = "calibration_report.safetensors"
REPORT_JSON = "calibration_report.json"
FORMAT_VERSION = 1
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
        state[ACT_SCALES_KEY] = torch.cat([q.scale.detach().float().flatten() for _, q in acts])
        state[ACT_ZEROS_KEY] = torch.cat([q.zero_point.detach().float().flatten() for _, q in acts])
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise FloatingPointError(f"refusing to save: tensor {key} holds NaN/Inf")
    return {k: v.contiguous() for k, v in state.items()}


def _restore_quantizers(model, state: dict, table: dict, per_channel: bool, weights_path: Path) -> None:
    """Inverse of quantized_state_dict's flattening: put codes, scales and zero points back into the
    freshly wrapped ``model`` and the per-module entries back into ``state``."""
    for key in (CODES_KEY, WEIGHT_SCALES_KEY, WEIGHT_ZEROS_KEY):
        if key not in state and _quant_layers(model):
            raise CheckpointError(f"{weights_path}: tensor {key} is missing")
    blob = state.pop(CODES_KEY, torch.zeros(0, dtype=torch.uint8))
    scales, zeros = state.pop(WEIGHT_SCALES_KEY, None), state.pop(WEIGHT_ZEROS_KEY, None)
    at_code = at_scale = 0
    for name, layer in _quant_layers(model):
        entry = table.get(name)
        if entry is None:
            raise CheckpointError(f"{weights_path.parent / CONFIG_NAME}: no entry for quantized layer {name}")
        bits, shape = entry["weight_bits"], tuple(layer.layer.weight.shape)
        if entry.get("weight_shape") is not None and entry["weight_shape"] != list(shape):
            raise CheckpointError(f"{weights_path.parent / CONFIG_NAME}: layer {name} is recorded with weight shape "
                                  f"{entry['weight_shape']}, but the model built from {MODEL_CONFIG_NAME} has "
                                  f"{list(shape)}; the two files disagree (edited, or from different checkpoints)")
        need = packed_nbytes(int(torch.tensor(shape).prod()), bits)
        stored = entry.get("codes_nbytes", need)
        if stored != need or at_code + need > len(blob):
            raise CheckpointError(f"{weights_path}: {name}{PACKED_SUFFIX} holds {stored} bytes but {bits}-bit codes of "
                                  f"shape {shape} need {need}; the bit widths in {CONFIG_NAME} disagree with the tensors")
        wq = layer.weight_quantizer
        wq.bits = bits  # per-layer bit widths may differ from the default
        codes = unpack_bits(blob[at_code : at_code + need], bits, shape)
        k = shape[0] if per_channel else 1
        scale = scales[at_scale : at_scale + k].clone()
        zp = zeros[at_scale : at_scale + k].float()
        if not per_channel:
            scale, zp = scale.reshape(()), zp.reshape(())
        at_code, at_scale = at_code + need, at_scale + k
        wq.load_codes(codes, scale, zp)
        layer.layer.weight.data = wq(layer.layer.weight).detach().clone()
        state[f"{name}.layer.weight"] = layer.layer.weight.data
        state[f"{name}.weight_quantizer.codes"] = wq.codes
        state[f"{name}.weight_quantizer.scale"] = scale
        state[f"{name}.weight_quantizer.zero_point"] = zp
    if at_code != len(blob) or (scales is not None and at_scale != len(scales)):
        raise CheckpointError(f"{weights_path}: {CODES_KEY} holds {len(blob)} bytes and {WEIGHT_SCALES_KEY} "
                              f"{0 if scales is None else len(scales)} scales, but the layers in {CONFIG_NAME} need "
                              f"{at_code} and {at_scale}; the bit widths in {CONFIG_NAME} disagree with the tensors")
    acts = _act_quantizers(model)
    if acts:
        need = sum(q.scale.numel() for _, q in acts)
        if ACT_SCALES_KEY not in state or len(state[ACT_SCALES_KEY]) != need:
            raise CheckpointError(f"{weights_path}: expected {need} activation step sizes in {ACT_SCALES_KEY} "
                                  f"({len(acts)} quantizers), found {len(state.get(ACT_SCALES_KEY, []))}")
        act_scales, act_zeros = state.pop(ACT_SCALES_KEY), state.pop(ACT_ZEROS_KEY)
        at = 0
        for name, q in acts:
            k, shape = q.scale.numel(), q.scale.shape
            state[f"{name}.scale"] = act_scales[at : at + k].reshape(shape)
            state[f"{name}.zero_point"] = act_zeros[at : at + k].reshape(shape)
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
    so an interrupted save leaves the previous folder (or none)."""
    target = Path(save_directory)
    if target.exists() and any(target.iterdir()) and not overwrite and not (target / CONFIG_NAME).exists():
        raise FileExistsError(f"{target} exists and is not empty; choose an empty folder or pass overwrite=True")
    state = quantized_state_dict(model)
    with atomic_directory(target) as tmp:
        base = _base_class(model)
        cfg = dict(model.config)
        cfg["_class_name"] = base.__name__
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
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


def load_quantized(path_or_repo: str | os.PathLike, device: str | torch.device | None = None, **hub_kwargs):
    """Rebuild a quantized model that computes bit-identically to the one that was saved."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import family_for
    from .models.quantized import mark_quantized
    from .models.timestep_groups import TimestepGroups, install_timestep_groups
    from .models.wrap import set_quant_state, wrap_model
    from .quant.quantizers import has_timestep_aware

    folder = resolve_checkpoint(path_or_repo, **hub_kwargs)
    qcfg = _read_json(folder / CONFIG_NAME)
    if qcfg.get("quant_method") != "gaq":
        raise CheckpointError(f"{folder / CONFIG_NAME}: quant_method is {qcfg.get('quant_method')!r}, not 'gaq'; "
                              "this is not a diffusers-gaq checkpoint")
    if qcfg.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder / CONFIG_NAME}: format version {qcfg['format_version']} is newer than this "
                              f"diffusers-gaq understands ({FORMAT_VERSION}); upgrade diffusers-gaq")
    saved_config = dict(qcfg["config"])
    # Checkpoints from before per-layer precision quantized the first and last layers like the rest.
    saved_config.setdefault("first_last_precision", "same")
    config = GradientAlignedQuantizer.from_dict(saved_config)
    model_cfg = _read_json(folder / MODEL_CONFIG_NAME)
    import diffusers

    base_name = qcfg.get("base_class", model_cfg.get("_class_name"))
    base = getattr(diffusers, base_name, None)
    if base is None:
        raise CheckpointError(f"{folder / CONFIG_NAME}: unknown base class {base_name!r}")
    model = base.from_config(model_cfg)
    if type(model) is not base:
        # from_config remaps some legacy classes (Transformer2DModel with ada_norm_zero -> DiTTransformer2DModel);
        # the checkpoint's layer table is the saved class's, so build exactly that one.
        init_kwargs, _, _ = base.extract_init_dict(model_cfg)
        model = base(**init_kwargs)
    model = model.eval().requires_grad_(False)
    family = family_for(model)
    wrap = wrap_model(model, config, family)
    wrap.kept_fp = list(qcfg.get("kept_fp", wrap.kept_fp))

    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} cannot be read ({e}); the file is truncated or corrupt") from None

    _restore_quantizers(model, state, qcfg.get("layers", {}), config.weight_granularity == "per_channel", weights_path)
    # Buffers that are None until calibration (AdaRound's floor) are not in a frozen model.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise CheckpointError(f"{weights_path}: unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    if missing:
        raise CheckpointError(f"{weights_path}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    report = None
    if (folder / REPORT_TENSORS).is_file():
        from .calibration.report_io import report_from_files

        report = report_from_files(folder / REPORT_TENSORS, folder / REPORT_JSON)
    if has_timestep_aware(model):
        if "timestep_groups" not in qcfg:
            raise CheckpointError(f"{folder / CONFIG_NAME}: the model has timestep-aware activation quantizers but "
                                  "no 'timestep_groups' entry; the file is incomplete")
        install_timestep_groups(model, TimestepGroups.from_dict(qcfg["timestep_groups"]))
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
    non-empty target is refused unless ``overwrite``."""
    from .models import denoiser_of

    _, component, _ = denoiser_of(pipe)
    target = Path(save_directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"output folder {target} exists and is not empty; pass overwrite=True "
                              "(CLI: --overwrite) or choose another folder")
    with atomic_directory(target) as tmp:
        pipe.save_pretrained(tmp)
        for item in (tmp / component).iterdir():
            if item.suffix in (".md", ".png"):
                shutil.copy2(item, tmp / item.name)
    return target


def _public_base_model(name_or_path):
    from .hub import public_base_model

    return public_base_model(name_or_path)
