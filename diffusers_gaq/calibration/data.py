"""Calibration data: model inputs x_t taken from the full-precision sampling trajectory.

n trajectories are sampled with deterministic DDIM (eta = 0); at S of the K sampling steps
(fixed intervals, or PTQ4DM's normal schedule) the denoiser input is kept with its timestep and
conditioning (the model family says what that is: nothing, class labels, prompt embeddings; with
classifier-free guidance both the conditional and the unconditional input). Each trajectory's
initial noise and conditioning come from its index alone, so the set does not depend on batching
or on how trajectories are split between processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import GradientAlignedQuantizer
from ..digests import tensors_digest
from ..files import atomic_save_safetensors
from ..models.base import CalibrationConditioning

logger = logging.getLogger(__name__)


def calibration_step_positions(config: GradientAlignedQuantizer) -> list[int]:
    """Positions (0 = first, noisiest sampling step) of the S kept steps among K."""
    k, s = config.num_inference_steps, config.num_calibration_timesteps
    if config.timestep_schedule == "uniform":
        return sorted({int(round(p)) for p in np.linspace(0, k - 1, s)})
    # PTQ4DM: calibration timesteps drawn from a normal distribution over the trajectory
    # (centre of the trajectory, std a quarter of it), distinct, clipped to it.
    rng = np.random.default_rng(config.seed)
    chosen: set[int] = set()
    while len(chosen) < s:
        chosen.add(int(np.clip(round(rng.normal(0.5 * (k - 1), 0.25 * k)), 0, k - 1)))
    return sorted(chosen)


def trajectory_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63 - 1)


@dataclass
class CalibrationData:
    """N calibration samples (N = S * B * n: S timesteps, B conditioning branches, n trajectories),
    ordered (step, branch, trajectory). ``conditioning``: the model's conditioning keyword
    arguments (class labels, prompt embeddings), one row per sample."""

    samples: torch.Tensor  # [N, C, H, W] model inputs x_t
    timesteps: torch.Tensor  # [N] model timestep values
    step_index: torch.Tensor  # [N] 0..S-1, in sampling order
    group: torch.Tensor  # [N] 0..T-1, consecutive step groups ("tasks")
    is_val: torch.Tensor  # [N] held-out validation samples (equal count per step)
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def train_indices(self) -> torch.Tensor:
        return torch.nonzero(~self.is_val).flatten()

    @property
    def val_indices(self) -> torch.Tensor:
        return torch.nonzero(self.is_val).flatten()

    @property
    def num_groups(self) -> int:
        return int(self.group.max()) + 1

    def val_groups(self) -> list[torch.Tensor]:
        val = self.val_indices
        return [val[self.group[val] == g] for g in range(self.num_groups)]

    def check(self, in_channels: int | None = None, sample_size: int | None = None) -> None:
        """Shape, consistency and finiteness checks, with messages that say what is wrong."""
        n = len(self.samples)
        if self.samples.dim() != 4:
            raise ValueError(f"calibration samples must be [N, C, H, W], got shape {tuple(self.samples.shape)}")
        for name in ("timesteps", "step_index", "group", "is_val"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise ValueError(f"calibration data field {name} has shape {tuple(t.shape)}, expected ({n},)")
        if in_channels is not None and self.samples.shape[1] != in_channels:
            raise ValueError(f"calibration samples have {self.samples.shape[1]} channels; the model expects {in_channels}")
        if sample_size is not None:
            expected = tuple(sample_size) if isinstance(sample_size, (tuple, list)) else (sample_size, sample_size)
            if tuple(self.samples.shape[2:]) != expected:
                raise ValueError(f"calibration samples are {tuple(self.samples.shape[2:])}; the model expects {expected}")
        for name, value in self.conditioning.items():
            if value.dim() == 0 or len(value) != n:
                raise ValueError(f"calibration conditioning {name!r} has shape {tuple(value.shape)}; expected one row "
                                 f"per sample ({n})")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"calibration conditioning {name!r} holds NaN/Inf; regenerate the calibration data")
        bad = ~torch.isfinite(self.samples).flatten(1).all(1)
        if bad.any():
            raise ValueError(f"calibration data holds NaN/Inf in {int(bad.sum())} of {n} samples "
                             f"(first: {int(torch.nonzero(bad)[0])}); regenerate it with the full-precision pipeline")
        if bool(self.is_val.all()):
            raise ValueError("calibration data holds no training samples (every sample is held out; lower val_fraction)")

    def digest(self) -> str:
        """sha256 of every tensor (samples, timesteps, split, conditioning): equal digests mean the same
        calibration set, which is what pairs two methods' runs of one seed."""
        return tensors_digest(self.to_tensors())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in ("samples", "timesteps", "step_index", "group", "is_val")}
        out.update({f"conditioning.{k}": v for k, v in self.conditioning.items()})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "CalibrationData":
        cond = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("conditioning.")}
        return cls(t["samples"], t["timesteps"], t["step_index"], t["group"], t["is_val"].bool(), cond)

    def save(self, path: str | Path) -> None:
        atomic_save_safetensors(self.to_tensors(), path)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationData":
        from safetensors.torch import load_file

        return cls.from_tensors(load_file(str(path)))


def assign_splits(config: GradientAlignedQuantizer, num_steps: int, n: int):
    """step_index, group and is_val for N = num_steps * n samples."""
    step_index = torch.arange(num_steps).repeat_interleave(n)
    group = step_index * config.num_groups // num_steps
    # Hold out the same trajectories at every step: a seeded choice of val_per_timestep of n.
    gen = torch.Generator().manual_seed(config.seed)
    val_traj = torch.randperm(n, generator=gen)[: config.val_per_timestep]
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val_traj] = True
    return step_index, group, is_val.repeat(num_steps)


def _repeat_over_branches(t: torch.Tensor, s: int, b: int, n: int) -> torch.Tensor:
    """A per-(step, trajectory) tensor [S * n] as per-(step, branch, trajectory) [S * B * n]."""
    return t.reshape(s, 1, n).expand(s, b, n).reshape(-1).contiguous()


def _guided(eps: torch.Tensor, num_branches: int, scale: float | None) -> torch.Tensor:
    """Classifier-free guidance over a batch stacked as [conditional; unconditional]."""
    if num_branches == 1:
        return eps
    cond, uncond = eps.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample_trajectories(unet, scheduler, family, config: GradientAlignedQuantizer, trajectory_ids,
                        positions: list[int], device: torch.device, progress: bool = True,
                        conditioning: CalibrationConditioning | None = None):
    """Run DDIM (eta = 0) for the given trajectories; return [S, len(ids), C, H, W] inputs and [S] timesteps.

    With two conditioning branches every step calls the model on [x; x] with the conditional and
    the unconditional conditioning and steps with the guided prediction, as the pipelines do."""
    conditioning = conditioning or CalibrationConditioning()
    branches = conditioning.num_branches
    scheduler.set_timesteps(config.num_inference_steps)
    timesteps = scheduler.timesteps
    keep = {p: i for i, p in enumerate(positions)}
    c, h, w = family.sample_shape(unet)
    ids = list(trajectory_ids)
    out = torch.empty(len(positions), len(ids), c, h, w)
    bs = config.calibration_batch_size
    batches = range(0, len(ids), bs)
    bar = tqdm(total=len(batches) * len(timesteps), desc="calibration trajectories", disable=not progress, leave=False)
    for start in batches:
        chunk = ids[start : start + bs]
        per_branch = conditioning.for_trajectories(chunk, device)
        cond = {k: torch.cat([b[k] for b in per_branch]) for k in per_branch[0]}
        x = torch.stack([torch.randn(c, h, w, generator=torch.Generator().manual_seed(trajectory_seed(config.seed, j)))
                         for j in chunk]).to(device)
        for pos, t in enumerate(timesteps):
            if pos in keep:
                out[keep[pos], start : start + len(chunk)] = x.cpu()
            model_input = torch.cat([x] * branches)
            eps = family.forward(unet, model_input, t.expand(len(model_input)).to(device), cond)
            x = scheduler.step(_guided(eps, branches, conditioning.guidance_scale), t, x, eta=0.0).prev_sample
            bar.update(1)
            if pos >= positions[-1]:
                bar.update(len(timesteps) - pos - 1)
                break  # later steps are never kept
    bar.close()
    return out, timesteps[positions]


def collect_calibration_data(unet, scheduler_config, family, config: GradientAlignedQuantizer,
                             device: torch.device | None = None, progress: bool = True,
                             trajectory_ids=None, gather=None,
                             conditioning: CalibrationConditioning | None = None) -> CalibrationData:
    """Sample the FP model's DDIM trajectories and keep S steps of n trajectories each.

    ``conditioning`` (from ``family.calibration_conditioning``; default: the family's own, which
    needs no pipeline for unconditional and class-conditional models) gives every trajectory its
    class label or prompt and, with two branches, classifier-free guidance; then every kept x_t is
    a calibration sample once per branch (same x_t, conditional and unconditional inputs), and
    ``data.conditioning`` holds each sample's conditioning. Samples are ordered
    (step, branch, trajectory); a trajectory held out for validation is held out in every branch.

    ``trajectory_ids`` / ``gather`` let several processes each sample a shard and gather the
    result; by default one process samples all n."""
    from diffusers import DDIMScheduler

    device = device or next(unet.parameters()).device
    if conditioning is None:
        conditioning = family.calibration_conditioning(None, unet, config)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    positions = calibration_step_positions(config)
    n = config.samples_per_timestep
    ids = list(range(n)) if trajectory_ids is None else list(trajectory_ids)
    logger.info("calibration data: %d trajectories x %d steps (positions %s of %d), %d conditioning branch(es)", n,
                len(positions), positions, config.num_inference_steps, conditioning.num_branches)
    xs, ts = sample_trajectories(unet, scheduler, family, config, ids, positions, device, progress, conditioning)
    if gather is not None:
        xs = gather(xs)  # [S, n, C, H, W] in trajectory order
    s, b = len(positions), conditioning.num_branches
    step_index, group, is_val = (_repeat_over_branches(t, s, b, n) for t in assign_splits(config, s, n))
    samples = xs[:, None].expand(s, b, *xs.shape[1:]).reshape(s * b * n, *xs.shape[2:]).contiguous()
    per_branch = conditioning.for_trajectories(range(n))
    cond = {}
    for name in per_branch[0]:
        table = torch.stack([branch[name] for branch in per_branch])  # [b, n, ...]
        cond[name] = table.repeat(s, *([1] * (table.dim() - 1))).reshape(s * b * n, *table.shape[2:]).contiguous()
    data = CalibrationData(samples, ts.long().repeat_interleave(b * n), step_index, group, is_val, cond)
    data.check()
    return data
