"""Per-sample weights of the calibration loss: uniform, or gradient-aligned (Hoang et al., 2026).

Gradient-aligned weights (the paper's Algorithm 2). Sample i of the training split has a score
s_i; its weight is omega = N * softmax(s / tau), so equal scores give omega = 1 (the uniform
baseline). For a minibatch B and the unit's quantization parameters theta:

    theta'(omega) = theta - eta * grad_theta (1/|B|) sum_{i in B} omega_i L_i(theta)   (virtual step)
    L^V_t         = mean_{j in X^V_t} L_j(theta'(omega))                            (per timestep group)
    G_t           = d L^V_t / d omega_B
    L_GM          = -2 / (T (T - 1)) * sum_{t<k} G_t . G_k
    L_VAL         = L_GM + sum_t L^V_t ;   s <- Adam step on d L_VAL / d s

Plain torch autograd (create_graph=True) and torch.func.functional_call; no `higher`.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..config import GradientAlignedQuantizer
from .reconstruction import UnitProblem


def sample_weights(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """omega = N * softmax(s / tau): positive, sums to N."""
    return len(scores) * torch.softmax(scores / tau, dim=0)


def gradient_matching_loss(group_grads: list[torch.Tensor]) -> torch.Tensor:
    """-2 / (T (T-1)) * sum_{t<k} G_t . G_k (raw dot products); zero for a single group."""
    t = len(group_grads)
    if t < 2:
        return group_grads[0].new_zeros(())
    g = torch.stack(group_grads)  # [T, |B|]
    gram = g @ g.T
    pairs = (gram.sum() - gram.diagonal().sum()) / 2
    return -2.0 / (t * (t - 1)) * pairs


def surrogate_gradients(group_losses: torch.Tensor, omega_b: torch.Tensor) -> list[torch.Tensor]:
    """G_t = d L^V_t / d omega_B for every group t, differentiable (create_graph).

    One vectorised backward pass over the T groups (is_grads_batched) where autograd supports it,
    otherwise one pass per group."""
    t = len(group_losses)
    try:
        (grads,) = torch.autograd.grad(group_losses, omega_b, grad_outputs=torch.eye(t, dtype=group_losses.dtype),
                                       is_grads_batched=True, create_graph=True, retain_graph=True)
        return list(grads)
    except RuntimeError:  # an op without a batching rule: fall back to a loop
        return [g if g is not None else torch.zeros_like(omega_b)
                for lv in group_losses
                for g in torch.autograd.grad(lv, omega_b, create_graph=True, retain_graph=True, allow_unused=True)]


def meta_objective(problem: UnitProblem, scores: torch.Tensor, batch: torch.Tensor, train_idx: torch.Tensor,
                   val_groups: list[torch.Tensor], config: GradientAlignedQuantizer,
                   theta: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """L_VAL for one minibatch (positions ``batch`` into ``train_idx``), differentiable w.r.t. ``scores``."""
    omega_b = sample_weights(scores, config.tau)[batch]
    inner = (omega_b * problem.losses(train_idx[batch], theta)).mean()
    names = list(theta)
    grads = torch.autograd.grad(inner, [theta[n] for n in names], create_graph=True)
    theta_new = {n: theta[n] - config.inner_lr * g for n, g in zip(names, grads)}
    all_val = torch.cat(val_groups)
    val_losses = problem.losses(all_val, theta_new)
    sizes = [len(v) for v in val_groups]
    group_losses = [chunk.mean() for chunk in torch.split(val_losses, sizes)]
    group_grads = surrogate_gradients(torch.stack(group_losses), omega_b)
    l_gm = gradient_matching_loss(group_grads)
    l_val = l_gm + torch.stack(group_losses).sum()
    return l_val, {"l_gm": l_gm.item(), "l_val": l_val.item()}


def learn_scores(problem: UnitProblem, scores: torch.Tensor, train_idx: torch.Tensor, val_groups: list[torch.Tensor],
                 config: GradientAlignedQuantizer, generator: torch.Generator, progress: bool = True,
                 grad_hook=None) -> tuple[torch.Tensor, list[dict]]:
    """``meta_iters`` Adam steps on the scores (Algorithm 2); theta itself is not changed.

    ``grad_hook(grad)`` may replace the score gradient before the step (with several processes: rank 0's
    gradient, so that all processes stay identical)."""
    theta = problem.named_trainable(config)
    flags = {n: p.requires_grad for n, p in theta.items()}
    for p in theta.values():
        p.requires_grad_(True)
    scores = scores.detach().clone().to(problem.device).requires_grad_(True)
    opt = torch.optim.Adam([scores], lr=config.meta_lr)
    history = []
    val_groups = [v for v in val_groups if len(v)]
    bar = tqdm(range(config.meta_iters), desc=f"sample weights {problem.name}", disable=not progress, leave=False)
    for _ in bar:
        batch = torch.randint(0, len(train_idx), (min(config.meta_batch_size, len(train_idx)),), generator=generator)
        # Fused attention kernels have no double backward; the math kernel computes the same function.
        with sdpa_kernel(SDPBackend.MATH):
            l_val, info = meta_objective(problem, scores, batch, train_idx, val_groups, config, theta)
            (grad,) = torch.autograd.grad(l_val, scores)
        if grad_hook is not None:
            grad = grad_hook(grad)
        opt.zero_grad(set_to_none=True)
        scores.grad = grad
        opt.step()
        history.append(info)
        bar.set_postfix(l_val=f"{info['l_val']:.4g}")
    for n, p in theta.items():
        p.requires_grad_(flags[n])
    return scores.detach(), history
