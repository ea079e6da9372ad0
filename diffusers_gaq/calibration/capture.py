"""Capture what a reconstruction unit receives and returns inside the full model.

A forward pass runs only as far as the unit (a hook stops it there), batch by batch, and the
unit's positional / keyword tensor arguments are stacked along the batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class _StopForward(Exception):
    pass


@dataclass
class UnitInputs:
    """A unit's call arguments for every calibration sample (tensors stacked on dim 0)."""

    args: tuple
    kwargs: dict

    def select(self, idx: torch.Tensor, device: torch.device | None = None):
        def pick(v):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                v = v[idx]
                return v.to(device) if device is not None else v
            return v

        return tuple(pick(a) for a in self.args), {k: pick(v) for k, v in self.kwargs.items()}

    def __len__(self) -> int:
        for v in list(self.args) + list(self.kwargs.values()):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return len(v)
        return 0


def _stack(parts: list):
    first = parts[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        return torch.cat(parts)
    return first  # non-tensor (or scalar) arguments are the same in every batch


@torch.no_grad()
def capture_unit(model: nn.Module, unit: nn.Module, data, family, batch_size: int, what: str,
                 indices: torch.Tensor | None = None, device: torch.device | None = None):
    """Run ``model`` on calibration samples up to ``unit``; return its inputs (``what="inputs"``,
    a :class:`UnitInputs` on CPU) or its output (``what="output"``, a CPU tensor)."""
    device = device or next(model.parameters()).device
    indices = torch.arange(len(data)) if indices is None else indices
    got_args, got_kwargs, got_out = [], [], []

    def pre_hook(mod, args, kwargs):
        got_args.append(tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
        got_kwargs.append({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        raise _StopForward

    def post_hook(mod, args, kwargs, output):
        got_out.append(output.cpu())
        raise _StopForward

    if what == "inputs":
        handle = unit.register_forward_pre_hook(pre_hook, with_kwargs=True)
    elif what == "output":
        handle = unit.register_forward_hook(post_hook, with_kwargs=True)
    else:
        raise ValueError(f"what must be 'inputs' or 'output', got {what!r}")
    try:
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            cond = {k: v[idx].to(device) for k, v in data.conditioning.items()}
            try:
                family.forward(model, data.samples[idx].to(device), data.timesteps[idx].to(device), cond)
            except _StopForward:
                pass
            else:
                raise RuntimeError(f"the forward pass never reached unit {type(unit).__name__}")
    finally:
        handle.remove()
    if what == "output":
        return torch.cat(got_out)
    args = tuple(_stack([a[i] for a in got_args]) for i in range(len(got_args[0])))
    kwargs = {k: _stack([kw[k] for kw in got_kwargs]) for k in got_kwargs[0]}
    return UnitInputs(args, kwargs)


@torch.no_grad()
def capture_all_outputs(model: nn.Module, units: list, data, family, batch_size: int,
                        device: torch.device | None = None, max_bytes: int = 2 * 2**30) -> dict | None:
    """Every unit's output for every calibration sample from ONE forward pass of ``model`` (run it in
    full precision to get the reconstruction targets). Returns None when the outputs would need
    more than ``max_bytes``; callers then capture unit by unit."""
    device = device or next(model.parameters()).device
    probe: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: probe.__setitem__(n, out[0].numel()))
             for n, m in units]
    try:
        family.forward(model, data.samples[:1].to(device), data.timesteps[:1].to(device),
                       {k: v[:1].to(device) for k, v in data.conditioning.items()})
    finally:
        for h in hooks:
            h.remove()
    if sum(probe.values()) * 4 * len(data) > max_bytes:
        return None
    parts: dict[str, list] = {n: [] for n, _ in units}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: parts[n].append(out.cpu())) for n, m in units]
    try:
        for start in range(0, len(data), batch_size):
            sl = slice(start, start + batch_size)
            family.forward(model, data.samples[sl].to(device), data.timesteps[sl].to(device),
                           {k: v[sl].to(device) for k, v in data.conditioning.items()})
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(p) for n, p in parts.items()}
