"""``quantize_pipeline``: one call from a diffusers pipeline to a quantized one."""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import torch

from .calibration.calibrate import calibrate_model
from .calibration.data import CalibrationData, collect_calibration_data
from .calibration.store import remove_stale_captures
from .checkpointing import open_checkpoint
from .config import GradientAlignedQuantizer
from .distributed import detect, unit_sync_check
from .hub import public_base_model
from .load_options import check_save_options, push_saved
from .mixed_precision import allocate_by_sensitivity, check_mixed_precision
from .modeling import QuantizationState, mark_quantized, save_quantized_pipeline
from .models import denoiser_of, rebuild_pipeline
from .models import supported_pipelines as _supported_pipelines
from .models.wrap import check_layer_patterns, reconstruction_units, set_quant_state, wrap_model
from .system import resolve_device

logger = logging.getLogger(__name__)


def supported_pipelines() -> tuple[type, ...]:
    return tuple(_supported_pipelines())


def check_pipeline(pipe):
    """Refuse what cannot be quantized before any work starts; returns (family, component name, model)."""
    return denoiser_of(pipe)


def check_finite_weights(model, component: str = "model") -> None:
    """Refuse a model with NaN/Inf weights before sampling: its trajectories would be NaN, and the
    error would then blame the calibration data instead of the model."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(f"the input {component}'s parameter {name} holds NaN/Inf ({bad} of {tensor.numel()} "
                                 "values); the model's weights are damaged: reload or re-download the model")


def quantize_pipeline(pipe, config: GradientAlignedQuantizer | None = None, *,
                      calibration_data: CalibrationData | None = None, progress: bool = True,
                      record_conflict: bool = False, checkpoint_dir: str | os.PathLike | None = None,
                      resume: bool = False, base_model: str | None = None):
    """Quantize the pipeline's denoiser and return a new pipeline of the same class that samples as usual.

    Supported (see ``models/``): DDIMPipeline, DDPMPipeline and LDMPipeline (UNet2DModel),
    ClassConditionalDDIMPipeline (class-conditional UNet2DModel), DiTPipeline
    (DiTTransformer2DModel / Transformer2DModel, the ``transformer``), StableDiffusionPipeline
    (UNet2DConditionModel) and StableDiffusionXLPipeline (UNet2DConditionModel with text_time
    added conditioning). Only the denoiser is quantized: text encoders and VAEs stay in full
    precision and are shared with the returned pipeline.

    The caller's pipeline is left unchanged: its denoiser is copied, the copy's Conv2d / Linear
    layers are swapped for fake-quant wrappers and calibrated on the FP model's own DDIM
    trajectories (or on ``calibration_data``), unit by unit, with the sample weights
    ``config.weighting`` asks for. Conditional models calibrate on trajectories with class labels
    (``config.class_labels``) or prompts (``config.calibration_prompts``) and the pipeline's
    classifier-free guidance (``config.guidance_scale``); each sample's conditioning is kept in
    ``CalibrationData.conditioning``. The returned denoiser is a ``Quantized<Class>`` (still a
    ``<Class>``) whose ``gaq_report`` holds per-unit losses, the learned sample weights and timings.

    ``checkpoint_dir``: save the calibration state there (atomically) once the calibration data is
    collected and after every finished unit; ``resume=True`` continues from it, and the result is
    bit-identical to an uninterrupted run. A checkpoint of another config or model is refused.
    Everything that can be checked (config, pipeline, device, data, checkpoint) is checked before
    any sampling. See docs/reliability.md.

    ``config.average_weight_bits``: a budget of bits per quantized weight, allocated after the
    calibration data is collected by a weight-only sensitivity analysis on that data
    (mixed_precision.py); the returned model's config holds the allocation as exact layer_precision
    entries and lists them in ``allocated_layers``.

    ``base_model``: where the FP model came from (a Hub id), for the model card and
    quantization_config.json; by default the pipeline's ``name_or_path``. Only its publishable
    form is recorded (hub.public_base_model: a Hub id, "reference", or a folder's name).
    """
    config = config or GradientAlignedQuantizer()
    config.validate()
    family, component, fp_model = check_pipeline(pipe)  # the denoiser is found here, once
    check_layer_patterns(fp_model, config, family)  # a mistyped pattern is refused before any sampling
    check_finite_weights(fp_model, component)
    check_mixed_precision(fp_model, config, family)  # a budget the explicit entries exceed, before sampling
    device = resolve_device(config.device)
    if calibration_data is not None:
        calibration_data.check(*_channels_and_size(family, fp_model))
    else:
        check_calibration_data_fits(config, family, fp_model)
    # Under `accelerate launch` / torchrun every process runs this same function (DESIGN.md section 7):
    # trajectories and minibatches are split, parameters stay identical, the same pipeline is returned.
    dist = detect()
    if dist is not None:
        dist.check_config(config)
    progress = progress and (dist is None or dist.is_main)
    # A foreign, corrupt or unwanted checkpoint is refused here, before any work.
    checkpoint, resumed = open_checkpoint(checkpoint_dir, resume, family, fp_model, pipe.scheduler.config, config,
                                          calibration_data, dist)
    remove_stale_captures()  # disk-backed captures of runs killed before they could delete them

    try:  # the checkpoint folder's lock is given back however the run ends (errors, Ctrl-C, SIGTERM)
        model = copy.deepcopy(fp_model).to(device).eval().requires_grad_(False)
        t0 = time.perf_counter()
        calibration_data = calibration_data if calibration_data is not None else resumed.data
        if calibration_data is None:
            # Prompts are encoded / labels checked here, before the (long) trajectory sampling.
            conditioning = family.calibration_conditioning(pipe, model, config, device)
            shard = {}
            if dist is not None:
                ids = dist.split_trajectories(config.samples_per_timestep, config.calibration_batch_size)
                shard = {"trajectory_ids": ids, "gather": dist.trajectory_gatherer(ids)}
            calibration_data = collect_calibration_data(model, pipe.scheduler.config, family, config, device,
                                                        progress, conditioning=conditioning, **shard)
        data_seconds = resumed.data_seconds if resumed.data is not None else time.perf_counter() - t0
        if checkpoint is not None and resumed.data is None:
            checkpoint.save_data(calibration_data, data_seconds)

        # The budget's allocation becomes explicit layer_precision entries, so the saved config needs no re-analysis.
        config = allocate_by_sensitivity(pipe, config, calibration_data, progress=progress)
        wrap = wrap_model(model, config, family)
        logger.info("wrapped %d layers (%d kept FP, %d split inputs, %d attention cores)", len(wrap.layer_bits),
                    len(wrap.kept_fp), len(wrap.split_layers), len(wrap.attention))
        units = reconstruction_units(model, family)  # listed here, once, for calibration and its hooks
        resumed.restore(model, units)  # the finished units' state; nothing when starting fresh
        hooks = [hook for hook in (unit_sync_check(dist, units),
                                   checkpoint.unit_hook(model, units, resumed) if checkpoint is not None else None)
                 if hook is not None]
        report = calibrate_model(model, family, calibration_data, config, units=units, progress=progress,
                                 record_conflict=record_conflict, dist=dist, start=resumed, hooks=hooks)
        resumed.merge_into(report)
        report.data_seconds = data_seconds
        report.data_digest = calibration_data.digest()
    finally:
        if checkpoint is not None:
            checkpoint.release()
    set_quant_state(model, weight=True, act=config.quantizes_activations)
    mark_quantized(model, QuantizationState(config, wrap, report, base_model=public_base_model(base_model) or _public_origin(pipe, fp_model)))
    if model.config.get("_name_or_path"):  # config.json would otherwise carry the absolute path too
        model.register_to_config(_name_or_path=public_base_model(model.config["_name_or_path"]))
    return bind_pipeline_save(rebuild_pipeline(pipe, component, model))


def bind_pipeline_save(pipe):
    """Give this pipeline instance the quantized pipeline save as its ``save_pretrained``: atomic, the
    card at the top too, ``push_to_hub=True`` uploading exactly the saved folder. Returns ``pipe``."""
    def save_pretrained(save_directory, *, push_to_hub: bool = False, repo_id: str | None = None,
                        variant: str | None = None, overwrite: bool = True, **kwargs):
        check_save_options(variant, kwargs)
        target = save_quantized_pipeline(pipe, save_directory, overwrite=overwrite)
        if push_to_hub:
            push_saved(target, repo_id, kwargs)
        return target

    pipe.save_pretrained = save_pretrained
    return pipe


def _public_origin(pipe, fp_model) -> str | None:
    """Where the FP model came from, as may be published: the Hub id, "reference", or only the
    folder's name (hub.public_base_model). The model card, quantization_config.json and `evaluate`
    read it."""
    return public_base_model(getattr(pipe, "name_or_path", None) or getattr(fp_model.config, "_name_or_path", None))


def check_calibration_data_fits(config, family, fp_model) -> None:
    """Refuse, before sampling, calibration data larger than this machine's memory: the samples alone
    (num_calibration_timesteps x samples_per_timestep float32 inputs) must fit."""
    c, h, w = family.sample_shape(fp_model)
    count = config.num_calibration_timesteps * config.samples_per_timestep
    need = count * c * h * w * 4
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total:
        raise ValueError(f"samples_per_timestep={config.samples_per_timestep} x num_calibration_timesteps="
                         f"{config.num_calibration_timesteps} calibration samples of {c}x{h}x{w} need at least "
                         f"{need / 2**30:.1f} GiB, more than this machine's {total / 2**30:.1f} GiB of memory; "
                         "lower samples_per_timestep")


def _channels_and_size(family, model) -> tuple[int, tuple[int, int]]:
    c, h, w = family.sample_shape(model)
    return c, (h, w)
