"""Gradients of several parameters as one flat vector, so that one collective (an all-reduce, or a
sum over per-sample rows) can carry them all, with None kept apart from zero."""

from __future__ import annotations

import torch


def pack_grads(grads, params, dtype=None, device=None) -> torch.Tensor:
    """One flat vector: every gradient flattened (zeros where it is None), then one presence flag per
    parameter. Summing such vectors from several sources and :func:`unpack_grads` gives each
    parameter the summed gradient, or None where no source had one."""
    dtype = dtype or next((g.dtype for g in grads if g is not None), params[0].dtype)
    parts = [(g if g is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, dtype)
             for g, p in zip(grads, params)]
    present = torch.tensor([float(g is not None) for g in grads], dtype=dtype, device=parts[0].device)
    return torch.cat(parts + [present])


def unpack_grads(params, flat: torch.Tensor) -> None:
    """Set ``p.grad`` from a (summed) :func:`pack_grads` vector; None where no source had a gradient,
    as in a single process (Adam then skips the parameter instead of counting a zero step)."""
    offset = sum(p.numel() for p in params)
    flags = flat[offset:].tolist()
    offset = 0
    for p, flag in zip(params, flags):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.device).clone() if flag else None
        offset += n
