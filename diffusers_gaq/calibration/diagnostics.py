"""Gradient conflict between timestep groups (the paper's Figure 1 analysis) and per-timestep losses.

For a unit with quantization parameters theta, g_t = grad_theta of the (optionally
omega-weighted) mean reconstruction loss over group t's samples; the T x T matrix of cosines
between the g_t shows whether timesteps pull theta in conflicting directions.
"""

from __future__ import annotations

import torch

from .reconstruction import UnitProblem


def group_gradients(problem: UnitProblem, params: list[torch.Tensor], groups: list[torch.Tensor],
                    weights: list[torch.Tensor] | None = None, batch_size: int = 64) -> torch.Tensor:
    """[T, P]: the flattened gradient of each group's (weighted) mean loss."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    rows = []
    try:
        for t, idx in enumerate(groups):
            acc = [torch.zeros_like(p) for p in params]
            w_all = weights[t] if weights is not None else torch.ones(len(idx))
            for i in range(0, len(idx), batch_size):
                w = w_all[i : i + batch_size].to(problem.device)
                loss = (w * problem.losses(idx[i : i + batch_size])).sum() / len(idx)
                for a, g in zip(acc, torch.autograd.grad(loss, params, allow_unused=True)):
                    if g is not None:
                        a += g
            rows.append(torch.cat([a.flatten() for a in acc]).detach().cpu())
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return torch.stack(rows)


def cosine_matrix(grads: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows: symmetric, ones on the diagonal (zero rows give 0)."""
    g = grads.double()
    norms = g.norm(dim=1, keepdim=True)
    unit = g / norms.clamp_min(1e-300)
    cos = (unit @ unit.T).clamp(-1, 1)
    cos.fill_diagonal_(1.0)
    return cos.float()


def mean_off_diagonal(cos: torch.Tensor) -> float:
    t = cos.shape[0]
    if t < 2:
        return 1.0
    return float((cos.sum() - cos.diagonal().sum()) / (t * (t - 1)))


def mean_per_step(losses: torch.Tensor, steps: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Mean of ``losses`` for each calibration timestep index in ``steps`` (0 where a step has none)."""
    total = torch.zeros(num_steps, dtype=torch.float64).index_add_(0, steps, losses.double())
    count = torch.zeros(num_steps, dtype=torch.float64).index_add_(0, steps, torch.ones_like(losses, dtype=torch.float64))
    return (total / count.clamp_min(1)).float()


@torch.no_grad()
def per_step_loss(problem: UnitProblem, idx: torch.Tensor, step_index: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Mean reconstruction loss per calibration timestep (in sampling order)."""
    losses = problem.per_sample_losses(idx, batch_size)
    return mean_per_step(losses, step_index[idx], int(step_index.max()) + 1)
