"""``quantize_pipeline``: one call from a diffusers pipeline to a quantized one."""

from __future__ import annotations

import copy
import logging
import time

import torch

from .calibration.calibrate import calibrate_model
from .calibration.data import CalibrationData, collect_calibration_data
from .config import GradientAlignedQuantizer
from .distributed import detect, unit_sync_check
from .models import family_for
from .models.quantized import mark_quantized
from .models.wrap import set_quant_state, wrap_model
from .utils import resolve_device

logger = logging.getLogger(__name__)


def supported_pipelines() -> tuple[type, ...]:
    from diffusers import DDIMPipeline, DDPMPipeline

    return (DDIMPipeline, DDPMPipeline)


def check_pipeline(pipe) -> None:
    """Refuse what cannot be quantized before any work starts."""
    supported = supported_pipelines()
    if not isinstance(pipe, supported):
        names = ", ".join(c.__name__ for c in supported)
        raise TypeError(f"quantize_pipeline got a {type(pipe).__name__}; supported pipelines: {names}")
    family_for(pipe.unet)


def quantize_pipeline(pipe, config: GradientAlignedQuantizer | None = None, *,
                      calibration_data: CalibrationData | None = None, progress: bool = True,
                      record_conflict: bool = False):
    """Quantize ``pipe.unet`` and return a new pipeline of the same class that samples as usual.

    The caller's pipeline is left unchanged: its UNet is copied, the copy's Conv2d / Linear layers
    are swapped for fake-quant wrappers and calibrated on the FP model's own DDIM trajectories
    (or on ``calibration_data``), unit by unit, with the sample weights ``config.weighting`` asks
    for. The returned ``pipeline.unet`` is a ``QuantizedUNet2DModel`` (still a ``UNet2DModel``)
    whose ``gaq_report`` holds per-unit losses, the learned sample weights and timings.
    """
    config = config or GradientAlignedQuantizer()
    config.validate()
    check_pipeline(pipe)
    family = family_for(pipe.unet)
    device = resolve_device(config.device)
    if calibration_data is not None:
        calibration_data.check(pipe.unet.config.in_channels, pipe.unet.config.sample_size)

    # Under `accelerate launch` / torchrun every process runs this same function (DESIGN.md section 7):
    # trajectories and minibatches are split, parameters stay identical, the same pipeline is returned.
    dist = detect()
    if dist is not None:
        dist.check_config(config)
    progress = progress and (dist is None or dist.is_main)

    unet = copy.deepcopy(pipe.unet).to(device).eval().requires_grad_(False)
    t0 = time.perf_counter()
    if calibration_data is None:
        shard = {}
        if dist is not None:
            ids = dist.split_trajectories(config.samples_per_timestep)
            shard = {"trajectory_ids": ids, "gather": dist.trajectory_gatherer(ids)}
        calibration_data = collect_calibration_data(unet, pipe.scheduler.config, family, config, device, progress,
                                                    **shard)
    data_seconds = time.perf_counter() - t0

    wrap = wrap_model(unet, config, family)
    logger.info("wrapped %d layers (%d kept FP, %d split inputs, %d attention cores)", len(wrap.layer_bits),
                len(wrap.kept_fp), len(wrap.split_layers), len(wrap.attention))
    report = calibrate_model(unet, family, calibration_data, config, progress=progress, record_conflict=record_conflict,
                             dist=dist, on_unit_done=unit_sync_check(dist, unet, family))
    report.data_seconds = data_seconds
    set_quant_state(unet, weight=True, act=bool(config.act_bits))
    mark_quantized(unet, config, wrap, report)
    return type(pipe)(unet=unet, scheduler=copy.deepcopy(pipe.scheduler))
