"""Building blocks that several test files share: the tiny calibration budget, the small UNets and
the pipelines built from them.

They are plain constants and functions (not only fixtures) because some tests need them at import
time, in ``parametrize`` lists and module-level tables; tests/conftest.py makes fixtures of them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import MappingProxyType

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from safetensors import safe_open

from diffusers_gaq import GradientAlignedQuantizer
from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG, REFERENCE_UNET_CONFIG

# The smallest calibration budget that still runs every stage: sampling, meta-learned sample weights,
# reconstruction. Read-only, because session-scoped fixtures hand the same object to every test.
TINY_BUDGET = MappingProxyType(dict(
    num_inference_steps=4, num_calibration_timesteps=2, samples_per_timestep=4, num_groups=2, val_fraction=0.25,
    calibration_batch_size=8, recon_iters=1, recon_batch_size=8, meta_iters=1, meta_batch_size=8,
    weighting="gradient_aligned"))  # not the default: the tests run every stage, the meta step included

# The tiny budget as the resume / checkpoint / reliability tests run it: two reconstruction steps, and
# conv_in quantized too (the tampering tests edit its entry).
RELIABILITY_BUDGET = MappingProxyType(dict(TINY_BUDGET, recon_iters=2, first_last_precision="same"))

# The reference UNet (32x32, one channel) with one resnet per level instead of two: the same block
# types, fewer units to calibrate.
SMALL_UNET_CONFIG = MappingProxyType(dict(REFERENCE_UNET_CONFIG, layers_per_block=1))

# The reference UNet's block types (attention, skip concatenation, time embedding) at a size that
# calibrates in about 2 s: 16x16 samples, 17 reconstruction units.
TINY_UNET_CONFIG = MappingProxyType(dict(
    REFERENCE_UNET_CONFIG, sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")))


def fp_unet(config=SMALL_UNET_CONFIG, seed: int = 0, **changes) -> UNet2DModel:
    """A full-precision UNet with random weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return UNet2DModel(**dict(config, **changes)).eval()


def fp_pipeline(config=SMALL_UNET_CONFIG, seed: int = 0, **changes) -> DDIMPipeline:
    """``fp_unet(...)`` in a DDIM pipeline with the reference scheduler."""
    return DDIMPipeline(unet=fp_unet(config, seed, **changes), scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))


def tiny_pipeline(seed: int = 0, **unet_changes) -> DDIMPipeline:
    """A DDIM pipeline of TINY_UNET_CONFIG (seed 0 is conftest's tiny_pipe), for tests that change it."""
    return fp_pipeline(TINY_UNET_CONFIG, seed, **unet_changes)


def reliability_config(**changes) -> GradientAlignedQuantizer:
    """A GradientAlignedQuantizer on RELIABILITY_BUDGET, with ``changes``."""
    return GradientAlignedQuantizer(**dict(RELIABILITY_BUDGET, **changes))


def same_tensors(a: dict, b: dict) -> bool:
    """The same keys, and for each the same dtype and the same values bit for bit."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to show that nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (POSIX relative path) with the sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_manifest(path: Path) -> dict:
    """The diffusers-gaq manifest in a calibration checkpoint file's safetensors metadata."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["gaq_calibration_checkpoint"])
