"""Issue 13's variants of the meta objective (calibration/weighting.py): the scale-free cosine form,
inner steps relative to the parameters, one weight per timestep. For each: equal weights are the
uniform baseline bit for bit, the meta gradient matches finite differences (float64), omega stays
positive and sums to its count."""

import itertools

import pytest
import torch

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.calibration.weighting import (
    gradient_matching_loss,
    inner_step_sizes,
    learn_scores,
    make_context,
    meta_objective,
    meta_terms,
    sample_weights,
    weights_of_samples,
)
from test_weighting import _gen, _linear_problem, _quant_state, _theta, random_reference_run

torch.set_num_threads(1)

VARIANTS = [dict(gradient_matching=g, inner_step=s, omega_granularity=o)
            for g, s, o in itertools.product(("dot", "cosine"), ("absolute", "relative", "adam"), ("sample", "timestep"))]


def _ids(v):
    return "-".join(v.values())


def _variant_problem(variant, **kw):
    problem, cfg, train_idx, val_groups, group = _linear_problem(**kw)
    # relative: a 20 % step (inner_lr is then a fraction); adam: weight_lr per AdaRound variable
    inner_lr = 0.2 if variant["inner_step"] == "relative" else cfg.inner_lr
    cfg = cfg.replace(inner_lr=inner_lr, weight_lr=0.3, **variant)
    score_index = group[train_idx] if variant["omega_granularity"] == "timestep" else None
    n_scores = cfg.num_groups if score_index is not None else len(train_idx)
    return problem, cfg, train_idx, val_groups, score_index, n_scores


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------


def test_cosine_gradient_matching_is_the_mean_pairwise_cosine():
    grads = [torch.randn(7, generator=_gen(i), dtype=torch.float64) for i in range(4)]
    cos = [torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0)
           for a in range(4) for b in range(a + 1, 4)]
    expected = -torch.stack(cos).mean()  # -2/(T(T-1)) * sum over the T(T-1)/2 pairs
    assert torch.allclose(gradient_matching_loss(grads, "cosine"), expected, atol=1e-12)
    # scale-free: rescaling the surrogate gradients (as a larger virtual step does) changes nothing
    scaled = [g * 1e-5 * (i + 1) for i, g in enumerate(grads)]
    assert torch.allclose(gradient_matching_loss(scaled, "cosine"), expected, atol=1e-12)
    assert not torch.allclose(gradient_matching_loss(scaled, "dot"), gradient_matching_loss(grads, "dot"))
    g = grads[0]
    assert gradient_matching_loss([g, 3 * g], "cosine").item() == pytest.approx(-1.0)
    assert gradient_matching_loss([g, -g], "cosine").item() == pytest.approx(1.0)
    zero = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    out = gradient_matching_loss([zero, g], "cosine")  # a group that does not depend on omega
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(zero.grad).all()
    with pytest.raises(ValueError, match="'dot' or 'cosine'"):
        gradient_matching_loss(grads, "cosines")


@pytest.mark.parametrize("s", [1, 3, 10])
def test_timestep_weights_are_shared_positive_and_sum_to_their_count(s):
    per_step = 4
    index = torch.arange(s).repeat_interleave(per_step)
    scores = torch.randn(s, generator=_gen(s), dtype=torch.float64) * 3
    omega = sample_weights(scores, 0.7)
    assert torch.all(omega > 0) and omega.sum().item() == pytest.approx(s, rel=1e-12)
    w = weights_of_samples(scores, 0.7, index)
    assert w.shape == (s * per_step,) and w.sum().item() == pytest.approx(s * per_step, rel=1e-12)
    for t in range(s):
        assert torch.all(w[index == t] == omega[t])
    assert torch.equal(weights_of_samples(torch.zeros(s), 1.0, index), torch.ones(s * per_step))
    assert torch.equal(weights_of_samples(scores, 0.7), sample_weights(scores, 0.7))


@pytest.mark.parametrize("inner_step", ["absolute", "relative", "adam"])
def test_inner_step_sizes_set_the_virtual_step_length(inner_step):
    variant = dict(gradient_matching="dot", inner_step=inner_step, omega_granularity="sample")
    problem, cfg, train_idx, _, _, _ = _variant_problem(variant, learn_act_scale=True)
    theta = _theta(problem, cfg)
    probe = torch.tensor([0, 3, 5, 6])
    etas = inner_step_sizes(problem, theta, train_idx, cfg, probe)
    assert set(etas) == set(theta) == {"weight_quantizer.alpha", "act_quantizer.scale"}
    grads = torch.autograd.grad(problem.losses(train_idx[probe], theta).mean(), list(theta.values()))
    for (name, p), g in zip(theta.items(), grads):
        length = etas[name] * g.norm().item()
        if inner_step == "absolute":
            assert etas[name] == cfg.inner_lr
        elif inner_step == "relative":
            assert length == pytest.approx(cfg.inner_lr * p.detach().norm().item(), rel=1e-9)
        elif name == "weight_quantizer.alpha":  # Adam's first step moves every element by its rate
            assert length == pytest.approx(cfg.weight_lr * p.numel() ** 0.5, rel=1e-9)
        else:
            assert length == pytest.approx(cfg.act_lr * p.detach().abs().mean().item() * p.numel() ** 0.5, rel=1e-9)


def test_cosine_form_balance_does_not_depend_on_the_inner_step():
    """With raw dot products the gradient-matching term's share of the score gradient falls with
    inner_lr squared; with cosines (and relative validation losses) it stays the same."""
    def share(form, inner_lr):
        variant = dict(gradient_matching=form, inner_step="absolute", omega_granularity="sample")
        problem, cfg, train_idx, val_groups, _, n = _variant_problem(variant, groups=3, n_train=9, conflict=0.5)
        cfg = cfg.replace(inner_lr=inner_lr)
        theta = _theta(problem, cfg)
        s = (0.3 * torch.randn(n, generator=_gen(7), dtype=torch.float64)).requires_grad_(True)
        l_gm, l_v = meta_terms(problem, s, torch.tensor([0, 1, 4, 6, 8]), train_idx, val_groups, cfg, theta)
        (g_gm,) = torch.autograd.grad(l_gm, s, retain_graph=True)
        (g_v,) = torch.autograd.grad(l_v, s)
        return (g_gm.norm() / g_v.norm()).item()

    dot = share("dot", 1e-2) / share("dot", 1e-3)
    cosine = share("cosine", 1e-2) / share("cosine", 1e-3)
    assert dot == pytest.approx(100.0, rel=0.05)
    assert cosine == pytest.approx(1.0, rel=0.05)


# ---------------------------------------------------------------------------------------------
# every variant: finite differences, positivity and sums, equal weights = uniform
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_variant_meta_gradient_matches_finite_differences(variant):
    """d L_VAL / d s by autograd against central differences in float64 (fixed activation steps: a
    learned step's rounding has an STE derivative, not the true one)."""
    problem, cfg, train_idx, val_groups, score_index, n = _variant_problem(variant, groups=3, n_train=9,
                                                                          conflict=0.5, inner_lr=5.0)
    theta = _theta(problem, cfg)
    batch = torch.tensor([0, 1, 4, 6, 8, 4])
    context = make_context(problem, theta, train_idx, val_groups, cfg, batch, score_index)
    scores0 = 0.3 * torch.randn(n, generator=_gen(7), dtype=torch.float64)

    def objective(s):  # G_t = d L^V_t / d omega needs scores that require grad
        return meta_objective(problem, s.requires_grad_(True), batch, train_idx, val_groups, cfg, theta, context)

    s = scores0.clone().requires_grad_(True)
    l_val, info = objective(s)
    (grad,) = torch.autograd.grad(l_val, s)
    assert abs(info["l_gm"]) > 1e-4  # the gradient-matching term takes part
    eps = 1e-5
    fd = torch.zeros_like(scores0)
    for i in range(n):
        e = torch.zeros_like(scores0)
        e[i] = eps
        fd[i] = (objective(scores0 + e)[0].detach() - objective(scores0 - e)[0].detach()) / (2 * eps)
    assert grad.abs().max() > 1e-6
    assert torch.allclose(grad, fd, rtol=1e-4, atol=1e-4 * fd.abs().max().item()), (grad, fd)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_variant_learned_weights_positive_and_sum_to_their_count(variant):
    problem, cfg, train_idx, val_groups, score_index, n = _variant_problem(
        variant, conflict=0.5, groups=2, n_train=12, val_per_group=3, learn_act_scale=True)
    theta_before = {k: v.detach().clone() for k, v in problem.named_trainable(cfg).items()}
    scores, history = learn_scores(problem, torch.zeros(n, dtype=torch.float64), train_idx, val_groups, cfg, _gen(0), progress=False,
                                   score_index=score_index)
    assert len(history) == cfg.meta_iters and scores.shape == (n,)
    assert not torch.allclose(scores, torch.zeros_like(scores))  # the meta steps did learn something
    omega = sample_weights(scores, cfg.tau)
    assert torch.all(omega > 0) and omega.sum().item() == pytest.approx(n, rel=1e-9)
    w = weights_of_samples(scores, cfg.tau, score_index)
    assert torch.all(w > 0) and w.sum().item() == pytest.approx(len(train_idx), rel=1e-9)
    for k, v in problem.named_trainable(cfg).items():  # theta itself is not changed
        assert torch.equal(v.detach(), theta_before[k])


@pytest.fixture(scope="module")
def tiny_pipeline():
    pipe, base, data = random_reference_run()
    uniform = quantize_pipeline(pipe, base.replace(weighting="uniform"), calibration_data=data, progress=False)
    return pipe, base, data, _quant_state(uniform.unet)


# Two runs cover every option of the variants (the uniform run is shared; meta_iters=0 never reads
# them: test_weighting.py's test_meta_iters_zero_is_exactly_uniform).
@pytest.mark.parametrize("variant", [
    dict(gradient_matching="cosine", inner_step="adam", omega_granularity="timestep", carry_scores=True),
    dict(gradient_matching="dot", inner_step="relative", inner_lr=0.1, omega_granularity="sample"),
], ids=["cosine-adam-timestep-carry", "dot-relative-sample"])
def test_variant_with_equal_weights_is_exactly_uniform(tiny_pipeline, variant):
    """Meta steps that cannot move the scores (meta_lr=0): the whole meta path runs (inner steps,
    cosines, per-timestep scores, carried scores) and the quantized model is the uniform one, bit for bit."""
    pipe, base, data, uniform = tiny_pipeline
    ga = quantize_pipeline(pipe, base.replace(weighting="gradient_aligned", meta_iters=2, meta_lr=0.0, **variant),
                           calibration_data=data, progress=False)
    state = _quant_state(ga.unet)
    assert state.keys() == uniform.keys()
    for k in state:
        assert torch.equal(state[k], uniform[k]), k
    for unit in ga.unet.gaq_report.units:
        assert torch.equal(unit.omega, torch.ones_like(unit.omega))
    assert any(unit.meta_seconds > 0 for unit in ga.unet.gaq_report.units)  # the meta steps did run


def test_timestep_weights_in_calibrate_model(tiny_pipeline):
    pipe, base, data, _ = tiny_pipeline
    cfg = base.replace(omega_granularity="timestep", gradient_matching="cosine", inner_step="adam",
                       meta_iters=2, meta_lr=0.5)
    q = quantize_pipeline(pipe, cfg, calibration_data=data, progress=False)
    steps = data.step_index[data.train_indices]
    learned = 0
    for unit in q.unet.gaq_report.units:
        omega = unit.omega
        assert torch.all(omega > 0) and omega.sum().item() == pytest.approx(len(omega), rel=1e-5)
        for t in steps.unique():  # one weight per calibration timestep
            assert torch.all(omega[steps == t] == omega[steps == t][0])
        learned += not torch.allclose(omega, torch.ones_like(omega))
    assert learned > 0


def test_relative_inner_step_refuses_a_step_longer_than_the_parameters():
    with pytest.raises(ValueError, match="inner_lr.*fraction"):
        GradientAlignedQuantizer(inner_step="relative", inner_lr=2.0)
    cfg = GradientAlignedQuantizer(inner_step="relative", inner_lr=0.05, gradient_matching="cosine",
                                   omega_granularity="timestep")
    assert GradientAlignedQuantizer.from_dict(cfg.to_dict()) == cfg
    for name, bad in (("gradient_matching", "cos"), ("inner_step", "fixed"), ("omega_granularity", "step")):
        with pytest.raises(ValueError, match=name):
            GradientAlignedQuantizer(**{name: bad})
