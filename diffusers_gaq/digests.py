"""sha256 digests of tensors: what checkpoints, verified loads and benchmark pairing compare."""

from __future__ import annotations

import hashlib

import torch


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    flat = t.detach().cpu().contiguous().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
    h = hashlib.sha256(f"{flat.dtype}:{tuple(t.shape)}:".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors, independent of the dict's order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}={tensor_digest(tensors[name])};".encode())
    return h.hexdigest()
