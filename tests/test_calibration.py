"""Calibration data, unit capture, reconstruction and quantize_pipeline end to end, on a
random-weight UNet of the reference architecture (DESIGN.md sections 3-4)."""

import copy

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    UNet2DModel,
)
from torch import nn

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.calibration.capture import UnitInputs, capture_unit
from diffusers_gaq.calibration.data import (
    CalibrationData,
    calibration_step_positions,
    collect_calibration_data,
    trajectory_seed,
)
from diffusers_gaq.calibration.reconstruction import (
    UnitProblem,
    beta_schedule,
    harden,
    init_quantizers,
    per_sample_loss,
    reconstruct,
    start_rounding,
)
from diffusers_gaq.models import family_for
from diffusers_gaq.models.wrap import quant_layers, reconstruction_units, wrap_model
from diffusers_gaq.quant.layers import QuantConv2d, QuantLayer
from diffusers_gaq.quant.quantizers import ActQuantizer, WeightQuantizer, minmax_scale
from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG, REFERENCE_UNET_CONFIG

torch.set_num_threads(1)

# Tiny budget: 2 of 4 DDIM steps, 4 trajectories (1 held out per step), 2 groups, 2 iterations.
E2E = dict(weight_bits=4, act_bits=8, num_inference_steps=4, num_calibration_timesteps=2, samples_per_timestep=4,
           calibration_batch_size=8, recon_iters=2, recon_batch_size=4, meta_iters=2, meta_batch_size=4,
           num_groups=2, val_fraction=0.25, seed=0)
DATA = dict(num_inference_steps=6, num_calibration_timesteps=3, samples_per_timestep=5, val_fraction=0.2,
            num_groups=3, seed=3)


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(**REFERENCE_UNET_CONFIG).eval()


@pytest.fixture(scope="module")
def unet():
    return _unet()


@pytest.fixture(scope="module")
def family(unet):
    return family_for(unet)


@pytest.fixture(scope="module")
def data(unet, family):
    cfg = GradientAlignedQuantizer(calibration_batch_size=2, **DATA)
    return collect_calibration_data(unet, REFERENCE_SCHEDULER_CONFIG, family, cfg, progress=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,s", [(50, 10), (4, 2), (10, 10), (100, 7), (7, 3), (2, 2)])
def test_uniform_positions_include_first_and_last(k, s):
    cfg = GradientAlignedQuantizer(num_inference_steps=k, num_calibration_timesteps=s, num_groups=1)
    pos = calibration_step_positions(cfg)
    assert len(pos) == s and len(set(pos)) == s and pos == sorted(pos)
    assert pos[0] == 0 and pos[-1] == k - 1
    gaps = [b - a for a, b in zip(pos, pos[1:])]
    assert max(gaps) - min(gaps) <= 1  # fixed intervals (up to rounding)


@pytest.mark.parametrize("k,s,seed", [(50, 10, 0), (50, 10, 1), (20, 20, 0), (100, 5, 7), (3, 2, 0)])
def test_normal_positions_distinct(k, s, seed):
    cfg = GradientAlignedQuantizer(num_inference_steps=k, num_calibration_timesteps=s, num_groups=1,
                                   timestep_schedule="normal", seed=seed)
    pos = calibration_step_positions(cfg)
    assert len(pos) == s and len(set(pos)) == s and pos == sorted(pos)
    assert 0 <= pos[0] and pos[-1] <= k - 1
    assert pos == calibration_step_positions(cfg)  # deterministic for a seed


def test_normal_positions_concentrate_in_the_middle():
    cfg = GradientAlignedQuantizer(num_inference_steps=1000, num_calibration_timesteps=50, num_groups=1,
                                   timestep_schedule="normal")
    pos = torch.tensor(calibration_step_positions(cfg), dtype=torch.float)
    assert abs(pos.mean().item() - 499.5) < 100
    assert ((pos > 250) & (pos < 750)).float().mean() > 0.5


def test_data_shapes_and_timesteps_in_sampling_order(data):
    cfg = GradientAlignedQuantizer(**DATA)
    s, n = DATA["num_calibration_timesteps"], DATA["samples_per_timestep"]
    assert len(data) == s * n
    assert data.samples.shape == (s * n, 1, 32, 32) and data.samples.dtype == torch.float32
    for name in ("timesteps", "step_index", "group", "is_val"):
        assert getattr(data, name).shape == (s * n,)
    assert data.is_val.dtype == torch.bool
    assert torch.equal(data.step_index, torch.arange(s).repeat_interleave(n))
    sched = DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    sched.set_timesteps(DATA["num_inference_steps"])
    expected = sched.timesteps[calibration_step_positions(cfg)]
    per_step = torch.stack([data.timesteps[data.step_index == i][0] for i in range(s)])
    assert torch.equal(per_step, expected.long())
    assert torch.all(per_step[1:] < per_step[:-1])  # noisiest first
    for i in range(s):  # one timestep per step
        assert torch.unique(data.timesteps[data.step_index == i]).numel() == 1
    assert torch.isfinite(data.samples).all()
    data.check(1, 32)


def test_data_follow_the_ddim_trajectory(unet, data):
    """Sample j at the first kept step is its seeded initial noise; later kept steps are what DDIM
    (eta = 0) with the FP UNet produces from it."""
    cfg = GradientAlignedQuantizer(**DATA)
    n, pos = DATA["samples_per_timestep"], calibration_step_positions(cfg)
    sched = DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG)
    sched.set_timesteps(DATA["num_inference_steps"])
    for j in (0, n - 1):
        x = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(trajectory_seed(cfg.seed, j)))[None]
        kept = []
        with torch.no_grad():
            for p, t in enumerate(sched.timesteps):
                if p in pos:
                    kept.append(x[0].clone())
                x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        assert torch.equal(data.samples[j], kept[0])
        for i in range(1, len(pos)):
            # batched vs single-sample convolutions differ in the last bits on CPU
            assert torch.allclose(data.samples[i * n + j], kept[i], atol=2e-4)
    # different trajectories differ
    assert not torch.equal(data.samples[0], data.samples[1])


def test_val_split_equal_per_timestep_disjoint_and_covering(data):
    cfg = GradientAlignedQuantizer(**DATA)
    s, n, v = DATA["num_calibration_timesteps"], DATA["samples_per_timestep"], cfg.val_per_timestep
    assert v == 1
    train, val = data.train_indices, data.val_indices
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert sorted(train.tolist() + val.tolist()) == list(range(s * n))
    for i in range(s):
        at = data.step_index == i
        assert int((at & data.is_val).sum()) == v
        assert int((at & ~data.is_val).sum()) == n - v
    # the same trajectories are held out at every step
    traj = val % n
    assert torch.unique(traj).numel() == v
    # groups: consecutive steps, T of them, every one with training and validation samples
    assert data.num_groups == DATA["num_groups"]
    assert torch.all(data.group[1:] >= data.group[:-1])
    groups = data.val_groups()
    assert len(groups) == DATA["num_groups"] and all(len(g) > 0 for g in groups)
    for g in range(data.num_groups):
        assert int(((data.group == g) & ~data.is_val).sum()) > 0


def test_groups_are_consecutive_steps():
    from diffusers_gaq.calibration.data import assign_splits

    cfg = GradientAlignedQuantizer(num_calibration_timesteps=10, num_groups=5, samples_per_timestep=20)
    step, group, is_val = assign_splits(cfg, 10, 20)
    per_step = torch.stack([group[step == i][0] for i in range(10)])
    assert per_step.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert int(is_val.sum()) == 10 * cfg.val_per_timestep


def test_data_do_not_depend_on_calibration_batch_size(unet, family, data):
    cfg = GradientAlignedQuantizer(calibration_batch_size=5, **DATA)
    other = collect_calibration_data(unet, REFERENCE_SCHEDULER_CONFIG, family, cfg, progress=False)
    for name in ("timesteps", "step_index", "group", "is_val"):
        assert torch.equal(getattr(other, name), getattr(data, name)), name
    # The seeded initial noise is bit-identical; later trajectory steps go through batched
    # convolutions whose CPU kernels round differently with the batch size (~1e-5), so they
    # agree to float precision rather than bit for bit.
    first = data.step_index == 0
    assert torch.equal(other.samples[first], data.samples[first])
    assert torch.allclose(other.samples, data.samples, atol=2e-4, rtol=0)


def test_check_rejects_bad_data(data):
    for bad in (float("nan"), float("inf")):
        samples = data.samples.clone()
        samples[4, 0, 3, 3] = bad
        broken = CalibrationData(samples, data.timesteps, data.step_index, data.group, data.is_val)
        with pytest.raises(ValueError, match="NaN"):
            broken.check()
    with pytest.raises(ValueError, match="channels"):
        data.check(in_channels=3)
    with pytest.raises(ValueError):
        data.check(sample_size=64)
    # No validation samples is fine (uniform weighting needs none); no training samples is not.
    CalibrationData(data.samples, data.timesteps, data.step_index, data.group, torch.zeros_like(data.is_val)).check()
    with pytest.raises(ValueError, match="no training samples"):
        CalibrationData(data.samples, data.timesteps, data.step_index, data.group,
                        torch.ones_like(data.is_val)).check()
    with pytest.raises(ValueError, match="timesteps"):
        CalibrationData(data.samples, data.timesteps[:-1], data.step_index, data.group, data.is_val).check()


def test_save_load_round_trip(tmp_path, data):
    data.save(tmp_path / "calib.safetensors")
    back = CalibrationData.load(tmp_path / "calib.safetensors")
    for name in ("samples", "timesteps", "step_index", "group", "is_val"):
        assert torch.equal(getattr(back, name), getattr(data, name)), name


# Edge cases of the calibration set's shape. Each has one expected outcome: what the code does today.
def test_val_fraction_zero_is_usable(unet, family):
    """No held-out samples at all is accepted (uniform weighting needs none): every sample trains."""
    cfg = GradientAlignedQuantizer(num_inference_steps=2, num_calibration_timesteps=1, samples_per_timestep=2,
                                   num_groups=1, val_fraction=0.0, weighting="uniform")
    assert cfg.val_per_timestep == 0
    data = collect_calibration_data(unet, REFERENCE_SCHEDULER_CONFIG, family, cfg, progress=False)
    assert data.samples.shape == (2, 1, 32, 32)
    assert not data.is_val.any()
    data.check()


def test_single_sample_per_timestep_is_refused_up_front():
    """Any held-out fraction holds out at least one sample per timestep; with one sample per timestep
    nothing would be left to train on, so the config itself is refused, naming the field."""
    with pytest.raises(ValueError, match=r"val_fraction=0\.05 is invalid: expected small enough to leave training "
                                         r"samples: 1 of samples_per_timestep=1 would be held out per timestep"):
        GradientAlignedQuantizer(num_inference_steps=2, num_calibration_timesteps=1, samples_per_timestep=1,
                                 num_groups=1, val_fraction=0.05)


def test_tuple_sample_size_is_usable():
    """A (height, width) sample_size is accepted by the family and sampled at that size."""
    unet = UNet2DModel(**dict(REFERENCE_UNET_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                              sample_size=(32, 32))).eval()
    family = family_for(unet)
    cfg = GradientAlignedQuantizer(num_inference_steps=2, num_calibration_timesteps=1, num_groups=1,
                                   samples_per_timestep=2, val_fraction=0.3)
    data = collect_calibration_data(unet, REFERENCE_SCHEDULER_CONFIG, family, cfg, progress=False)
    assert data.samples.shape == (2, 1, 32, 32)
    assert int(data.is_val.sum()) == cfg.val_per_timestep == 1  # round(0.3 * 2) held out


# ---------------------------------------------------------------------------------------------
# capture and losses
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wrapped(unet, family):
    model = copy.deepcopy(unet)
    wrap_model(model, GradientAlignedQuantizer(first_last_precision="same"), family)  # conv_out is a unit
    return model


@pytest.mark.parametrize("unit_name", ["down_blocks.1.resnets.0", "mid_block.attentions.0", "time_embedding",
                                       "conv_out", "up_blocks.1.resnets.0.conv1"])
def test_capture_unit_inputs_and_outputs(wrapped, family, data, unit_name):
    unit = wrapped.get_submodule(unit_name)
    idx = torch.tensor([0, 3, 4, 7, 8, 14])
    inputs = capture_unit(wrapped, unit, data, family, 4, "inputs", indices=idx)
    outputs = capture_unit(wrapped, unit, data, family, 4, "output", indices=idx)
    assert isinstance(inputs, UnitInputs) and len(inputs) == len(idx)
    assert outputs.shape[0] == len(idx) and outputs.device.type == "cpu"
    if isinstance(unit, nn.Module) and unit_name.endswith("resnets.0"):
        x, temb = inputs.args[0], (inputs.args[1] if len(inputs.args) > 1 else inputs.kwargs["temb"])
        assert x.shape == (len(idx), unit.in_channels, 16, 16) and temb.shape == (len(idx), 64)
        assert outputs.shape == (len(idx), unit.out_channels, 16, 16)
    if unit_name == "conv_out":
        assert outputs.shape == (len(idx), 1, 32, 32)
    if unit_name == "time_embedding":
        assert outputs.shape == (len(idx), 64)
    # running the unit on what was captured gives back what it produced inside the model
    args, kwargs = inputs.select(torch.arange(len(idx)))
    with torch.no_grad():
        again = unit(*args, **kwargs)
    assert torch.allclose(again, outputs, atol=1e-5)
    # a subset selects the right rows
    args2, _ = inputs.select(torch.tensor([2, 0]))
    assert torch.equal(args2[0], inputs.args[0][[2, 0]])
    with pytest.raises(ValueError):
        capture_unit(wrapped, unit, data, family, 4, "everything", indices=idx)


def test_capture_unit_batching_independent(wrapped, family, data):
    unit = wrapped.get_submodule("down_blocks.2.resnets.1")
    a = capture_unit(wrapped, unit, data, family, 3, "output")
    b = capture_unit(wrapped, unit, data, family, 15, "output")
    assert a.shape[0] == len(data) and torch.allclose(a, b, atol=1e-5)


def test_per_sample_loss_shapes_and_values():
    g = torch.Generator().manual_seed(0)
    out, tgt = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    loss = per_sample_loss(out, tgt)
    assert loss.shape == (5,)
    assert torch.allclose(loss, (out - tgt).pow(2).sum(1).mean((1, 2)))
    assert torch.allclose(per_sample_loss(out[:, :, 0, 0], tgt[:, :, 0, 0]), (out - tgt)[:, :, 0, 0].pow(2).sum(1))
    assert per_sample_loss(out[:, 0, 0, :2], tgt[:, 0, 0, :2]).shape == (5,)
    assert per_sample_loss(out, out).abs().max() == 0
    # Transformer layout [B, tokens, C]: channels summed, tokens averaged (not the other way round).
    tok, tok_t = out.flatten(2).transpose(1, 2), tgt.flatten(2).transpose(1, 2)  # [5, 16, 3]
    assert torch.allclose(per_sample_loss(tok, tok_t), loss)


# ---------------------------------------------------------------------------------------------
# reconstruction on a hand-made unit
# ---------------------------------------------------------------------------------------------


def _toy_problem(seed=0, n=48, bits=3):
    torch.manual_seed(seed)
    c1, c2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
    fp = nn.Sequential(c1, nn.SiLU(), c2).eval()
    unit = nn.Sequential(
        QuantConv2d(copy.deepcopy(c1), WeightQuantizer(bits), ActQuantizer(8)),
        nn.SiLU(),
        QuantConv2d(copy.deepcopy(c2), WeightQuantizer(bits), ActQuantizer(8)),
    ).requires_grad_(False)
    for p in unit.parameters():
        p.requires_grad_(False)
    x = torch.randn(n, 4, 6, 6, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        targets = fp(x)
    return UnitProblem("toy", unit, UnitInputs((x,), {}), targets, torch.device("cpu"))


def test_reconstruct_beats_round_to_nearest_on_toy_unit():
    problem = _toy_problem()
    cfg = GradientAlignedQuantizer(weight_bits=3, recon_iters=150, recon_batch_size=16, weight_lr=1e-2,
                                   act_lr=1e-3, seed=0)
    train = torch.arange(40)
    init_quantizers(problem, train, cfg)
    assert all(layer.use_weight_quant and layer.use_act_quant for layer in problem.layers)
    assert all(bool(q.initialized) for q in problem.act_quantizers())
    rtn = problem.mean_loss(train, 16)
    assert rtn > 0
    start_rounding(problem)
    assert problem.mean_loss(train, 16) < rtn  # the soft start is the FP weight (clipped), not RTN
    params = problem.trainable_params(cfg)
    assert len(params["rounding"]) == 2 and len(params["steps"]) == 2
    curve = reconstruct(problem, train, torch.ones(len(train)), cfg, torch.Generator().manual_seed(0),
                        progress=False)
    assert len(curve) == 150 and all(torch.isfinite(torch.tensor(curve)))
    harden(problem)
    assert all(layer.weight_quantizer.mode == "frozen" for layer in problem.layers)
    final = problem.mean_loss(train, 16)
    assert final < 0.9 * rtn, (rtn, final)
    assert not any(q.scale.requires_grad for q in problem.act_quantizers())  # switched back off


def test_reconstruct_is_deterministic_under_a_seed():
    outs = []
    for _ in range(2):
        problem = _toy_problem(seed=1)
        cfg = GradientAlignedQuantizer(weight_bits=3, recon_iters=10, recon_batch_size=8, seed=0)
        train = torch.arange(40)
        init_quantizers(problem, train, cfg)
        start_rounding(problem)
        reconstruct(problem, train, torch.ones(40), cfg, torch.Generator().manual_seed(5), progress=False)
        harden(problem)
        outs.append([layer.weight_quantizer.codes.clone() for layer in problem.layers])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def _minibatch_grads(problem, cfg, pick, num_shards=None):
    """Gradients of the omega-weighted minibatch loss, plain (num_shards None) or sharded."""
    from diffusers_gaq.calibration.reconstruction import sharded_backward

    train = torch.arange(40)
    omega = torch.linspace(0.5, 1.5, 40)
    params = [p for ps in problem.trainable_params(cfg).values() for p in ps]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    if num_shards is None:
        loss = (omega[pick] * problem.losses(train[pick])).sum() / len(pick)
        loss.backward()
        loss = loss.detach()
    else:
        loss = sharded_backward(problem, pick, train, omega, params, num_shards)
    return loss, [p.grad.clone() for p in params]


def test_sharded_backward_is_the_minibatch_gradient():
    problem = _toy_problem(seed=2)
    cfg = GradientAlignedQuantizer(weight_bits=3, recon_batch_size=7)
    init_quantizers(problem, torch.arange(40), cfg)
    start_rounding(problem)
    pick = torch.tensor([3, 17, 5, 5, 38, 0, 21])
    loss, ref = _minibatch_grads(problem, cfg, pick)
    for k in (1, 2, 3, 7):  # 7 shards of one sample each; 3 shards of uneven sizes
        loss_k, grads = _minibatch_grads(problem, cfg, pick, k)
        torch.testing.assert_close(loss_k, loss, rtol=1e-5, atol=0)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)  # float32 sums in another order
    # One shard is the plain backward pass, to the bit.
    assert all(torch.equal(g, r) for g, r in zip(_minibatch_grads(problem, cfg, pick, 1)[1], ref))
    # More shards than samples: the empty shards add nothing.
    _, grads = _minibatch_grads(problem, cfg, pick[:2], 5)
    _, ref2 = _minibatch_grads(problem, cfg, pick[:2])
    for g, r in zip(grads, ref2):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)  # float32 sums in another order


def test_reconstruct_with_grad_shards_is_deterministic_and_close_to_plain():
    def run(shards):
        problem = _toy_problem(seed=1)
        cfg = GradientAlignedQuantizer(weight_bits=3, recon_iters=10, recon_batch_size=8, grad_shards=shards, seed=0)
        init_quantizers(problem, torch.arange(40), cfg)
        start_rounding(problem)
        curve = reconstruct(problem, torch.arange(40), torch.ones(40), cfg, torch.Generator().manual_seed(5),
                            progress=False)
        return curve, [q.scale.detach().clone() for q in problem.act_quantizers()]

    a, b, plain = run(4), run(4), run(None)
    assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    torch.testing.assert_close(torch.tensor(a[0]), torch.tensor(plain[0]), rtol=1e-3, atol=0)


def test_reconstruct_zero_iterations_is_a_no_op():
    problem = _toy_problem()
    cfg = GradientAlignedQuantizer(recon_iters=0)
    init_quantizers(problem, torch.arange(8), cfg)
    start_rounding(problem)
    before = [layer.weight_quantizer.alpha.detach().clone() for layer in problem.layers]
    assert reconstruct(problem, torch.arange(8), torch.ones(8), cfg, torch.Generator()) == []
    assert all(torch.equal(a, layer.weight_quantizer.alpha) for a, layer in zip(before, problem.layers))


def test_beta_schedule_warmup_then_linear():
    cfg = GradientAlignedQuantizer(round_warmup=0.2, beta_start=20.0, beta_end=2.0)
    total = 100
    betas = [beta_schedule(i, total, cfg) for i in range(total)]
    assert all(b is None for b in betas[:20])
    assert all(b is not None for b in betas[20:])
    assert betas[20] == 20.0
    for i in range(20, total):
        assert betas[i] == pytest.approx(2.0 + 18.0 * (1 - (i - 20) / 80))
    steps = [betas[i] - betas[i + 1] for i in range(20, total - 1)]
    assert max(steps) == pytest.approx(min(steps))  # linear
    assert all(b >= 2.0 for b in betas[20:])
    assert beta_schedule(10_000, total, cfg) == 2.0  # clamped at the end value
    no_warm = GradientAlignedQuantizer(round_warmup=0.0)
    assert beta_schedule(0, 10, no_warm) == no_warm.beta_start


# ---------------------------------------------------------------------------------------------
# quantize_pipeline end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddim_pipe():
    return DDIMPipeline(unet=_unet(1), scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))


def _check_quantized_pipeline(pipe, qpipe, before, cls):
    assert type(qpipe) is cls and qpipe is not pipe
    assert isinstance(qpipe.unet, UNet2DModel) and qpipe.unet is not pipe.unet
    assert type(qpipe.unet).__name__ == "QuantizedUNet2DModel"
    layers = quant_layers(qpipe.unet)
    assert layers and all(l.weight_quantizer.mode == "frozen" and l.use_weight_quant and l.use_act_quant
                          for _, l in layers)
    # the caller's pipeline is untouched
    assert type(pipe.unet) is UNet2DModel
    assert not any(isinstance(m, QuantLayer) for m in pipe.unet.modules())
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert qpipe.scheduler is not pipe.scheduler
    images = qpipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
    assert images.shape == (2, 32, 32, 1)
    assert images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize("weighting", ["uniform", "gradient_aligned"])
def test_quantize_ddim_pipeline(ddim_pipe, weighting):
    before = _state(ddim_pipe.unet)
    # uniform: the default MSE weight init; gradient-aligned: min-max init and one meta step (time)
    extra = dict(weight_init="minmax", meta_iters=1) if weighting == "gradient_aligned" else {}
    cfg = GradientAlignedQuantizer(weighting=weighting, **dict(E2E, **extra))
    qpipe = quantize_pipeline(ddim_pipe, cfg, progress=False)
    _check_quantized_pipeline(ddim_pipe, qpipe, before, DDIMPipeline)
    report = qpipe.unet.gaq_report
    units = reconstruction_units(qpipe.unet, family_for(qpipe.unet))
    assert [u.name for u in report.units] == [n for n, _ in units]
    n_train = 6
    for u in report.units:
        assert u.omega.shape == (n_train,)
        assert torch.isfinite(torch.tensor([u.loss_init, u.loss_final])).all()
        assert u.omega.sum().item() == pytest.approx(n_train, rel=1e-5)
    if weighting == "uniform":
        assert all(torch.equal(u.omega, torch.ones(n_train)) for u in report.units)
    else:
        assert all(u.meta_seconds > 0 for u in report.units)
        assert any(not torch.allclose(u.omega, torch.ones(n_train)) for u in report.units)
    assert qpipe.unet.gaq_config.weighting == weighting


def test_quantize_ddpm_pipeline():
    pipe = DDPMPipeline(unet=_unet(2), scheduler=DDPMScheduler(**REFERENCE_SCHEDULER_CONFIG))
    before = _state(pipe.unet)
    cfg = GradientAlignedQuantizer(weighting="uniform", weight_init="minmax", **E2E)
    qpipe = quantize_pipeline(pipe, cfg, progress=False)
    _check_quantized_pipeline(pipe, qpipe, before, DDPMPipeline)
    assert isinstance(qpipe.scheduler, DDPMScheduler)


@pytest.fixture(scope="module")
def minmax_run(ddim_pipe):
    cfg = GradientAlignedQuantizer(method="minmax", weighting="uniform", **E2E)
    return quantize_pipeline(ddim_pipe, cfg, progress=False)


def test_minmax_method_runs(ddim_pipe, minmax_run):
    _check_quantized_pipeline(ddim_pipe, minmax_run, _state(ddim_pipe.unet), DDIMPipeline)
    for u in minmax_run.unet.gaq_report.units:
        # no reconstruction: the hardened model is round-to-nearest, as measured before
        assert u.loss_final == pytest.approx(u.loss_init, rel=1e-5, abs=1e-8)
        assert torch.equal(u.omega, torch.ones_like(u.omega))


def test_minmax_method_uses_minmax_weight_scales(minmax_run):
    for name, layer in quant_layers(minmax_run.unet):
        s, z = minmax_scale(layer.layer.weight, 4, per_channel=True)
        assert torch.allclose(layer.weight_quantizer.scale, s), name
        assert torch.equal(layer.weight_quantizer.zero_point, z), name


class _OtherPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)


def test_unsupported_pipelines_refused_before_any_work(ddim_pipe):
    before = _state(ddim_pipe.unet)
    other = _OtherPipeline(ddim_pipe.unet, ddim_pipe.scheduler)
    for bad in (object(), other, ddim_pipe.unet):
        with pytest.raises(TypeError) as e:
            quantize_pipeline(bad, GradientAlignedQuantizer(**E2E), progress=False)
        assert "DDIMPipeline" in str(e.value) and "DDPMPipeline" in str(e.value)
    assert not any(isinstance(m, QuantLayer) for m in ddim_pipe.unet.modules())
    after = ddim_pipe.unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_class_conditional_unet_refused_before_any_work():
    cfg = dict(REFERENCE_UNET_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4, num_class_embeds=10)
    pipe = DDIMPipeline(unet=UNet2DModel(**cfg), scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))
    with pytest.raises((TypeError, NotImplementedError), match="UNet2DModel"):
        quantize_pipeline(pipe, GradientAlignedQuantizer(**E2E), progress=False)


def test_bad_calibration_data_refused_before_any_work(ddim_pipe, data):
    samples = data.samples.clone()
    samples[0, 0, 0, 0] = float("nan")
    broken = CalibrationData(samples, data.timesteps, data.step_index, data.group, data.is_val)
    with pytest.raises(ValueError, match="NaN"):
        quantize_pipeline(ddim_pipe, GradientAlignedQuantizer(**E2E), calibration_data=broken, progress=False)
