"""Capture what a reconstruction unit receives and returns inside the full model.

A forward pass runs only as far as the unit (a hook stops it there), batch by batch, and the
unit's positional / keyword tensor arguments are stacked along the batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .store import CaptureStore, DiskRows


class _StopForward(Exception):
    pass


def _is_rows(v) -> bool:
    """A per-sample table: a batch-first tensor, or a disk-backed one."""
    return isinstance(v, DiskRows) or (isinstance(v, torch.Tensor) and v.dim() > 0)


@dataclass
class UnitInputs:
    """A unit's call arguments for every calibration sample (tables of rows: CPU tensors stacked on
    dim 0, or disk-backed :class:`~diffusers_gaq.calibration.store.DiskRows`)."""

    args: tuple
    kwargs: dict

    def select(self, idx: torch.Tensor, device: torch.device | None = None):
        def pick(v):
            if _is_rows(v):
                v = v[idx]
                return v.to(device) if device is not None else v
            return v

        return tuple(pick(a) for a in self.args), {k: pick(v) for k, v in self.kwargs.items()}

    def __len__(self) -> int:
        for v in list(self.args) + list(self.kwargs.values()):
            if _is_rows(v):
                return len(v)
        return 0


class _Collector:
    """Writes each captured batch of one argument into its table as it arrives."""

    def __init__(self, store: CaptureStore, rows: int, what: str):
        self.store, self.rows, self.what = store, rows, what
        self.table = None
        self.first = None  # non-tensor (or scalar) arguments: the same in every batch
        self.filled = 0

    def add(self, value) -> None:
        if not (isinstance(value, torch.Tensor) and value.dim() > 0):
            if self.filled == 0:
                self.first = value
            self.filled += 1
            return
        if self.table is None:
            self.table = self.store.new_rows(self.rows, tuple(value.shape[1:]), value.dtype, self.what)
        self.table.write(self.filled, value)
        self.filled += len(value)

    def result(self):
        return self.first if self.table is None else self.store.finish(self.table)


@torch.no_grad()
def capture_unit(model: nn.Module, unit: nn.Module, data, family, batch_size: int, what: str,
                 indices: torch.Tensor | None = None, device: torch.device | None = None,
                 store: CaptureStore | None = None):
    """Run ``model`` on calibration samples up to ``unit``; return its inputs (``what="inputs"``,
    a :class:`UnitInputs`) or its output (``what="output"``), as CPU tensors, or as disk-backed
    tables once ``store`` (a :class:`CaptureStore`, holding its memory budget) says they do not fit."""
    device = device or next(model.parameters()).device
    indices = torch.arange(len(data)) if indices is None else indices
    store = store or CaptureStore()
    n = len(indices)
    got_args: list[_Collector] = []
    got_kwargs: dict[str, _Collector] = {}
    got_out = _Collector(store, n, f"outputs of {type(unit).__name__}")

    def pre_hook(mod, args, kwargs):
        if not got_args and not got_kwargs:
            got_args.extend(_Collector(store, n, f"input {i} of {type(unit).__name__}") for i in range(len(args)))
            got_kwargs.update({k: _Collector(store, n, f"input {k!r} of {type(unit).__name__}") for k in kwargs})
        for c, a in zip(got_args, args):
            c.add(a)
        for k, v in kwargs.items():
            got_kwargs[k].add(v)
        raise _StopForward

    def post_hook(mod, args, kwargs, output):
        got_out.add(output)
        raise _StopForward

    if what == "inputs":
        handle = unit.register_forward_pre_hook(pre_hook, with_kwargs=True)
    elif what == "output":
        handle = unit.register_forward_hook(post_hook, with_kwargs=True)
    else:
        raise ValueError(f"what must be 'inputs' or 'output', got {what!r}")
    try:
        for start in range(0, n, batch_size):
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
        return got_out.result()
    return UnitInputs(tuple(c.result() for c in got_args), {k: c.result() for k, c in got_kwargs.items()})


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
