"""The score gradient of the meta objective, computed by parts in bounded memory.

weighting.meta_objective is L_VAL as one differentiable expression: autograd builds the virtual
step's graph with create_graph, the surrogate gradients G_t with create_graph on top of it, and
differentiates L_GM(G) through both, so one meta step holds a third-order graph over the whole
minibatch and validation set (docs/benchmarks.md: 3.5 -> 10.9 GiB for a DiT-XL/2 block). The
virtual step is linear in omega, which lets the same gradient be written with first-order passes
and one Hessian-vector product, each a sum over samples that can run a chunk of samples at a time.

With g_i = grad_theta L_i(theta) (train sample i of the minibatch B), eta per tensor,
theta' = theta - eta * (1/|B|) sum_i omega_i g_i, v_t = grad L^V_t(theta') and H_t its Hessian:

    G_t[i]          = -(1/|B|) g_i . (eta v_t)                       (surrogate gradients)
    a_t             = d L_GM / d G_t                                  (small, from G alone)
    d_t             = -(1/|B|) eta * sum_i a_t[i] g_i                 (d theta' / d omega . a_t)
    r               = sum_t c_t v_t + sum_t H_t d_t                   (c_t = 1, or 1 / L^V_t(theta) for "cosine")
    d L_VAL / d omega_i = -(1/|B|) g_i . (eta r)

g_i . u for all i is a directional derivative of the per-sample losses, computed as the gradient
of (sum_i u_i g_i) . w with respect to the multipliers u (one double backward over train samples).
Every line is a sum over chunks of samples, so the peak is one chunk's second-order graph. The
float order differs from the single expression (sums over chunks, different association); the
two agree to rounding (tests/test_meta_gradient.py).
"""

from __future__ import annotations

import torch

from ..config import GradientAlignedQuantizer
from .reconstruction import UnitProblem
from .sample_weights import gradient_matching_loss, weights_of_samples

# Working set of one chunk of samples. Fixed, not a share of config.max_calibration_memory_gib: the
# chunk size sets the float order of the sums, and the result must not depend on the memory budget.
CHUNK_BYTES = 2 * 2**30
# A second-order graph keeps each layer's input and output (and their gradients) a few times over:
# the estimate of one sample's share is this many copies of its unit output per layer.
GRAPH_COPIES_PER_LAYER = 16


def meta_chunk_size(problem: UnitProblem) -> int:
    """Samples per chunk of the meta gradient's passes, from the unit's shapes alone."""
    target = problem.targets[torch.zeros(1, dtype=torch.long)]  # also a disk-backed table
    per_sample = target.numel() * target.element_size() * GRAPH_COPIES_PER_LAYER * max(1, len(problem.layers))
    return max(1, CHUNK_BYTES // per_sample)


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _dot(xs, ys) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(xs, ys) if x is not None and y is not None)


def _add(acc, grads):
    return [a if g is None else (g if a is None else a + g) for a, g in zip(acc, grads)]


def _zeros_if_none(grads, params):
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _directional(problem, idx, theta, names, directions, chunk) -> torch.Tensor:
    """[g_i . w for each direction w] for the samples ``idx`` at theta: a [len(directions), len(idx)]
    tensor. Per chunk: s = (sum_i u_i g_i) . w is linear in u, and d s / d u_i = g_i . w."""
    params = [theta[n] for n in names]
    out = torch.empty(len(directions), len(idx), dtype=params[0].dtype, device=params[0].device)
    for sl in _chunks(len(idx), chunk):
        loss = problem.losses(idx[sl], theta)
        u = torch.ones_like(loss, requires_grad=True)
        grads = torch.autograd.grad(loss, params, grad_outputs=u, create_graph=True, allow_unused=True)
        for k, w in enumerate(directions):
            s = _dot(grads, w)
            if not isinstance(s, torch.Tensor) or not s.requires_grad:  # no parameter reaches the loss
                out[k, sl] = 0.0
                continue
            (out[k, sl],) = torch.autograd.grad(s, u, retain_graph=k + 1 < len(directions))
    return out


def _vector_jacobians(problem, idx, theta, names, coefficients, chunk):
    """[grad_theta sum_i c[i] L_i(theta) for each row c of ``coefficients``], over chunks of ``idx``,
    and the losses L_i(theta)."""
    params = [theta[n] for n in names]
    totals, losses = [[None] * len(params) for _ in coefficients], []
    for sl in _chunks(len(idx), chunk):
        loss = problem.losses(idx[sl], theta)
        losses.append(loss.detach())
        for k, c in enumerate(coefficients):
            grads = torch.autograd.grad(loss, params, grad_outputs=c[sl], retain_graph=k + 1 < len(coefficients),
                                        allow_unused=True)
            totals[k] = _add(totals[k], grads)
    return [_zeros_if_none(t, params) for t in totals], torch.cat(losses)


def _group_gradient(problem, group, theta, names, chunk):
    """L^V_t(theta) and its gradient, the mean over one validation group, by chunks."""
    dtype = next(iter(theta.values())).dtype
    (grad,), values = _vector_jacobians(problem, group, theta, names,
                                        [torch.full((len(group),), 1.0 / len(group), dtype=dtype)], chunk)
    return values.mean(), grad


def _group_hvp(problem, group, theta, names, direction, chunk):
    """H_t(theta) . direction for the mean loss of one validation group, by chunks."""
    params = [theta[n] for n in names]
    total = [None] * len(params)
    for sl in _chunks(len(group), chunk):
        loss = problem.losses(group[sl], theta).sum() / len(group)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        s = _dot(grads, direction)
        if isinstance(s, torch.Tensor) and s.requires_grad:
            total = _add(total, torch.autograd.grad(s, params, allow_unused=True))
    return _zeros_if_none(total, params)


def meta_gradient(problem: UnitProblem, scores: torch.Tensor, batch: torch.Tensor, train_idx: torch.Tensor,
                  val_groups: list[torch.Tensor], config: GradientAlignedQuantizer, theta: dict[str, torch.Tensor],
                  context, chunk: int | None = None) -> tuple[torch.Tensor, dict]:
    """d L_VAL / d scores for one minibatch (positions ``batch`` into ``train_idx``), and the values
    {"l_gm", "l_val"}: the gradient of weighting.meta_objective, computed by parts (module docstring).
    ``context``: weighting.MetaContext; ``chunk``: samples per pass (None: meta_chunk_size)."""
    chunk = chunk or meta_chunk_size(problem)
    names = list(theta)
    params = [theta[n] for n in names]
    eta = [context.inner_steps[n] for n in names]
    scores = scores.detach().requires_grad_(True)
    omega_b = weights_of_samples(scores, config.tau, context.score_index)[batch]
    w = omega_b.detach().to(params[0].dtype)
    idx = train_idx[batch]
    size = len(batch)

    # theta' from the weighted minibatch gradient (first order), a leaf for the passes at theta'.
    (inner,), _ = _vector_jacobians(problem, idx, theta, names, [w / size], chunk)
    theta_new = {n: (theta[n] - e * g).detach().requires_grad_(True) for n, e, g in zip(names, eta, inner)}
    values, v = zip(*[_group_gradient(problem, grp, theta_new, names, chunk) for grp in val_groups])
    values = torch.stack(values)
    scale = (1.0 / context.val_reference if config.gradient_matching == "cosine"
             else torch.ones_like(values)).to(values.dtype)

    if len(val_groups) > 1:
        # G_t = -(1/|B|) g_i . (eta v_t); a_t = d L_GM / d G_t; d_t = -(1/|B|) eta sum_i a_t[i] g_i
        surrogate = -_directional(problem, idx, theta, names, [[e * x for e, x in zip(eta, vt)] for vt in v],
                                  chunk) / size
        surrogate = surrogate.detach().requires_grad_(True)  # [T, |B|]: the G_t
        l_gm = gradient_matching_loss(list(surrogate), config.gradient_matching)
        (a,) = torch.autograd.grad(l_gm, surrogate)
        d = [[-e * x / size for e, x in zip(eta, dt)]
             for dt in _vector_jacobians(problem, idx, theta, names, list(a), chunk)[0]]
        hvp = [_group_hvp(problem, grp, theta_new, names, dt, chunk) for grp, dt in zip(val_groups, d)]
    else:  # no pair of groups to align
        l_gm, hvp = values.new_zeros(()), []
    r = [sum(s * vt[k] for s, vt in zip(scale, v)) + sum(h[k] for h in hvp) for k in range(len(names))]
    d_omega = -_directional(problem, idx, theta, names, [[e * x for e, x in zip(eta, r)]], chunk)[0] / size
    (grad,) = torch.autograd.grad(omega_b, scores, grad_outputs=d_omega.to(omega_b.dtype))
    l_val = float(l_gm.detach()) + float((scale * values).sum())
    return grad, {"l_gm": float(l_gm.detach()), "l_val": l_val}
