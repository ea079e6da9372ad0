"""Gradient-aligned sample weights (DESIGN.md section 4): omega, L_GM, the meta objective's
gradient against finite differences, the uniform special case, and the conflict diagnostics."""

import copy

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from torch import nn
from torch.func import functional_call

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.calibration.capture import UnitInputs
from diffusers_gaq.calibration.data import collect_calibration_data
from diffusers_gaq.calibration.diagnostics import cosine_matrix, group_gradients, mean_off_diagonal, per_step_loss
from diffusers_gaq.calibration.reconstruction import UnitProblem, init_quantizers, per_sample_loss, start_rounding
from diffusers_gaq.calibration.weighting import (
    gradient_matching_loss,
    learn_scores,
    meta_objective,
    sample_weights,
)
from diffusers_gaq.models import family_for
from diffusers_gaq.models.wrap import act_quantizers, quant_layers
from diffusers_gaq.quant.layers import QuantConv2d, QuantLinear
from diffusers_gaq.quant.quantizers import ActQuantizer, WeightQuantizer
from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG, REFERENCE_UNET_CONFIG

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# omega and L_GM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("tau", [0.1, 1.0, 3.0])
def test_sample_weights_positive_sum_to_n(n, tau):
    scores = torch.randn(n, generator=_gen(n), dtype=torch.float64) * 2
    w = sample_weights(scores, tau)
    assert w.shape == (n,) and torch.all(w > 0)
    assert w.sum().item() == pytest.approx(n, rel=1e-12)
    assert torch.allclose(w, n * torch.softmax(scores / tau, 0))
    assert torch.allclose(sample_weights(scores + 5.0, tau), w)  # only differences of scores matter
    for c in (0.0, -3.2, 11.0):
        assert torch.allclose(sample_weights(torch.full((n,), c, dtype=torch.float64), tau),
                              torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(sample_weights(torch.zeros(n), tau), torch.ones(n))


def test_sample_weights_order_and_temperature():
    scores = torch.tensor([0.0, 1.0, 2.0])
    w = sample_weights(scores, 1.0)
    assert w[0] < w[1] < w[2]
    sharp, flat = sample_weights(scores, 0.1), sample_weights(scores, 100.0)
    assert sharp[2] > w[2] and torch.allclose(flat, torch.ones(3), atol=0.05)


def _double_loop_gm(grads):
    t = len(grads)
    total = 0.0
    for a in range(t):
        for b in range(a + 1, t):
            total = total + torch.dot(grads[a], grads[b])
    return -2.0 / (t * (t - 1)) * total


@pytest.mark.parametrize("t", [2, 3, 5, 8])
def test_gradient_matching_loss_equals_double_loop(t):
    grads = [torch.randn(6, generator=_gen(t * 10 + i), dtype=torch.float64) for i in range(t)]
    got = gradient_matching_loss(grads)
    assert got.dim() == 0
    assert torch.allclose(got, _double_loop_gm(grads), atol=1e-12)
    if t == 2:
        assert torch.allclose(got, -torch.dot(grads[0], grads[1]))
    # aligned gradients are rewarded (negative loss), opposite ones penalised
    g = torch.randn(6, generator=_gen(0), dtype=torch.float64)
    assert gradient_matching_loss([g] * t) < 0
    assert gradient_matching_loss([g, -g]) > 0


def test_gradient_matching_loss_single_group_is_zero():
    g = torch.randn(4, requires_grad=True)
    out = gradient_matching_loss([g])
    assert out.item() == 0.0 and out.shape == ()


def test_gradient_matching_loss_differentiable():
    grads = [torch.randn(5, generator=_gen(i), dtype=torch.float64, requires_grad=True) for i in range(3)]
    gradient_matching_loss(grads).backward()
    for i in range(3):  # d/dG_i = -2/(T(T-1)) * sum_{j != i} G_j
        others = sum(grads[j].detach() for j in range(3) if j != i)
        assert torch.allclose(grads[i].grad, -1.0 / 3.0 * others)


# ---------------------------------------------------------------------------------------------
# tiny unit problems
# ---------------------------------------------------------------------------------------------


def _linear_problem(dtype=torch.float64, n_train=8, val_per_group=2, groups=2, seed=0, conflict=0.0,
                    learn_act_scale=False, inner_lr=0.5):
    """One QuantLinear (AdaRound weights, 8-bit input) and calibration samples in ``groups`` groups;
    with ``conflict`` > 0 each group's targets come from a differently perturbed layer."""
    torch.manual_seed(seed)
    fp = nn.Linear(5, 3)
    # Built in the target dtype part by part: QuantLayer.to(dtype) is broken (see test_wrap.py).
    unit = QuantLinear(copy.deepcopy(fp).to(dtype), WeightQuantizer(3).to(dtype), ActQuantizer(8).to(dtype))
    for p in unit.parameters():
        p.requires_grad_(False)
    n_val = val_per_group * groups
    n = n_train + n_val
    x = torch.randn(n, 5, generator=_gen(seed + 1), dtype=dtype)
    group = torch.cat([torch.arange(n_train) % groups, torch.arange(n_val) // val_per_group])
    with torch.no_grad():
        targets = fp.to(dtype)(x)
        for g in range(groups):
            delta = conflict * (1 if g % 2 == 0 else -1) * torch.ones(3, 5, dtype=dtype)
            targets[group == g] += x[group == g] @ delta.T
    problem = UnitProblem("lin", unit, UnitInputs((x,), {}), targets, torch.device("cpu"))
    cfg = GradientAlignedQuantizer(weight_bits=3, learn_act_scale=learn_act_scale, inner_lr=inner_lr, tau=1.0,
                                   recon_batch_size=64, meta_batch_size=4, meta_lr=0.5, meta_iters=5,
                                   num_calibration_timesteps=groups, num_groups=groups)
    train_idx = torch.arange(n_train)
    val_groups = [n_train + torch.arange(g * val_per_group, (g + 1) * val_per_group) for g in range(groups)]
    init_quantizers(problem, train_idx, cfg)
    start_rounding(problem)
    assert problem.unit.weight_quantizer.alpha.dtype == dtype
    return problem, cfg, train_idx, val_groups, group


def _theta(problem, cfg):
    theta = problem.named_trainable(cfg)
    for p in theta.values():
        p.requires_grad_(True)
    return theta


@pytest.mark.parametrize("learn_act_scale", [False, True])
def test_meta_objective_value_matches_explicit_computation(learn_act_scale):
    problem, cfg, train_idx, val_groups, _ = _linear_problem(learn_act_scale=learn_act_scale)
    theta = _theta(problem, cfg)
    assert ("weight_quantizer.alpha" in theta) and (("act_quantizer.scale" in theta) == learn_act_scale)
    scores = torch.randn(len(train_idx), generator=_gen(3), dtype=torch.float64).requires_grad_(True)
    batch = torch.tensor([0, 2, 3, 5, 5])  # a repeated sample counts twice
    l_val, info = meta_objective(problem, scores, batch, train_idx, val_groups, cfg, theta)
    scores = scores.detach()

    # the same quantities written out step by step
    omega_b = (len(scores) * torch.softmax(scores, 0))[batch].clone().requires_grad_(True)
    x, y = problem.inputs.args[0], problem.targets
    names = list(theta)
    losses = per_sample_loss(functional_call(problem.unit, theta, (x[train_idx[batch]],)), y[train_idx[batch]])
    inner = (omega_b * losses).sum() / len(batch)
    grads = torch.autograd.grad(inner, [theta[k] for k in names], create_graph=True)
    theta_new = {k: theta[k] - cfg.inner_lr * g for k, g in zip(names, grads)}
    lv = [per_sample_loss(functional_call(problem.unit, theta_new, (x[v],)), y[v]).mean() for v in val_groups]
    gs = [torch.autograd.grad(l, omega_b, retain_graph=True)[0] for l in lv]
    expected = _double_loop_gm(gs) + sum(lv)
    assert l_val.item() == pytest.approx(expected.item(), rel=1e-10)
    assert info["l_val"] == pytest.approx(l_val.item())
    assert info["l_gm"] == pytest.approx(_double_loop_gm(gs).item(), rel=1e-8, abs=1e-300)
    assert info["l_gm"] != 0.0  # the virtual step makes validation losses depend on omega


def test_meta_gradient_matches_finite_differences():
    """d L_VAL / d s by autograd (second order, through the virtual step) against central differences,
    in float64. The activation step size stays fixed (learn_act_scale=False): the function of a
    learned step is piecewise constant in its rounding, whose STE derivative is not the true one."""
    problem, cfg, train_idx, val_groups, _ = _linear_problem(groups=3, n_train=9, conflict=0.5, inner_lr=5.0)
    theta = _theta(problem, cfg)
    scores0 = 0.3 * torch.randn(len(train_idx), generator=_gen(7), dtype=torch.float64)
    batch = torch.tensor([0, 1, 4, 6, 8, 4])

    def objective(s):
        return meta_objective(problem, s.requires_grad_(True), batch, train_idx, val_groups, cfg, theta)[0]

    s = scores0.clone().requires_grad_(True)
    l_val, info = meta_objective(problem, s, batch, train_idx, val_groups, cfg, theta)
    (grad,) = torch.autograd.grad(l_val, s)
    assert abs(info["l_gm"]) > 1e-4  # the gradient-matching term is not negligible here
    eps = 1e-4
    fd = torch.zeros_like(scores0)
    for i in range(len(scores0)):
        e = torch.zeros_like(scores0)
        e[i] = eps
        fd[i] = (objective(scores0 + e).detach() - objective(scores0 - e).detach()) / (2 * eps)
    assert grad.abs().max() > 1e-6
    assert torch.allclose(grad, fd, rtol=1e-3, atol=1e-3 * fd.abs().max().item()), (grad, fd)
    # scores outside the minibatch still get gradient through the softmax normalisation
    assert grad[2].abs() > 0 and fd[2].abs() > 0


def test_learned_scores_change_when_groups_conflict():
    problem, cfg, train_idx, val_groups, group = _linear_problem(conflict=0.5, groups=2, n_train=12,
                                                                 val_per_group=3, learn_act_scale=True)
    params = [p for ps in problem.trainable_params(cfg).values() for p in ps]
    # the two groups pull theta in conflicting directions
    train_groups = [train_idx[group[train_idx] == g] for g in range(2)]
    cos = cosine_matrix(group_gradients(problem, params, train_groups, batch_size=4))
    assert cos[0, 1] < 0
    theta_before = {k: v.detach().clone() for k, v in problem.named_trainable(cfg).items()}
    flags = {k: v.requires_grad for k, v in problem.named_trainable(cfg).items()}
    scores, history = learn_scores(problem, torch.zeros(len(train_idx)), train_idx, val_groups, cfg, _gen(0),
                                   progress=False)
    assert len(history) == cfg.meta_iters and all("l_val" in h and "l_gm" in h for h in history)
    assert scores.shape == (len(train_idx),) and not scores.requires_grad
    assert not torch.allclose(scores, torch.zeros_like(scores))
    omega = sample_weights(scores, cfg.tau)
    assert not torch.allclose(omega, torch.ones_like(omega), atol=1e-3)
    assert omega.sum().item() == pytest.approx(len(train_idx), rel=1e-6)
    # theta itself is not changed, and its requires_grad flags are restored
    for k, v in problem.named_trainable(cfg).items():
        assert torch.equal(v.detach(), theta_before[k]) and v.requires_grad == flags[k]


def test_learn_scores_zero_iterations_keeps_scores():
    problem, cfg, train_idx, val_groups, _ = _linear_problem()
    init = torch.randn(len(train_idx), generator=_gen(1), dtype=torch.float64)
    scores, history = learn_scores(problem, init, train_idx, val_groups, cfg.replace(meta_iters=0), _gen(0),
                                   progress=False)
    assert history == [] and torch.equal(scores, init)


# ---------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------


def test_cosine_matrix_properties():
    g = torch.randn(4, 10, generator=_gen(0))
    g[2] = 3.0 * g[0]  # same direction
    g[3] = -0.5 * g[0]  # opposite
    cos = cosine_matrix(g)
    assert cos.shape == (4, 4)
    assert torch.allclose(cos, cos.T)
    assert torch.equal(cos.diagonal(), torch.ones(4))
    assert cos[0, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert cos[0, 3].item() == pytest.approx(-1.0, abs=1e-6)
    assert cos[2, 3].item() == pytest.approx(-1.0, abs=1e-6)
    assert torch.all(cos.abs() <= 1.0)
    expected = torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)
    assert cos[0, 1].item() == pytest.approx(expected.item(), abs=1e-6)
    # a zero row: 0 off the diagonal, 1 on it
    z = torch.cat([g[:2], torch.zeros(1, 10)])
    cz = cosine_matrix(z)
    assert torch.equal(cz[2, :2], torch.zeros(2)) and cz[2, 2] == 1
    assert mean_off_diagonal(cosine_matrix(torch.stack([g[0], g[2]]))) == pytest.approx(1.0, abs=1e-6)
    assert mean_off_diagonal(torch.ones(1, 1)) == 1.0


def test_group_gradients_match_direct_autograd():
    problem, cfg, train_idx, _, group = _linear_problem(groups=2, n_train=10, learn_act_scale=False)
    params = [problem.unit.weight_quantizer.alpha]
    groups = [train_idx[group[train_idx] == g] for g in range(2)]
    weights = [torch.rand(len(g), generator=_gen(i), dtype=torch.float64) for i, g in enumerate(groups)]
    rows = group_gradients(problem, params, groups, weights, batch_size=2)  # several batches per group
    assert rows.shape == (2, params[0].numel())
    for t, idx in enumerate(groups):
        loss = (weights[t] * problem.losses(idx)).mean()
        (g,) = torch.autograd.grad(loss, params[0])
        assert torch.allclose(rows[t].double(), g.flatten(), atol=1e-10)
    unweighted = group_gradients(problem, params, groups, batch_size=3)
    (g,) = torch.autograd.grad(problem.losses(groups[0]).mean(), params[0])
    assert torch.allclose(unweighted[0].double(), g.flatten(), atol=1e-10)


def test_per_step_loss_averages_per_timestep():
    torch.manual_seed(0)
    unit = QuantConv2d(nn.Conv2d(2, 2, 1), WeightQuantizer(4), ActQuantizer(8))
    x = torch.randn(12, 2, 3, 3, generator=_gen(0))
    targets = torch.randn(12, 2, 3, 3, generator=_gen(1))
    problem = UnitProblem("c", unit, UnitInputs((x,), {}), targets, torch.device("cpu"))
    step_index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    idx = torch.tensor([0, 1, 3, 4, 5, 6, 9, 10, 11])  # unequal counts per step, step 2 partly
    losses = problem.per_sample_losses(idx, 4)
    got = per_step_loss(problem, idx, step_index, batch_size=2)
    assert got.shape == (4,)
    for s in range(4):
        sel = step_index[idx] == s
        assert got[s].item() == pytest.approx(losses[sel].mean().item(), rel=1e-6)
    # a step with no samples reports 0, not NaN
    got = per_step_loss(problem, torch.tensor([0, 1, 9]), step_index)
    assert got[1] == 0 and got[2] == 0 and torch.isfinite(got).all()


# ---------------------------------------------------------------------------------------------
# end to end: gradient-aligned with no meta steps is the uniform baseline, bit for bit
# ---------------------------------------------------------------------------------------------

E2E = dict(weighting="gradient_aligned", weight_bits=4, act_bits=8, weight_init="minmax", num_inference_steps=4, num_calibration_timesteps=2,
           samples_per_timestep=4, calibration_batch_size=8, recon_iters=3, recon_batch_size=4, meta_batch_size=4,
           num_groups=2, val_fraction=0.25, seed=0)


def _quant_state(unet):
    out = {}
    for name, layer in quant_layers(unet):
        wq = layer.weight_quantizer
        out[name + ".codes"] = wq.codes.clone()
        out[name + ".scale"] = wq.scale.clone()
        out[name + ".zero_point"] = wq.zero_point.clone()
    for i, q in enumerate(act_quantizers(unet)):
        out[f"act{i}.scale"] = q.scale.detach().clone()
        out[f"act{i}.zero_point"] = q.zero_point.clone()
    return out


def random_reference_run():
    """A random-weight reference UNet (seed 0) in a DDIM pipeline, the E2E config and its calibration
    data: what the equal-weights-are-uniform tests calibrate both ways."""
    torch.manual_seed(0)
    pipe = DDIMPipeline(unet=UNet2DModel(**REFERENCE_UNET_CONFIG).eval(),
                        scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))
    base = GradientAlignedQuantizer(**E2E)
    data = collect_calibration_data(pipe.unet, pipe.scheduler.config, family_for(pipe.unet), base, progress=False)
    return pipe, base, data


def test_meta_iters_zero_is_exactly_uniform():
    pipe, base, data = random_reference_run()
    ga = quantize_pipeline(pipe, base.replace(weighting="gradient_aligned", meta_iters=0), calibration_data=data,
                           progress=False)
    uni = quantize_pipeline(pipe, base.replace(weighting="uniform", meta_iters=5), calibration_data=data,
                            progress=False)
    a, b = _quant_state(ga.unet), _quant_state(uni.unet)
    assert a.keys() == b.keys() and len(a) > 100
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for ua, ub in zip(ga.unet.gaq_report.units, uni.unet.gaq_report.units):
        assert torch.equal(ua.omega, torch.ones_like(ua.omega)) and torch.equal(ua.omega, ub.omega)
    x = torch.randn(2, 1, 32, 32, generator=_gen(0))
    t = torch.tensor([900, 20])
    with torch.no_grad():
        assert torch.equal(ga.unet(x, t).sample, uni.unet(x, t).sample)
