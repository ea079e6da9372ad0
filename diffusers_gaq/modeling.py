"""The quantized model classes, and where save, card and push meet.

``QuantizedUNet2DModel`` (likewise ``QuantizedUNet2DConditionModel``, ``QuantizedDiTTransformer2DModel``,
``QuantizedTransformer2DModel``) is the diffusers class plus the quantization state. A calibrated
model's ``__class__`` is switched to it (``mark_quantized``), so it stays a ``UNet2DModel`` for
pipelines and schedulers (``unet(x, t).sample``, ``.config``, ``.dtype``, ``.device``), while
``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` speak the quantized format:
serialization.py writes and reads the files, hub/ writes the card and uploads.

Saved pipelines name these classes in model_index.json as ``["diffusers_gaq.modeling", "<Class>"]``;
diffusers' pipeline loader imports this module, finds the class, and picks its load method by
checking it against the base classes it finds here (``ModelMixin``, imported below for that).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (  # noqa: F401
    DiffusionPipeline,
    DiTTransformer2DModel,
    ModelMixin,
    Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

from . import checkpoint_checks as checks
from . import class_conditional_pipeline, lora
from .config import CONFIG_NAME, GradientAlignedQuantizer
from .checkpoint_source import quantized_components, resolve_checkpoint
from .files import atomic_directory
from .folders import check_new_or_empty, check_replaceable
from .hub import check_repo_id, copy_card_to_pipeline_top, public_base_model, push_quantized, write_model_card
from .load_options import check_save_options, check_torch_dtype, push_saved, refuse_loading_options
from .quantized_forward import HALF_DTYPES, log_float32_compute, quantized_forward
from .models import family_for
from .models.timestep_groups import TimestepGroups, install_timestep_groups
from .models.wrap import WrapReport, set_quant_state, wrap_model
from .quant.quantizers import has_timestep_aware
from .runtime import RuntimeReport, check_runtime, is_integer_runtime, to_integer_runtime
from .serialization import (
    MODEL_CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    build_base_model,
    read_json,
    read_optional_report,
    read_quantization_config,
    read_weights,
    verify_config_files,
    restore_quantizers,
    saved_quantizer_config,
    write_quantized_files,
)
from .system import release_freed_memory

logger = logging.getLogger(__name__)


@dataclass
class QuantizationState:
    """What a quantized model carries besides its modules: the config it was made with, what the
    wrapping did, the calibration report (None after loading a checkpoint saved without one), the
    fidelity numbers of an evaluation (for the model card) and where the FP model came from (as
    may be published: hub.public_base_model)."""

    config: GradientAlignedQuantizer
    wrap: WrapReport | None = None
    report: object | None = None  # calibration.calibrate.CalibrationReport
    evaluation: dict | None = None
    base_model: str | None = None
    runtime: RuntimeReport | None = None  # None: the simulated (fake-quant) model


def _state_field(name: str, doc: str) -> property:
    # The gaq_* attributes are views of model.quantization, kept for the code and tests that read them.
    def get(self):
        return getattr(self.quantization, name) if self.quantization is not None else None

    def set_(self, value):
        setattr(self.quantization, name, value)

    return property(get, set_, doc=doc)


class QuantizedModelMixin:
    """The quantized format's save / load / push on top of a diffusers model class.

    Precision: a quantized model computes in float32 (integer weights, float32 scales and steps, the
    integer kernels' float32 interface), whatever ``torch_dtype`` the pipeline around it uses. It
    takes float16 / bfloat16 inputs, computes in float32 and returns its output in the input's dtype,
    so that it runs inside a half-precision pipeline; ``.to(torch.float16)`` (and ``pipe.to(...)``)
    moves it but keeps its float32 compute, as diffusers does for bitsandbytes models.
    """

    diffusers_base_class: type  # set by each class below; serialization records it
    gaq_groups_in_forward = True  # each class's forward sets the timestep groups (no pre-hook needed)
    quantization: QuantizationState | None = None

    gaq_config = _state_field("config", "GradientAlignedQuantizer the model was quantized with")
    gaq_wrap = _state_field("wrap", "WrapReport: wrapped, kept-FP, split and attention layers")
    gaq_report = _state_field("report", "CalibrationReport, or None after loading")
    gaq_evaluation = _state_field("evaluation", "fidelity numbers for the model card, when an evaluation ran")
    gaq_base_model = _state_field("base_model", "where the FP model came from, as may be published")

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype in HALF_DTYPES:
            log_float32_compute(self, dtype)
            dtype = None
        # nn.Module.to, not diffusers' ModelMixin.to, which refuses any dtype for a quantized model.
        moves = {k: v for k, v in dict(device=device, dtype=dtype, memory_format=memory_format).items()
                 if v is not None}
        return nn.Module.to(self, non_blocking=non_blocking, **moves) if moves else self

    def half(self):
        return self.to(torch.float16)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def float(self):
        return self

    def save_pretrained(self, save_directory, *, overwrite: bool = False, push_to_hub: bool = False,
                        repo_id: str | None = None, variant: str | None = None, **kwargs):
        model_card = kwargs.pop("model_card", True)
        check_save_options(variant, kwargs)
        target = save_quantized(self, save_directory, overwrite=overwrite, model_card=model_card)
        if push_to_hub:
            push_saved(target, repo_id, kwargs)
        return target

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, runtime: str = "auto", subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs):
        """Load a diffusers-gaq checkpoint (folder or Hub repo id) for inference.

        ``runtime="auto"`` (the default) gives the fastest form that reproduces the simulated model on
        the device: int8 weights on oneDNN's integer kernels on x86 CPUs, int8 weights dequantized per
        call elsewhere; ``"onednn"`` / ``"dequantize"`` ask for one; ``"simulated"`` loads the fake-quant
        model calibration uses (float weights, bit-identical to the saved one; needed to save it again,
        push it or export it). ``subfolder`` names a pipeline's component (a pipeline folder or repo
        given without it loads its one quantized component). ``torch_dtype`` float16 / bfloat16 is
        accepted for pipelines whose other components run in half precision: the quantized model keeps
        computing in float32 and converts its inputs and outputs (see ``to``). Hub options (revision,
        token, cache_dir, local_files_only, force_download, endpoint) go to huggingface_hub. Options
        that cannot apply to a quantized model are refused: ``quantization_config`` (quantize with
        ``quantize_pipeline``), ``device_map``, ``variant``."""
        refuse_loading_options(kwargs)
        check_torch_dtype(torch_dtype)
        hub_options = ("revision", "token", "cache_dir", "local_files_only", "force_download", "endpoint")
        hub = {k: kwargs[k] for k in hub_options if kwargs.get(k) is not None}
        return load_quantized(pretrained_model_name_or_path, device=kwargs.get("device"), runtime=runtime,
                              subfolder=subfolder, **hub)

    def push_to_hub(self, repo_id: str, **kwargs):
        _require_simulated(self, "push")
        lora.refuse_if_adapted(self, "push")
        return push_quantized(self, repo_id, **kwargs)

    # LoRA (lora/): diffusers' adapter calls, with the adapter beside the quantized layers.
    def load_lora_adapter(self, *args, **kwargs):
        lora.install()
        return super().load_lora_adapter(*args, **kwargs)

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        lora.install()
        # Checked before diffusers marks the model as adapted, so a refusal leaves it as it was.
        lora.check_config_targets(self, adapter_config)
        return super().add_adapter(adapter_config, adapter_name)

    def fuse_lora(self, *args, **kwargs):
        lora.refuse_fuse()


class QuantizedUNet2DModel(QuantizedModelMixin, UNet2DModel):
    diffusers_base_class = UNet2DModel
    forward = quantized_forward(UNet2DModel.forward)


class QuantizedUNet2DConditionModel(QuantizedModelMixin, UNet2DConditionModel):
    diffusers_base_class = UNet2DConditionModel
    forward = quantized_forward(UNet2DConditionModel.forward)


class QuantizedDiTTransformer2DModel(QuantizedModelMixin, DiTTransformer2DModel):
    diffusers_base_class = DiTTransformer2DModel
    forward = quantized_forward(DiTTransformer2DModel.forward)


class QuantizedTransformer2DModel(QuantizedModelMixin, Transformer2DModel):
    diffusers_base_class = Transformer2DModel
    forward = quantized_forward(Transformer2DModel.forward)


QUANTIZED_CLASSES = {cls.diffusers_base_class: cls for cls in (
    QuantizedUNet2DModel, QuantizedUNet2DConditionModel, QuantizedDiTTransformer2DModel, QuantizedTransformer2DModel)}


def quantized_class(base: type) -> type:
    """The Quantized* class of a diffusers model class."""
    try:
        return QUANTIZED_CLASSES[base]
    except KeyError:
        raise TypeError(f"no quantized class for {base.__name__}; supported: "
                        f"{', '.join(c.__name__ for c in QUANTIZED_CLASSES)}") from None


def mark_quantized(model: nn.Module, state: QuantizationState) -> nn.Module:
    """Make a wrapped, calibrated model a Quantized* model carrying ``state``."""
    if not isinstance(model, QuantizedModelMixin):
        model.__class__ = quantized_class(type(model))
    model.quantization = state
    return model



# ---- save ----------------------------------------------------------------------------------------
def save_quantized(model, save_directory: str | os.PathLike, *, overwrite: bool = False,
                   model_card: bool = True, **_ignored) -> Path:
    """Write the checkpoint folder atomically: it is built beside the target and renamed into place,
    so an interrupted save leaves the previous folder (or none). An existing folder is replaced
    only when it is empty or holds nothing but an earlier quantized save (check_replaceable)."""
    target = Path(save_directory)
    # Like diffusers' save_pretrained, a save replaces an earlier save; unlike it, never other files
    # (overwrite=True allows no more than that: it is accepted for symmetry with the pipeline save).
    check_replaceable(target, pipeline=False)
    _require_simulated(model, "save")
    lora.refuse_if_adapted(model, "save")
    state = model.quantization
    with atomic_directory(target) as tmp:
        write_quantized_files(model, tmp, config=state.config, wrap=state.wrap, report=state.report,
                              base_model=public_base_model(state.base_model),  # uploaded by push: no local path
                              timestep_groups=getattr(model, "gaq_timestep_groups", None))
        if model_card:
            write_model_card(model, tmp)
    logger.info("saved quantized model to %s", target)
    return target


def save_quantized_pipeline(pipe, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a whole pipeline whose denoiser is quantized (model_index.json, scheduler/, unet/ or
    transformer/ in the quantized format, the other components as diffusers saves them, the model
    card also at the top), atomically: built beside the target, then renamed into place. A
    non-empty target is refused unless ``overwrite``, and even then unless it holds nothing but an
    earlier quantized pipeline save (check_replaceable)."""
    component = next((name for name, value in pipe.components.items() if isinstance(value, QuantizedModelMixin)), None)
    if component is None:
        raise TypeError(f"the {type(pipe).__name__} holds no quantized denoiser; quantize it with quantize_pipeline() "
                        "first, or save an FP pipeline with its own save_pretrained")
    _require_simulated(pipe.components[component], "save")
    lora.refuse_if_adapted(pipe.components[component], "save")
    target = Path(save_directory)
    if not overwrite:
        check_new_or_empty(target)
    check_replaceable(target, pipeline=True)  # overwrite=True replaces an earlier save of ours, nothing else
    with atomic_directory(target) as tmp:
        type(pipe).save_pretrained(pipe, tmp)  # the class's save: the instance's may be bind_pipeline_save's
        copy_card_to_pipeline_top(tmp / component, tmp)
    return target


# ---- load ----------------------------------------------------------------------------------------
def load_quantized(path_or_repo: str | os.PathLike, device: str | torch.device | None = None,
                   runtime: str = "auto", subfolder: str | None = None, **hub_kwargs):
    """Rebuild a saved quantized model. ``runtime="simulated"`` gives the fake-quant model, computing
    bit-identically to the one that was saved; any other runtime converts it to the integer runtime
    (runtime/; see ``QuantizedModelMixin.from_pretrained``). Everything read is verified
    (checkpoint_checks.py); a checkpoint that disagrees with itself raises CheckpointError."""
    check_runtime(runtime)
    folder = resolve_checkpoint(path_or_repo, subfolder, **hub_kwargs)
    qcfg = read_quantization_config(folder)
    config = saved_quantizer_config(qcfg, folder / CONFIG_NAME)
    model = build_base_model(qcfg, folder)
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
    # After the checks above, whose messages name the field: this one catches consistent edits too.
    verify_config_files(folder, qcfg)

    weights_path = folder / WEIGHTS_NAME
    state = read_weights(weights_path, qcfg)
    restore_quantizers(model, state, table, config.weight_granularity == "per_channel", weights_path)
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
    del state  # it holds the float weights too: the integer runtime below drops them
    report = read_optional_report(folder)
    if has_timestep_aware(model):
        if "timestep_groups" not in qcfg:
            raise CheckpointError(f"{folder / CONFIG_NAME}: the model has timestep-aware activation quantizers but "
                                  "no 'timestep_groups' entry; the file is incomplete")
        groups = qcfg["timestep_groups"]
        checks.verify_timestep_groups_fit(groups["groups"], config.num_act_timestep_groups, folder / CONFIG_NAME)
        install_timestep_groups(model, TimestepGroups.from_dict(groups))
    set_quant_state(model, weight=True, act=config.quantizes_activations)
    mark_quantized(model, QuantizationState(config, wrap, report, base_model=qcfg.get("base_model")))
    if device is not None:
        model.to(device)
    if runtime != "simulated":
        model.quantization.runtime = to_integer_runtime(model, runtime)
        release_freed_memory()  # the float weights just dropped
    return model


def _require_simulated(model, action: str) -> None:
    if is_integer_runtime(model):
        raise ValueError(f"cannot {action} a model loaded on the integer runtime: it holds the integer weights in the "
                         "kernels' layout only. Load it with runtime='simulated' (Quantized<Class>.from_pretrained(path, "
                         "runtime='simulated')) to save, push or export it")


def load_quantized_pipeline(path_or_repo: str | os.PathLike, *, runtime: str = "auto", **kwargs):
    """Reload a pipeline saved with ``pipeline.save_pretrained`` (its denoiser quantized): the same
    as ``DiffusionPipeline.from_pretrained(path)``, which finds ``diffusers_gaq``'s quantized class
    (``QuantizedUNet2DModel``, ``QuantizedDiTTransformer2DModel``, ...) through model_index.json and
    loads the denoiser on the integer runtime. ``runtime`` picks the denoiser's form (see
    ``QuantizedModelMixin.from_pretrained``). A pipeline class diffusers does not ship
    (``ClassConditionalDDIMPipeline``) is looked up here."""
    check_runtime(runtime)
    refuse_loading_options({k: kwargs.get(k) for k in ("quantization_config", "device_map")})
    folder = Path(path_or_repo)
    if not folder.is_dir():
        if folder.exists():
            raise CheckpointError(f"{folder} is a file; pass the saved pipeline's folder")
        # diffusers' own download (model_index.json, then each component's files), then a local load.
        hub = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "force_download") if k in kwargs}
        folder = Path(DiffusionPipeline.download(check_repo_id(str(path_or_repo)), **hub))
    kwargs.setdefault("local_files_only", True)
    index = folder / "model_index.json"
    pipeline_class = DiffusionPipeline
    if index.is_file():
        entries = read_json(index)
        # diffusers resolves `_class_name` in its own namespace only.
        pipeline_class = getattr(class_conditional_pipeline, entries.get("_class_name", ""), DiffusionPipeline)
        if runtime != "auto":  # diffusers' loader calls from_pretrained without it: load the denoiser here
            for name in quantized_components(entries):
                if name not in kwargs:
                    kwargs[name] = load_quantized(folder / name, device=kwargs.get("device"), runtime=runtime)
    return pipeline_class.from_pretrained(str(folder), **kwargs)
