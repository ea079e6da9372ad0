"""Timestep groups of timestep-aware activation quantizers, picked from the timestep the denoiser
is called with.

Calibration keeps x_t at S timesteps; a timestep-aware quantizer (quant/quantizers.py) holds one
step size per group of consecutive calibration timesteps. At sampling time a forward pre-hook on
the denoiser reads its ``timestep`` argument and gives every sample the group of the nearest
calibrated timestep, so schedulers with other timesteps (DPM-Solver, more or fewer steps) work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant.quantizers import has_timestep_aware, set_group_index


@dataclass
class TimestepGroups:
    """The calibrated model timesteps and the group each belongs to."""

    timesteps: list[int]
    groups: list[int]

    def __post_init__(self):
        if len(self.timesteps) != len(self.groups) or not self.timesteps:
            raise ValueError("TimestepGroups needs one group per calibrated timestep (and at least one)")

    @property
    def num_groups(self) -> int:
        return max(self.groups) + 1

    def lookup(self, timestep: torch.Tensor) -> torch.Tensor:
        """Group of every timestep: that of the nearest calibrated timestep (ties: the larger one)."""
        t = torch.as_tensor(timestep).detach().float().reshape(-1, 1).cpu()
        calibrated = torch.tensor(self.timesteps, dtype=torch.float32)
        # argmin takes the first minimum; calibrated timesteps are descending, so a tie goes to the larger.
        nearest = (t - calibrated).abs().argmin(dim=1)
        return torch.tensor(self.groups, dtype=torch.long)[nearest]

    def to_dict(self) -> dict:
        return {"timesteps": list(self.timesteps), "groups": list(self.groups)}

    @classmethod
    def from_dict(cls, d: dict) -> "TimestepGroups":
        return cls([int(t) for t in d["timesteps"]], [int(g) for g in d["groups"]])


def sample_groups(step_index: torch.Tensor, num_steps: int, num_groups: int) -> torch.Tensor:
    """Group of a calibration sample from its step index: consecutive steps share a group."""
    return step_index.long() * num_groups // num_steps


def sample_groups_of(data, num_groups: int) -> torch.Tensor:
    """The timestep group of every sample of a CalibrationData."""
    return sample_groups(data.step_index, int(data.step_index.max()) + 1, num_groups)


def groups_from_data(data, num_groups: int) -> TimestepGroups:
    """The calibrated timesteps of ``data`` (sampling order) split into ``num_groups`` consecutive groups."""
    steps = int(data.step_index.max()) + 1
    if num_groups > steps:
        raise ValueError(f"{num_groups} activation timestep groups need at least as many calibration timesteps; "
                         f"the calibration data has {steps}")
    timesteps = []
    for s in range(steps):
        t = data.timesteps[data.step_index == s]
        timesteps.append(int(t[0]))
    groups = sample_groups(torch.arange(steps), steps, num_groups).tolist()
    return TimestepGroups(timesteps, groups)


def _timestep_and_batch(args, kwargs):
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    if timestep is None:
        raise ValueError("this model has timestep-aware activation quantizers and must be called with a timestep")
    if not isinstance(timestep, torch.Tensor):
        # torch.tensor([t]) rather than as_tensor(t): torch.compile then treats a Python number as dynamic
        # after one recompile instead of compiling once per timestep.
        timestep = torch.tensor([timestep])
    return timestep, (sample.shape[0] if isinstance(sample, torch.Tensor) else None)


def set_timestep_groups(model: nn.Module, args, kwargs) -> None:
    """Give every timestep-aware quantizer of ``model`` the group of each sample of the call ``model(*args,
    **kwargs)``. Tensor operations only (no ``.item()``), so that it traces into a compiled model's graph."""
    groups: TimestepGroups | None = getattr(model, "gaq_timestep_groups", None)
    if groups is None:
        return
    timestep, batch = _timestep_and_batch(args, kwargs)
    g = groups.lookup(timestep)
    if batch is not None and len(g) == 1:
        g = g.expand(batch)
    set_group_index(model, g.to(next(model.parameters()).device))


def _set_groups_hook(model: nn.Module, args, kwargs):
    # A model class whose forward sets the groups itself (the Quantized* classes) skips the hook:
    # torch.compile(model) runs a top-level module's hooks as a frame of their own, a second graph.
    if not getattr(model, "gaq_groups_in_forward", False):
        set_timestep_groups(model, args, kwargs)
    return None


def install_timestep_groups(model: nn.Module, groups: TimestepGroups | None) -> None:
    """Record ``groups`` on the model and make its forward set every sample's group (idempotent)."""
    model.gaq_timestep_groups = groups
    if groups is None or not has_timestep_aware(model):
        return
    if not getattr(model, "_gaq_timestep_hook", False):
        model.register_forward_pre_hook(_set_groups_hook, with_kwargs=True)
        model._gaq_timestep_hook = True


__all__ = ["TimestepGroups", "groups_from_data", "install_timestep_groups", "sample_groups", "sample_groups_of",
           "set_timestep_groups"]
