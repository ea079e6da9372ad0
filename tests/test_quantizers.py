"""Numerics of diffusers_gaq.quant.quantizers: fake quantization, scale search, STE / LSQ
gradients, AdaRound, frozen codes and the activation quantizer (DESIGN.md section 3)."""

import math

import pytest
import torch

from diffusers_gaq.calibration.reconstruction import beta_schedule
from diffusers_gaq.config import GradientAlignedQuantizer
from diffusers_gaq.quant.layers import QuantAttentionCore
from diffusers_gaq.quant.quantizers import (
    GAMMA,
    ZETA,
    ActQuantizer,
    WeightQuantizer,
    fake_quantize,
    minmax_scale,
    mse_scale,
    round_ste,
    scale_from_range,
)

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand_weight(seed, shape=(8, 4, 3, 3), dtype=torch.float32):
    w = torch.randn(shape, generator=_gen(seed), dtype=torch.float64)
    # Channels with very different ranges and an outlier, as in real conv weights.
    w = w * torch.logspace(-2, 0, shape[0], dtype=torch.float64).reshape((-1,) + (1,) * (len(shape) - 1))
    w.view(-1)[3] = 4.0 * w.abs().max()
    return w.to(dtype)


def _view(t, like):
    return t.reshape((-1,) + (1,) * (like.dim() - 1)) if t.dim() == 1 else t


def _lp_error(w, scale, zp, bits, p=2.4):
    err = (fake_quantize(w, _view(scale, w), _view(zp, w), bits) - w).abs().pow(p)
    return err.flatten(1).sum(1) if scale.dim() == 1 else err.sum()


# ---------------------------------------------------------------------------------------------
# fake_quantize
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quant_error_bound_inside_range(bits, per_channel):
    w = _rand_weight(bits, dtype=torch.float64)
    scale, zp = minmax_scale(w, bits, per_channel=per_channel)
    s, z = _view(scale, w), _view(zp, w)
    lo, hi = s * (0 - z), s * (2**bits - 1 - z)
    # Points spread over (and beyond) the representable range of every channel.
    u = torch.rand(w.shape, generator=_gen(1), dtype=torch.float64)
    x = lo - 0.3 * (hi - lo) + 1.6 * (hi - lo) * u
    x_hat = fake_quantize(x, s, z, bits)
    inside = (x >= lo) & (x <= hi)
    assert inside.sum() > 0.5 * inside.numel() and (~inside).sum() > 0
    err = (x_hat - x).abs()
    bound = (s / 2).expand_as(x)
    assert torch.all(err[inside] <= bound[inside] * (1 + 1e-9))
    # Outside the range the output is the clip level.
    assert torch.allclose(x_hat[x < lo], lo.expand_as(x)[x < lo])
    assert torch.allclose(x_hat[x > hi], hi.expand_as(x)[x > hi])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quant_codes_are_integers_in_range(bits):
    scale, zp = torch.tensor(0.37, dtype=torch.float64), torch.tensor(float(2 ** (bits - 1) - 1), dtype=torch.float64)
    x = 0.37 * 2**bits * torch.randn(1000, generator=_gen(bits), dtype=torch.float64)
    codes = fake_quantize(x, scale, zp, bits) / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-9)
    codes = codes.round()
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    # With such a spread of inputs both clip levels are hit.
    assert codes.min() == 0 and codes.max() == 2**bits - 1


def test_fake_quant_represents_zero_exactly():
    for bits in (2, 4, 8):
        x = torch.randn(64, generator=_gen(bits)) * 3 + 1
        scale, zp = minmax_scale(x, bits, per_channel=False)
        assert fake_quantize(torch.zeros(3), scale, zp, bits).abs().max() == 0


# ---------------------------------------------------------------------------------------------
# scale_from_range / minmax_scale / mse_scale
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [minmax_scale, mse_scale])
@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_shapes_per_channel_and_per_tensor(fn, symmetric):
    w = _rand_weight(0)
    s, z = fn(w, 4, per_channel=True, symmetric=symmetric)
    assert s.shape == (w.shape[0],) and z.shape == (w.shape[0],)
    s, z = fn(w, 4, per_channel=False, symmetric=symmetric)
    assert s.shape == () and z.shape == ()
    lin = torch.randn(6, 5, generator=_gen(1))
    s, z = fn(lin, 8, per_channel=True, symmetric=symmetric)
    assert s.shape == (6,) and z.shape == (6,)
    assert torch.all(s > 0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_zero_point_is_half_range(bits):
    w = _rand_weight(bits)
    for fn in (minmax_scale, mse_scale):
        for per_channel in (True, False):
            _, z = fn(w, bits, per_channel=per_channel, symmetric=True)
            assert torch.all(z == 2 ** (bits - 1))
    _, z = scale_from_range(torch.tensor(-1.0), torch.tensor(3.0), bits, symmetric=True)
    assert z.item() == 2 ** (bits - 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_minmax_covers_range_and_integer_zero_point(bits):
    w = _rand_weight(bits, dtype=torch.float64)
    s, z = minmax_scale(w, bits, per_channel=True)
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 2**bits - 1
    # (max - min) / (2^b - 1) and a zero point rounded from -min/s.
    w_min, w_max = w.flatten(1).amin(1).clamp(max=0), w.flatten(1).amax(1).clamp(min=0)
    assert torch.allclose(s, (w_max - w_min) / (2**bits - 1))
    assert torch.equal(z, torch.round(-w_min / s).clamp(0, 2**bits - 1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_scale_never_worse_than_minmax(bits, per_channel, symmetric):
    for seed in range(3):
        w = _rand_weight(seed * 10 + bits)
        s_mm, z_mm = minmax_scale(w, bits, per_channel, symmetric)
        s_mse, z_mse = mse_scale(w, bits, per_channel, symmetric)
        e_mm, e_mse = _lp_error(w, s_mm, z_mm, bits), _lp_error(w, s_mse, z_mse, bits)
        assert torch.all(e_mse <= e_mm), (e_mse, e_mm)


@pytest.mark.parametrize("bits", [2, 4])
def test_mse_scale_clips_an_outlier(bits):
    w = torch.randn(1000, generator=_gen(0))
    w[0] = 20.0
    s_mm, z_mm = minmax_scale(w, bits, per_channel=False)
    s_mse, z_mse = mse_scale(w, bits, per_channel=False)
    assert s_mse < s_mm
    assert _lp_error(w, s_mse, z_mse, bits) < _lp_error(w, s_mm, z_mm, bits)


# ---------------------------------------------------------------------------------------------
# STE and LSQ gradients
# ---------------------------------------------------------------------------------------------


def test_round_ste_forward_rounds_and_gradient_is_one():
    x = torch.linspace(-3.7, 3.7, 101, dtype=torch.float64, requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), x.detach().round())
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.ones_like(x))
    # with an arbitrary upstream gradient the STE passes it through unchanged
    up = torch.randn(101, generator=_gen(0), dtype=torch.float64)
    (g,) = torch.autograd.grad(round_ste(x), x, up)
    assert torch.equal(g, up)


def _true_fake_quant(x, s, z, bits):
    return s * (torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_scale_gradient_matches_analytic_formula(bits):
    qmax = 2**bits - 1
    s0, z = 0.25, torch.tensor(float(2 ** (bits - 1) - 1), dtype=torch.float64)
    lo, hi = s0 * (0 - z.item()), s0 * (qmax - z.item())
    x = torch.cat([
        torch.linspace(lo + 0.01 * s0, hi - 0.01 * s0, 97, dtype=torch.float64),  # inside
        torch.tensor([lo - 3.0, lo - 0.7 * s0 - 1.0, hi + 0.9 * s0 + 1.0, hi + 5.0], dtype=torch.float64),  # clipped
    ])
    per_elem = []
    for xi in x:
        s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(fake_quantize(xi, s, z, bits), s)
        per_elem.append(g)
    got = torch.stack(per_elem)
    v = x / s0
    code = torch.round(v) + z
    expected = torch.where(code < 0, 0 - z, torch.where(code > qmax, qmax - z, torch.round(v) - v))
    assert torch.allclose(got, expected, atol=1e-12), (got - expected).abs().max()
    # summed over a tensor, the gradient is the sum of the per-element formula (LSQ, no grad scale)
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fake_quantize(x, s, z, bits).sum(), s)
    assert torch.allclose(g, expected.sum(), atol=1e-10)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradient_matches_finite_differences_when_clipped(bits):
    qmax = 2**bits - 1
    z = torch.tensor(3.0 if bits > 2 else 1.0, dtype=torch.float64)
    s0 = 0.1
    lo, hi = s0 * (0 - z.item()), s0 * (qmax - z.item())
    x = torch.tensor([lo - 1.0, lo - 0.5, hi + 0.5, hi + 2.0], dtype=torch.float64)
    eps = 1e-6
    fd = (_true_fake_quant(x, s0 + eps, z, bits) - _true_fake_quant(x, s0 - eps, z, bits)) / (2 * eps)
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda sc: fake_quantize(x, sc, z, bits), s)
    assert torch.allclose(jac, fd, atol=1e-7), (jac, fd)
    assert torch.allclose(jac, torch.tensor([-z, -z, qmax - z, qmax - z], dtype=torch.float64))


def test_act_quantizer_scale_receives_lsq_gradient():
    aq = ActQuantizer(4)
    aq.observe(torch.tensor([-1.0, 2.0]))
    aq.finalize()
    x = torch.tensor([-3.0, -0.33, 0.1, 0.77, 5.0])
    aq(x).sum().backward()
    s, z = aq.scale.detach(), aq.zero_point
    v = x / s
    code = torch.round(v) + z
    expected = torch.where(code < 0, -z, torch.where(code > 15, 15 - z, torch.round(v) - v)).sum()
    assert torch.allclose(aq.scale.grad, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# WeightQuantizer: nearest, AdaRound, frozen
# ---------------------------------------------------------------------------------------------


def _calibrated(w, bits=4, init="mse", per_channel=True, symmetric=False):
    wq = WeightQuantizer(bits, per_channel=per_channel, symmetric=symmetric, init=init)
    wq.calibrate(w)
    return wq


def test_weight_quantizer_bits_validated():
    for bad in (1, 9, 0):
        with pytest.raises(ValueError):
            WeightQuantizer(bad)


@pytest.mark.parametrize("init", ["mse", "minmax"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_adaround_init_soft_weight_equals_weight(init, per_channel):
    w = _rand_weight(3)
    wq = _calibrated(w, 4, init, per_channel)
    s, z = _view(wq.scale, w), _view(wq.zero_point, w)
    alpha = wq.start_adaround(w)
    assert isinstance(alpha, torch.nn.Parameter) and alpha.shape == w.shape and wq.mode == "adaround"
    # h(V) is the rounding remainder (up to the 1e-4 clamp that keeps V finite)
    rest = w / s - torch.floor(w / s)
    assert torch.allclose(wq.soft_rounding(), rest.clamp(1e-4, 1 - 1e-4), atol=2e-5)
    soft = wq(w)
    lo, hi = s * (0 - z), s * (2**4 - 1 - z)
    clipped = w.clamp(lo, hi)  # the soft weight is w, clipped to the representable range
    inside = (w >= lo) & (w <= hi)
    assert inside.float().mean() > 0.5
    err = (soft - clipped).abs()
    assert torch.all(err <= 1e-4 * s.expand_as(w) * 1.5 + 1e-7)
    assert (soft - clipped).norm() <= 1e-4 * w.norm()
    assert torch.allclose(soft[~inside], clipped[~inside], rtol=1e-4, atol=1e-6)
    # differentiable w.r.t. V
    soft.sum().backward()
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0


def test_soft_rounding_formula():
    wq = WeightQuantizer(4)
    wq.alpha = torch.nn.Parameter(torch.linspace(-8, 8, 41))
    h = wq.soft_rounding()
    expected = torch.clamp(torch.sigmoid(wq.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
    assert torch.equal(h, expected)
    assert h.min() == 0 and h.max() == 1  # the rectified sigmoid reaches both ends


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_hardened_codes_are_floor_or_ceil(bits):
    w = _rand_weight(bits + 5)
    wq = _calibrated(w, bits)
    s, z = _view(wq.scale, w), _view(wq.zero_point, w)
    wq.start_adaround(w)
    with torch.no_grad():  # "trained" V: anything
        wq.alpha.copy_(3 * torch.randn(w.shape, generator=_gen(bits)))
    alpha = wq.alpha.detach().clone()
    wq.harden()
    assert wq.mode == "frozen" and wq.alpha is None and wq.w_floor is None
    assert wq.codes.dtype == torch.uint8 and wq.codes.shape == w.shape
    codes = wq.codes.long()
    fl = torch.floor(w / s)
    down = torch.clamp(fl + z, 0, 2**bits - 1).long()
    up = torch.clamp(fl + 1 + z, 0, 2**bits - 1).long()
    assert torch.all((codes == down) | (codes == up))
    # rounding direction: h(V) >= 0.5 (V >= 0) rounds up
    assert torch.equal(codes, torch.where(alpha >= 0, up, down))
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1


def test_harden_nearest_matches_nearest_forward_and_frozen_output():
    w = _rand_weight(11)
    wq = _calibrated(w, 4)
    nearest = wq(w)
    wq.harden(w)
    assert wq.mode == "frozen"
    s, z = _view(wq.scale, w), _view(wq.zero_point, w)
    frozen = wq(torch.zeros_like(w))  # the float weight is no longer consulted
    assert torch.equal(frozen, (wq.codes.float() - z) * s)
    assert torch.equal(frozen, nearest)
    with pytest.raises(ValueError):
        _calibrated(w, 4).harden()


def test_frozen_mode_output_from_loaded_codes():
    gen = _gen(4)
    codes = torch.randint(0, 16, (5, 3, 3, 3), generator=gen, dtype=torch.uint8)
    scale = torch.rand(5, generator=gen) + 0.1
    zp = torch.randint(0, 16, (5,), generator=gen).float()
    wq = WeightQuantizer(4)
    wq.load_codes(codes, scale, zp)
    out = wq(torch.randn(5, 3, 3, 3))
    assert torch.equal(out, scale.reshape(-1, 1, 1, 1) * (codes.float() - zp.reshape(-1, 1, 1, 1)))


def test_soft_weight_at_binary_h_equals_hardened_weight():
    w = _rand_weight(12)
    wq = _calibrated(w, 4)
    wq.start_adaround(w)
    with torch.no_grad():
        wq.alpha.copy_(torch.where(torch.randn(w.shape, generator=_gen(0)) > 0, 50.0, -50.0))
    soft = wq(w).detach()
    wq.harden()
    assert torch.allclose(wq(w), soft, rtol=0, atol=1e-6)


def test_regularizer_zero_when_binary_positive_otherwise():
    w = _rand_weight(13, shape=(4, 6))
    wq = _calibrated(w, 4)
    wq.start_adaround(w)
    with torch.no_grad():
        wq.alpha.copy_(torch.where(torch.arange(24).reshape(4, 6) % 2 == 0, 30.0, -30.0))
    for beta in (20.0, 11.0, 2.0):
        assert wq.regularizer(beta).item() == 0.0
    with torch.no_grad():
        wq.alpha.zero_()  # h = 0.5: each element contributes exactly 1
    for beta in (20.0, 2.0):
        assert wq.regularizer(beta).item() == pytest.approx(24.0)
    with torch.no_grad():
        wq.alpha[0, 0] = 0.3  # a single non-binary entry
        wq.alpha[wq.alpha != 0.3] = 30.0
    assert wq.regularizer(2.0).item() > 0


def test_regularizer_decreases_toward_binary_and_with_annealed_beta():
    wq = WeightQuantizer(4)
    # h from 0.5 toward 1: the regulariser falls monotonically at every beta
    h = torch.linspace(0.5, 1.0, 11)[:-1]
    wq.alpha = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (h - GAMMA) - 1))
    cfg = GradientAlignedQuantizer()
    total = 100
    betas = [b for b in (beta_schedule(i, total, cfg) for i in range(total)) if b is not None]
    assert betas[0] == cfg.beta_start and cfg.beta_end <= betas[-1] < cfg.beta_end + 0.5
    for beta in (betas[0], betas[len(betas) // 2], betas[-1]):
        per_elem = 1 - (2 * wq.soft_rounding() - 1).abs().pow(beta)
        assert torch.all(per_elem[1:] < per_elem[:-1] + 1e-7)
    # over the annealing, the regulariser of fixed non-binary h never increases: low beta
    # penalises middle values less and pulls only the undecided ones.
    regs = [wq.regularizer(b).item() for b in betas]
    assert all(b <= a + 1e-6 for a, b in zip(regs, regs[1:]))
    assert regs[-1] < regs[0]
    # and minimising it alone drives every h to {0, 1}
    w = _rand_weight(14, shape=(16, 8))
    wq = _calibrated(w, 4)
    wq.start_adaround(w)
    opt = torch.optim.Adam([wq.alpha], lr=0.5)
    start = wq.regularizer(2.0).item()
    for _ in range(200):
        opt.zero_grad()
        wq.regularizer(2.0).backward()
        opt.step()
    h = wq.soft_rounding()
    assert wq.regularizer(2.0).item() < 0.01 * start
    assert ((h == 0) | (h == 1)).float().mean() > 0.95


# ---------------------------------------------------------------------------------------------
# ActQuantizer
# ---------------------------------------------------------------------------------------------


def test_act_quantizer_ema_over_two_batches():
    aq = ActQuantizer(8, momentum=0.95)
    aq.observing = True
    a = torch.tensor([[-2.0, 1.0], [0.5, 3.0]])
    b = torch.tensor([[-1.0, 7.0], [0.0, 0.25]])
    assert torch.equal(aq(a), a)  # observing passes the input through
    assert aq.running_min.item() == -2.0 and aq.running_max.item() == 3.0
    assert torch.equal(aq(b), b)
    exp_min, exp_max = 0.95 * -2.0 + 0.05 * -1.0, 0.95 * 3.0 + 0.05 * 7.0
    assert aq.running_min.item() == pytest.approx(exp_min, abs=1e-6)
    assert aq.running_max.item() == pytest.approx(exp_max, abs=1e-6)
    aq.finalize()
    assert not aq.observing and bool(aq.initialized)
    s, z = scale_from_range(torch.tensor(exp_min), torch.tensor(exp_max), 8, False)
    assert aq.scale.item() == pytest.approx(s.item(), rel=1e-6)
    assert aq.zero_point.item() == z.item()
    assert aq.scale.item() == pytest.approx((exp_max - exp_min) / 255, rel=1e-6)
    # now it quantizes: 0 exact, error within half a step inside the range
    x = torch.linspace(exp_min, exp_max, 50)
    y = aq(x)
    assert aq(torch.zeros(2)).abs().max() == 0
    assert torch.all((y - x).abs() <= aq.scale.detach() / 2 + 1e-6)
    assert not torch.equal(y, x)


def test_act_quantizer_unobserved_and_uninitialised():
    aq = ActQuantizer(8)
    x = torch.randn(5)
    assert torch.equal(aq(x), x)  # not initialised: identity
    with pytest.raises(RuntimeError):
        aq.finalize()
    for bad in (1, 17):
        with pytest.raises(ValueError):
            ActQuantizer(bad)


@pytest.mark.parametrize("bits", [4, 8])
def test_unsigned_quantizer_for_softmax(bits):
    aq = ActQuantizer(bits, unsigned=True)
    aq.observing = True
    probs = torch.randn(4, 16, generator=_gen(bits)).softmax(-1)
    aq(probs)
    aq(torch.randn(4, 16, generator=_gen(bits + 1)).softmax(-1))
    aq.finalize()
    assert aq.zero_point.item() == 0
    assert aq.scale.item() == pytest.approx(aq.running_max.item() / (2**bits - 1), rel=1e-6)
    out = aq(torch.zeros(3, 5))
    assert torch.equal(out, torch.zeros(3, 5))  # exact zero
    q = aq(probs)
    assert q.min() >= 0  # never negative
    inside = probs <= aq.scale.detach() * (2**bits - 1)  # the EMA max may clip the largest values
    assert inside.float().mean() > 0.9
    assert torch.all((q - probs).abs()[inside] <= aq.scale.detach() / 2 + 1e-7)


def test_unsigned_quantizer_ignores_negative_observed_minimum():
    aq = ActQuantizer(8, unsigned=True)
    aq.observe(torch.tensor([-1.0, 2.0]))
    aq.finalize()
    assert aq.zero_point.item() == 0 and aq.scale.item() == pytest.approx(2.0 / 255)


def test_attention_core_prob_quantizer_is_unsigned():
    core = QuantAttentionCore(8)
    assert core.prob_quantizer.unsigned and not core.q_quantizer.unsigned
    assert len(core.act_quantizers()) == 4 and len({id(q) for q in core.act_quantizers()}) == 4


def test_symmetric_act_quantizer():
    aq = ActQuantizer(8, symmetric=True)
    aq.observe(torch.tensor([-1.0, 3.0]))
    aq.finalize()
    assert aq.zero_point.item() == 128
    assert aq.scale.item() == pytest.approx(max(1.0 / 128, 3.0 / 127), rel=1e-6)
    assert math.isclose(aq(torch.tensor([3.0])).item(), 3.0, rel_tol=1e-6)
