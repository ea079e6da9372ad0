"""Timestep-aware activation quantizers (TFMQ-DM's per-timestep calibration) and the activation
range initialisations: real diffusers UNets with random weights, real pipelines sampling."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.modeling import load_quantized
from diffusers_gaq.models.timestep_groups import TimestepGroups
from diffusers_gaq.quant.quantizers import ActQuantizer, fake_quantize
from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG, REFERENCE_UNET_CONFIG

torch.set_num_threads(1)

TINY = dict(num_inference_steps=6, num_calibration_timesteps=3, samples_per_timestep=4, num_groups=1,
            val_fraction=0.25, calibration_batch_size=8, recon_iters=2, recon_batch_size=8, meta_iters=0,
            weighting="uniform")
TEMPORAL = ("time_embedding.*", "*time_emb_proj", "conv_in")


def _pipe(seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(**dict(REFERENCE_UNET_CONFIG, layers_per_block=1)).eval()
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(REFERENCE_SCHEDULER_CONFIG))


@pytest.fixture(scope="module")
def quantized():
    pipe = _pipe()
    # conv_in quantized too (it is FP by default): the model input is the most timestep-dependent tensor.
    config = GradientAlignedQuantizer(weight_bits=8, act_bits=8, timestep_aware_acts=TEMPORAL, first_last_precision="w8a8",
                                      **TINY)
    return pipe, quantize_pipeline(pipe, config, progress=False)


def _tdq(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantizer) and m.timestep_aware]


def test_grouped_quantizer_uses_each_samples_group():
    q = ActQuantizer(4, num_groups=3)
    x = torch.randn(6, 5) * torch.tensor([1.0, 1.0, 4.0, 4.0, 0.2, 0.2])[:, None]
    q.group_index = torch.tensor([0, 0, 1, 1, 2, 2])
    q.observing = True
    q(x)
    q.finalize()
    assert q.scale.shape == (3,) and len(set(q.scale.tolist())) == 3  # one range per group
    y = q(x)
    for g in range(3):
        rows = slice(2 * g, 2 * g + 2)
        expect = fake_quantize(x[rows], q.scale[g].abs() + 1e-12, q.zero_point[g], 4)
        assert torch.equal(y[rows], expect)


def test_grouped_quantizer_needs_groups_and_every_group_observed():
    q = ActQuantizer(8, num_groups=2)
    q.observing = True
    with pytest.raises(RuntimeError, match="without a timestep group"):
        q(torch.randn(2, 3))
    q.group_index = torch.tensor([0, 0])
    q(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=r"timestep group\(s\) \[1\]"):
        q.finalize()


def test_uncalibrated_timestep_takes_the_nearest_group():
    groups = TimestepGroups([980, 500, 20], [0, 1, 2])
    assert groups.lookup(torch.tensor(740)).tolist() == [0]  # a tie goes to the larger timestep
    assert groups.lookup(torch.tensor([999, 980, 760, 700, 501, 300, 240, 0])).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert groups.lookup(torch.tensor(700)).tolist() == [1]  # a scalar timestep, as schedulers pass it
    assert TimestepGroups.from_dict(groups.to_dict()) == groups


def test_the_step_at_timestep_t_is_that_of_ts_group(quantized):
    _, qpipe = quantized
    unet = qpipe.unet
    groups = unet.gaq_timestep_groups
    assert groups is not None and groups.num_groups == 3
    names = [n for n, _ in _tdq(unet)]
    assert "conv_in.act_quantizer" in names and any("time_emb_proj" in n for n in names)
    assert any(n.startswith("time_embedding.linear_1") for n in names)
    assert not any(n.startswith("down_blocks.0.resnets.0.conv1") for n in names)  # not named: one step size
    x = torch.randn(2, 1, 32, 32)
    for g, t in zip(groups.groups, groups.timesteps):
        unet(x, t)
        assert all(m.group_index.tolist() == [g, g] for _, m in _tdq(unet))
    # A timestep between two calibrated ones gets the nearer one's step size: same output as at it.
    t0, t1 = groups.timesteps[0], groups.timesteps[1]
    near = t0 - (t0 - t1) // 4
    with torch.no_grad():
        assert torch.equal(unet(x, near).sample[:, :0], unet(x, t0).sample[:, :0])
        unet(x, near)
    assert all(m.group_index.tolist() == [groups.groups[0]] * 2 for _, m in _tdq(unet))


def test_groups_have_their_own_steps(quantized):
    _, qpipe = quantized
    q = qpipe.unet.get_submodule("conv_in.act_quantizer")
    assert q.scale.shape == (3,)
    # x_t's range shrinks from pure noise to the image as t goes down: the steps differ.
    assert len(set(q.scale.detach().tolist())) == 3


def test_reload_is_bit_exact_at_every_timestep(quantized, tmp_path):
    _, qpipe = quantized
    qpipe.unet.save_pretrained(tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", runtime="simulated")
    assert loaded.gaq_timestep_groups == qpipe.unet.gaq_timestep_groups
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for t in (999, 640, 333, 1):
            assert torch.equal(loaded(x, t).sample, qpipe.unet(x, t).sample)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpm"])
def test_schedulers_sample(quantized, scheduler):
    _, qpipe = quantized
    unet = qpipe.unet
    if scheduler == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(REFERENCE_SCHEDULER_CONFIG))
    elif scheduler == "ddpm":
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(REFERENCE_SCHEDULER_CONFIG))
    else:  # DPM-Solver visits timesteps the calibration never saw
        pipe = DDIMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(REFERENCE_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 1) and bool(torch.isfinite(torch.as_tensor(images)).all())


def test_quanto_export_refuses_timestep_aware_activations(quantized):
    from diffusers_gaq.quanto_export import export_to_quanto

    # Everything else in quanto's reach (4-bit weights, symmetric 8-bit activations, no attention
    # matmuls, no split inputs), so the timestep-aware quantizers are the one problem named.
    config = GradientAlignedQuantizer(weight_bits=4, act_bits=8, act_symmetric=True, quantize_attention=False,
                                      split_shortcut=False, timestep_aware_acts=TEMPORAL, **TINY)
    qpipe = quantize_pipeline(_pipe(), config, progress=False)
    with pytest.raises(ValueError, match="timestep-aware") as err:
        export_to_quanto(copy.deepcopy(qpipe.unet))
    assert "activations=False" in str(err.value)
    export_to_quanto(copy.deepcopy(qpipe.unet), activations=False)  # the weights alone export


@pytest.mark.parametrize("method", ["ema", "ema_shuffled", "minmax", "percentile", "mse"])
def test_every_activation_range_initialisation_runs(method):
    pipe = _pipe()
    config = GradientAlignedQuantizer(weight_bits=8, act_bits=8, method="minmax", act_range_init=method,
                                      **{**TINY, "recon_iters": 0})
    qpipe = quantize_pipeline(pipe, config, progress=False)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(qpipe.unet(x, 500).sample).all()


def test_range_methods_order():
    x = torch.cat([torch.randn(4000), torch.tensor([40.0, -30.0])])
    ranges = {}
    for method in ("minmax", "percentile", "mse", "ema"):
        q = ActQuantizer(4, range_method=method)
        q.observing = True
        for chunk in x.split(1000):
            q(chunk)
        q.finalize()
        ranges[method] = float(q.scale.detach())
    # min-max spans the outliers; the percentile and the MSE search clip them.
    assert ranges["percentile"] < ranges["minmax"] and ranges["mse"] < ranges["minmax"]
    assert ranges["minmax"] == pytest.approx(70 / 15, rel=1e-3)


def test_config_refuses_bad_timestep_settings():
    with pytest.raises(ValueError, match="act_timestep_groups"):
        GradientAlignedQuantizer(act_timestep_groups=50, num_calibration_timesteps=10)
    with pytest.raises(ValueError, match="timestep_aware_acts"):
        GradientAlignedQuantizer(timestep_aware_acts=[""])
    with pytest.raises(ValueError, match="act_range_init"):
        GradientAlignedQuantizer(act_range_init="max")
    c = GradientAlignedQuantizer(timestep_aware_acts=["conv_in"], act_timestep_groups=2)
    assert GradientAlignedQuantizer.from_dict(c.to_dict()) == c


def test_info_and_card_name_the_timestep_aware_layers(quantized, tmp_path, capsys):
    from diffusers_gaq.cli import main

    _, qpipe = quantized
    qpipe.unet.save_pretrained(tmp_path / "q")
    assert main(["info", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "timestep-aware (3 calibrated timesteps in 3 groups)" in out and "*time_emb_proj" in out
    card = (tmp_path / "q" / "README.md").read_text()
    assert "timestep-aware activations" in card and "`conv_in`" in card
