"""The by-parts score gradient (calibration/meta_gradient.py) against autograd through the single
expression weighting.meta_objective: every variant, whole and in chunks, on a QuantLinear in float64
and on a real diffusers transformer block with quantized attention."""

import pytest
import torch
from test_bounded_memory import _attention_unit
from test_weighting import _gen, _theta
from test_weighting_variants import VARIANTS, _ids, _variant_problem

from diffusers_gaq import GradientAlignedQuantizer
from diffusers_gaq.calibration.capture import UnitInputs
from diffusers_gaq.calibration.meta_gradient import meta_chunk_size, meta_gradient
from diffusers_gaq.calibration.reconstruction import UnitProblem, init_quantizers, start_rounding
from diffusers_gaq.calibration.weighting import make_context, meta_objective

torch.set_num_threads(1)


def _reference(problem, scores, batch, train_idx, val_groups, cfg, theta, context):
    s = scores.clone().requires_grad_(True)
    l_val, info = meta_objective(problem, s, batch, train_idx, val_groups, cfg, theta, context)
    (grad,) = torch.autograd.grad(l_val, s)
    return grad, info


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
@pytest.mark.parametrize("groups", [1, 3])
def test_by_parts_equals_autograd_of_the_objective(variant, groups):
    problem, cfg, train_idx, val_groups, score_index, n_scores = _variant_problem(
        variant, groups=groups, n_train=9, val_per_group=3, conflict=0.5, inner_lr=5.0, learn_act_scale=True)
    theta = _theta(problem, cfg)
    batch = torch.tensor([0, 1, 4, 6, 8, 4])  # a repeated sample counts twice
    context = make_context(problem, theta, train_idx, val_groups, cfg, batch, score_index)
    scores = 0.3 * torch.randn(n_scores, generator=_gen(7), dtype=torch.float64)
    expected, info = _reference(problem, scores, batch, train_idx, val_groups, cfg, theta, context)
    # one score (a single timestep group, one weight per timestep) has a constant weight: zero gradient
    assert (expected.abs().max() > 1e-6) == (n_scores > 1)
    if groups > 1:
        assert abs(info["l_gm"]) > 1e-8  # the alignment term takes part
    for chunk in (None, 1, 4):
        grad, got = meta_gradient(problem, scores, batch, train_idx, val_groups, cfg, theta, context, chunk)
        assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-12 * max(expected.abs().max().item(), 1.0)), (chunk, grad, expected)
        assert got["l_val"] == pytest.approx(info["l_val"], rel=1e-10)
        assert got["l_gm"] == pytest.approx(info["l_gm"], rel=1e-8, abs=1e-300)
    assert not scores.requires_grad


def test_chunk_size_comes_from_the_unit_shapes():
    problem, *_ = _variant_problem(VARIANTS[0])
    small = meta_chunk_size(problem)
    assert small > 1000  # a 5 -> 3 linear layer: the whole minibatch in one pass
    problem.targets = torch.zeros(len(problem.targets), 64, 64, 320)  # a 64x64 x 320-channel unit output
    assert 1 <= meta_chunk_size(problem) < small


@pytest.mark.parametrize("variant", [VARIANTS[0], dict(gradient_matching="cosine", inner_step="adam",
                                                       omega_granularity="sample")], ids=_ids)
def test_by_parts_on_a_diffusers_attention_block(variant):
    """A diffusers Attention block with quantized projections and attention core (float32, chunked
    attention): AdaRound's V and all eight step sizes learned, three timestep groups."""
    unit = _attention_unit(8 * 6 * 6 * 4)  # one (sample, head) slice of the 6-token map per chunk
    x = torch.randn(12, 6, 16, generator=_gen(2))
    with torch.no_grad():
        targets = unit(x)
    problem = UnitProblem("attn", unit, UnitInputs((x,), {}), targets + 0.05 * torch.randn(targets.shape, generator=_gen(3)),
                          torch.device("cpu"))
    cfg = GradientAlignedQuantizer(num_calibration_timesteps=3, num_groups=3, meta_batch_size=6, inner_lr=2.0,
                                   weight_lr=0.3, **variant)
    train_idx, val_groups = torch.arange(6), [torch.tensor([6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11])]
    init_quantizers(problem, train_idx, cfg)
    start_rounding(problem)
    theta = _theta(problem, cfg)
    assert len(theta) == 12  # V of four layers, their four input steps, the core's q, k, v and probability steps
    batch = torch.tensor([0, 1, 2, 3, 4, 5])
    context = make_context(problem, theta, train_idx, val_groups, cfg, batch)
    scores = 0.3 * torch.randn(6, generator=_gen(4))
    expected, info = _reference(problem, scores, batch, train_idx, val_groups, cfg, theta, context)
    assert expected.abs().max() > 0
    for chunk in (None, 1, 4):
        grad, got = meta_gradient(problem, scores, batch, train_idx, val_groups, cfg, theta, context, chunk)
        assert torch.allclose(grad, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item()), (chunk, grad, expected)
        assert got["l_val"] == pytest.approx(info["l_val"], rel=1e-5)
