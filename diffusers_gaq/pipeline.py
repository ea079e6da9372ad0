"""``quantize_pipeline``: one call from a diffusers pipeline to a quantized one."""

from __future__ import annotations

import copy
import logging
import os
import time


from .calibration.calibrate import calibrate_model
from .calibration.data import CalibrationData, collect_calibration_data
from .checkpointing import open_checkpoint
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
                      record_conflict: bool = False, checkpoint_dir: str | os.PathLike | None = None,
                      resume: bool = False):
    """Quantize ``pipe.unet`` and return a new pipeline of the same class that samples as usual.

    The caller's pipeline is left unchanged: its UNet is copied, the copy's Conv2d / Linear layers
    are swapped for fake-quant wrappers and calibrated on the FP model's own DDIM trajectories
    (or on ``calibration_data``), unit by unit, with the sample weights ``config.weighting`` asks
    for. The returned ``pipeline.unet`` is a ``QuantizedUNet2DModel`` (still a ``UNet2DModel``)
    whose ``gaq_report`` holds per-unit losses, the learned sample weights and timings.

    ``checkpoint_dir``: save the calibration state there (atomically) once the calibration data is
    collected and after every finished unit; ``resume=True`` continues from it, and the result is
    bit-identical to an uninterrupted run. A checkpoint of another config or model is refused.
    Everything that can be checked (config, pipeline, device, data, checkpoint) is checked before
    any sampling. See docs/reliability.md.
    """
    config = config or GradientAlignedQuantizer()
    config.validate()
    check_pipeline(pipe)
    family = family_for(pipe.unet)
    device = resolve_device(config.device)
    if calibration_data is not None:
        calibration_data.check(pipe.unet.config.in_channels, pipe.unet.config.sample_size)
    # A foreign, corrupt or unwanted checkpoint is refused here, before any work.
    checkpoint, resumed = open_checkpoint(checkpoint_dir, resume, pipe, config, calibration_data)

    # Under `accelerate launch` / torchrun every process runs this same function (DESIGN.md section 7):
    # trajectories and minibatches are split, parameters stay identical, the same pipeline is returned.
    dist = detect()
    if dist is not None:
        dist.check_config(config)
    progress = progress and (dist is None or dist.is_main)

    unet = copy.deepcopy(pipe.unet).to(device).eval().requires_grad_(False)
    t0 = time.perf_counter()
    calibration_data = calibration_data if calibration_data is not None else resumed.data
    if calibration_data is None:
        shard = {}
        if dist is not None:
            ids = dist.split_trajectories(config.samples_per_timestep, config.calibration_batch_size)
            shard = {"trajectory_ids": ids, "gather": dist.trajectory_gatherer(ids)}
        calibration_data = collect_calibration_data(unet, pipe.scheduler.config, family, config, device, progress,
                                                    **shard)
    data_seconds = resumed.data_seconds if resumed.data is not None else time.perf_counter() - t0
    if checkpoint is not None and resumed.data is None:
        checkpoint.save_data(calibration_data, data_seconds)

    wrap = wrap_model(unet, config, family)
    logger.info("wrapped %d layers (%d kept FP, %d split inputs, %d attention cores)", len(wrap.layer_bits),
                len(wrap.kept_fp), len(wrap.split_layers), len(wrap.attention))
    resumed.restore(unet, family)  # the finished units' state; nothing when starting fresh
    on_unit_done = unit_sync_check(dist, unet, family)
    if checkpoint is not None:
        on_unit_done = checkpoint.unit_callback(unet, family, resumed, then=on_unit_done)
    report = calibrate_model(unet, family, calibration_data, config, progress=progress, record_conflict=record_conflict,
                             dist=dist, start_unit=resumed.next_unit, scores=resumed.scores, on_unit_done=on_unit_done)
    resumed.merge_into(report)
    report.data_seconds = data_seconds
    set_quant_state(unet, weight=True, act=bool(config.act_bits))
    mark_quantized(unet, config, wrap, report)
    # Where the FP model came from (a Hub id or a folder): the model card and `evaluate` use it.
    unet.gaq_base_model = getattr(pipe, "name_or_path", None) or getattr(pipe.unet.config, "_name_or_path", None)
    return type(pipe)(unet=unet, scheduler=copy.deepcopy(pipe.scheduler))
