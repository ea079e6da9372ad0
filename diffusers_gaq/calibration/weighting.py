"""Per-sample weights of the calibration loss: uniform, or gradient-aligned (Hoang et al., 2026).

Gradient-aligned weights (the paper's Algorithm 2). Sample i of the training split has a score
s_i; its weight is omega = N * softmax(s / tau), so equal scores give omega = 1 (the uniform
baseline). For a minibatch B and the unit's quantization parameters theta:

    theta'(omega) = theta - eta * grad_theta (1/|B|) sum_{i in B} omega_i L_i(theta)   (virtual step)
    L^V_t         = mean_{j in X^V_t} L_j(theta'(omega))                            (per timestep group)
    G_t           = d L^V_t / d omega_B
    L_GM          = -2 / (T (T - 1)) * sum_{t<k} G_t . G_k
    L_VAL         = L_GM + sum_t L^V_t ;   s <- Adam step on d L_VAL / d s

Variants (issue 13; the paper's form is config.gradient_matching="dot", inner_step="absolute",
omega_granularity="sample"):

- gradient_matching="cosine": L_GM = -2 / (T (T-1)) * sum_{t<k} cos(G_t, G_k) and the validation
  term sum_t L^V_t(theta') / L^V_t(theta). G_t is proportional to eta, so the paper's L_GM scales with
  eta^2 and its gradient with eta^3 while the validation term's gradient scales with eta: at a small
  virtual step alignment does not matter at all. Both terms of the cosine form are dimensionless and
  their gradients both scale with eta, so neither eta nor the scale of the unit's loss sets their ratio.
- inner_step="relative": each tensor's virtual step is inner_lr times its norm; inner_step="adam":
  each tensor moves as far as the reconstruction optimiser's first Adam step would move it
  (weight_lr per AdaRound variable, act_lr times the step size per activation step). The step sizes
  are fixed once per unit from the uniform-weight gradient, so the objective stays a smooth
  function of the scores (its gradient is exact, not that of a moving target).
- omega_granularity="timestep": one score per calibration timestep, shared by its samples
  (S values instead of N), omega = S * softmax(s / tau) per timestep.

meta_objective writes L_VAL as one differentiable expression (plain torch autograd with
create_graph and torch.func.functional_call; no `higher`): the definition, used by the tests and the
diagnostics. learn_scores steps on its gradient computed by parts in bounded memory
(meta_gradient.py: first-order passes and one Hessian-vector product, a chunk of samples at a time),
equal to autograd's to rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..config import GradientAlignedQuantizer
from .meta_gradient import meta_chunk_size, meta_gradient
from .reconstruction import UnitProblem
from .sample_weights import TINY_NORM, gradient_matching_loss, sample_weights, weights_of_samples  # noqa: F401

logger = logging.getLogger(__name__)

def num_scores(config: GradientAlignedQuantizer, num_train: int, num_steps: int) -> int:
    """How many scores the meta step learns: one per training sample, or one per calibration timestep."""
    return num_steps if config.omega_granularity == "timestep" else num_train


# Whether autograd's batched backward (is_grads_batched) works for the units seen so far: when a unit
# has an op without a batching rule, trying it again at every meta step would repeat the failure.
_BATCHED_GRADS = {"ok": True}


def surrogate_gradients(group_losses: torch.Tensor, omega_b: torch.Tensor) -> list[torch.Tensor]:
    """G_t = d L^V_t / d omega_B for every group t, differentiable (create_graph).

    One vectorised backward pass over the T groups (is_grads_batched) where autograd supports it,
    otherwise one pass per group."""
    t = len(group_losses)
    if _BATCHED_GRADS["ok"]:
        try:
            (grads,) = torch.autograd.grad(group_losses, omega_b, grad_outputs=torch.eye(t, dtype=group_losses.dtype,
                                                                                         device=group_losses.device),
                                           is_grads_batched=True, create_graph=True, retain_graph=True)
            return list(grads)
        except RuntimeError as err:  # an op without a batching rule: loop from now on
            logger.info("batched surrogate gradients unavailable (%s); one backward pass per group", err)
            _BATCHED_GRADS["ok"] = False
    return [g if g is not None else torch.zeros_like(omega_b)
            for lv in group_losses
            for g in torch.autograd.grad(lv, omega_b, create_graph=True, retain_graph=True, allow_unused=True)]


@dataclass
class MetaContext:
    """What stays fixed during one unit's meta steps (theta does not change while the scores are learned).

    inner_steps: eta of every trainable tensor (by name); val_reference: L^V_t(theta) per group, the
    scale of the cosine form's validation term; score_index: the score of every training sample
    (None: one score per sample)."""

    inner_steps: dict[str, float]
    val_reference: torch.Tensor | None = None
    score_index: torch.Tensor | None = None


def _adam_first_step(problem: UnitProblem, param: torch.Tensor, config: GradientAlignedQuantizer) -> float:
    """Euclidean length of the reconstruction optimiser's first Adam step on ``param``: Adam's first
    step moves every element by its learning rate (reconstruct() gives step sizes act_lr times
    their mean magnitude, AdaRound's V weight_lr)."""
    steps = {id(p) for p in problem.trainable_params(config)["steps"]}
    lr = config.act_lr * max(float(param.detach().abs().mean()), 1e-8) if id(param) in steps else config.weight_lr
    return lr * param.numel() ** 0.5


def inner_step_sizes(problem: UnitProblem, theta: dict[str, torch.Tensor], train_idx: torch.Tensor,
                     config: GradientAlignedQuantizer, probe: torch.Tensor) -> dict[str, float]:
    """eta per trainable tensor. "absolute": inner_lr for all (the paper). "relative" and "adam": eta
    such that the uniform-weight virtual step on the ``probe`` minibatch moves the tensor by inner_lr
    times its norm, or by the reconstruction optimiser's first step."""
    if config.inner_step == "absolute":
        return {n: config.inner_lr for n in theta}
    loss = problem.losses(train_idx[probe], theta).mean()
    grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
    etas = {}
    for (name, p), g in zip(theta.items(), grads):
        gnorm = float(g.norm()) if g is not None else 0.0
        if config.inner_step == "relative":
            length = config.inner_lr * float(p.detach().norm())
        else:
            length = _adam_first_step(problem, p, config)
        # A tensor without gradient does not move whatever eta is.
        etas[name] = length / gnorm if gnorm > TINY_NORM else 0.0
    return etas


def _validation_losses(problem: UnitProblem, val_groups: list[torch.Tensor],
                       theta: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss per validation group, one batched forward pass over all of them."""
    val_losses = problem.losses(torch.cat(val_groups), theta)
    return torch.stack([chunk.mean() for chunk in torch.split(val_losses, [len(v) for v in val_groups])])


def make_context(problem: UnitProblem, theta: dict[str, torch.Tensor], train_idx: torch.Tensor,
                 val_groups: list[torch.Tensor], config: GradientAlignedQuantizer, probe: torch.Tensor,
                 score_index: torch.Tensor | None = None) -> MetaContext:
    reference = None
    if config.gradient_matching == "cosine":
        with torch.no_grad():
            reference = _validation_losses(problem, val_groups, theta).clamp_min(TINY_NORM)
    return MetaContext(inner_step_sizes(problem, theta, train_idx, config, probe), reference, score_index)


def meta_objective(problem: UnitProblem, scores: torch.Tensor, batch: torch.Tensor, train_idx: torch.Tensor,
                   val_groups: list[torch.Tensor], config: GradientAlignedQuantizer,
                   theta: dict[str, torch.Tensor], context: MetaContext | None = None) -> tuple[torch.Tensor, dict]:
    """L_VAL for one minibatch (positions ``batch`` into ``train_idx``), differentiable w.r.t. ``scores``.

    ``context``: see MetaContext; None builds it here (the inner steps from ``batch``)."""
    l_gm, l_v = meta_terms(problem, scores, batch, train_idx, val_groups, config, theta, context)
    l_val = l_gm + l_v
    return l_val, {"l_gm": l_gm.item(), "l_val": l_val.item()}


def meta_terms(problem: UnitProblem, scores: torch.Tensor, batch: torch.Tensor, train_idx: torch.Tensor,
               val_groups: list[torch.Tensor], config: GradientAlignedQuantizer, theta: dict[str, torch.Tensor],
               context: MetaContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of L_VAL: (L_GM, the validation term), both differentiable w.r.t. ``scores``."""
    if context is None:
        context = make_context(problem, theta, train_idx, val_groups, config, batch)
    omega_b = weights_of_samples(scores, config.tau, context.score_index)[batch]
    inner = (omega_b * problem.losses(train_idx[batch], theta)).mean()
    names = list(theta)
    grads = torch.autograd.grad(inner, [theta[n] for n in names], create_graph=True)
    theta_new = {n: theta[n] - context.inner_steps[n] * g for n, g in zip(names, grads)}
    group_losses = _validation_losses(problem, val_groups, theta_new)
    if len(group_losses) > 1:
        l_gm = gradient_matching_loss(surrogate_gradients(group_losses, omega_b), config.gradient_matching)
    else:  # no pair of groups to align: skip the second-order work of the surrogate gradients
        l_gm = group_losses.new_zeros(())
    if config.gradient_matching == "cosine":
        return l_gm, (group_losses / context.val_reference).sum()
    return l_gm, group_losses.sum()


def learn_scores(problem: UnitProblem, scores: torch.Tensor, train_idx: torch.Tensor, val_groups: list[torch.Tensor],
                 config: GradientAlignedQuantizer, generator: torch.Generator, progress: bool = True,
                 grad_hook=None, score_index: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
    """``meta_iters`` Adam steps on the scores (Algorithm 2); theta itself is not changed.

    ``score_index``: the score of every training sample (omega_granularity="timestep": its calibration
    timestep); None: ``scores`` holds one score per training sample. ``grad_hook(grad)`` may replace the
    score gradient before the step (with several processes: rank 0's gradient, so that all processes
    stay identical)."""
    if config.meta_iters == 0:
        return scores.detach().clone(), []
    theta = problem.named_trainable(config)
    flags = {n: p.requires_grad for n, p in theta.items()}
    for p in theta.values():
        p.requires_grad_(True)
    scores = scores.detach().clone().to(problem.device).requires_grad_(True)
    opt = torch.optim.Adam([scores], lr=config.meta_lr)
    history = []
    val_groups = [v for v in val_groups if len(v)]
    size = min(config.meta_batch_size, len(train_idx))
    batches = [torch.randint(0, len(train_idx), (size,), generator=generator) for _ in range(config.meta_iters)]
    # Fused attention kernels have no double backward; the math kernel computes the same function.
    with sdpa_kernel(SDPBackend.MATH):
        context = make_context(problem, theta, train_idx, val_groups, config, batches[0], score_index)
    chunk = meta_chunk_size(problem)
    bar = tqdm(batches, desc=f"sample weights {problem.name}", disable=not progress, leave=False)
    for batch in bar:
        with sdpa_kernel(SDPBackend.MATH):
            grad, info = meta_gradient(problem, scores, batch, train_idx, val_groups, config, theta, context, chunk)
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
