"""Resumable calibration: the calibration state on disk, saved after every finished unit.

A checkpoint folder (``quantize_pipeline(..., checkpoint_dir=...)``, CLI ``--checkpoint-dir``)
holds two files, each written atomically (temporary file, fsync, rename: files.atomic_path), so
a crash at any moment leaves the previous complete file, or none:

    calibration_data.safetensors    the calibration set, written once, right after it is collected
    calibration_state.safetensors   rewritten after every finished reconstruction unit: the wrapped
                                    model's whole state (finished units hold their integer codes and
                                    learned step sizes, the others their defaults), the sample
                                    scores and the per-unit reports

Each file carries a manifest (JSON in its safetensors metadata) with

- the *fingerprint* of the run: the quantization config (every field but ``device``), the base
  model's class, config and a digest of each of its tensors, the scheduler config (it shapes the
  sampled calibration data) or the digest of calibration data the caller gave;
- a digest of the file's own tensors, so that a corrupt or edited file is refused, not used.

Resuming (``resume=True`` / ``--resume``) refuses a checkpoint whose fingerprint differs from the
current run and says what differs (config fields, model config keys, tensors). Calibration draws
its random numbers from per-unit generators seeded from the config (calibrate.py) and the state
is restored bit-exactly, so a resumed run writes the same quantized weights, byte for byte, as an
uninterrupted one. Only the main process writes (distributed.py); every process reads.

One run at a time: the main process holds ``calibration.lock`` in the folder while it works
(lock.py); a second run is refused with the first one's pid and host.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..calibration.data import CalibrationData
from ..config import GradientAlignedQuantizer
from ..files import check_room
from ..models import family_for
from .fingerprint import config_fingerprint, describe_mismatch, run_fingerprint
from .lock import LOCK_NAME, CheckpointInUseError, CheckpointLock, check_not_locked
from .state import DATA_NAME, STATE_NAME, CalibrationCheckpoint, CheckpointMismatchError, ResumePoint


# ---- the folder, before any work ---------------------------------------------------------------
def has_checkpoint(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / DATA_NAME).exists() or (d / STATE_NAME).exists()


def check_checkpoint_dir(directory: str | os.PathLike | None, resume: bool, need_bytes: int = 0,
                         check_lock: bool = True) -> None:
    """Refuse, before any work, what cannot end well: ``resume`` without a folder, a folder that is
    a file or cannot be written, a folder another live run holds (``check_lock``: only the main
    process of a multi-process run asks, the others see its lock), an existing checkpoint that
    would be overwritten without ``resume``, too little free space for ``need_bytes``."""
    if directory is None:
        if resume:
            raise ValueError("resume=True needs checkpoint_dir= (CLI: --resume needs --checkpoint-dir) to resume from")
        return
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"checkpoint folder {d} is a file; choose a folder")
    if check_lock:
        check_not_locked(d)
    if has_checkpoint(d) and not resume:
        raise FileExistsError(f"{d} already holds a calibration checkpoint; pass resume=True (CLI: --resume) to "
                              "continue it, or delete it / choose another folder to start over")
    try:  # a folder under a file used to pass here and fail only when the data was saved
        check_room(d, need_bytes, "the calibration checkpoint")
    except (NotADirectoryError, PermissionError) as e:
        raise type(e)(f"checkpoint folder {d}: {e}") from None


def estimated_checkpoint_bytes(model, config: GradientAlignedQuantizer, family=None) -> int:
    """Room the checkpoint needs: the state file twice (the old one stays until the new one is
    whole) at about 1.5x the model (FP weights plus codes and quantizer state), plus the data
    (counted with two conditioning branches, classifier-free guidance's upper bound)."""
    family = family or family_for(model)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    c, h, w = family.sample_shape(model)
    per_sample = c * h * w * 4 + family.conditioning_bytes_per_sample(model)
    data = 2 * config.num_calibration_timesteps * config.samples_per_timestep * per_sample
    return int(3 * weights + data) + 16 * 2**20


def open_checkpoint(directory: str | os.PathLike | None, resume: bool, family, model, scheduler_config,
                    config: GradientAlignedQuantizer, calibration_data: CalibrationData | None = None, dist=None
                    ) -> tuple[CalibrationCheckpoint | None, ResumePoint]:
    """quantize_pipeline's entry point: check the folder and, when resuming, read and verify the
    checkpoint, all before any sampling. ``model``: the FP denoiser (``family`` its family);
    ``dist``: the process group of a multi-process run (only its main process writes). Returns
    (checkpoint or None, where to start); the caller calls ``checkpoint.release()`` when the run ends,
    however it ends."""
    need = estimated_checkpoint_bytes(model, config, family) if directory else 0
    main = dist is None or dist.is_main
    check_checkpoint_dir(directory, resume, need, check_lock=main)
    if directory is None:
        return None, ResumePoint()
    lock = CheckpointLock(directory).acquire() if main else None
    try:
        if lock is not None:  # a run that started beside this one may have written the folder meanwhile
            check_checkpoint_dir(directory, resume, check_lock=False)
        checkpoint = CalibrationCheckpoint(directory, run_fingerprint(model, scheduler_config, config,
                                                                      calibration_data), dist=dist, lock=lock)
        return checkpoint, checkpoint.load() if resume else ResumePoint()
    except BaseException:
        if lock is not None:
            lock.release()
        raise


__all__ = ["CalibrationCheckpoint", "CheckpointInUseError", "CheckpointLock", "CheckpointMismatchError", "LOCK_NAME",
           "ResumePoint", "DATA_NAME", "STATE_NAME", "check_checkpoint_dir", "check_not_locked", "config_fingerprint", "describe_mismatch", "estimated_checkpoint_bytes",
           "has_checkpoint", "open_checkpoint", "run_fingerprint"]
