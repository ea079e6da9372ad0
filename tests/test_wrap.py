"""Wrapping real diffusers UNets (random weights, reference and google/ddpm-cifar10-32
architectures): coverage, exactness with quantization off, skip splits, reconstruction units."""

import copy

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from diffusers_gaq.config import GradientAlignedQuantizer
from diffusers_gaq.models import family_for
from diffusers_gaq.models.attention import QuantAttnProcessor
from diffusers_gaq.models.unet2d import UNet2DFamily
from diffusers_gaq.models.wrap import (
    act_quantizers,
    attention_cores,
    quant_layers,
    reconstruction_units,
    set_quant_state,
    wrap_model,
)
from diffusers_gaq.quant.layers import QuantAttentionCore, QuantConv2d, QuantLayer, QuantLinear
from diffusers_gaq.reference.recipe import DDPM_CIFAR10_32_CONFIG, REFERENCE_UNET_CONFIG

torch.set_num_threads(1)

CONFIGS = {"reference": (REFERENCE_UNET_CONFIG, 2), "cifar10": (DDPM_CIFAR10_32_CONFIG, 1)}


class Built:
    def __init__(self, cfg, batch):
        torch.manual_seed(0)
        self.cfg, self.batch = cfg, batch
        self.fp = UNet2DModel(**cfg).eval()
        self.wrapped = copy.deepcopy(self.fp)
        self.family = family_for(self.wrapped)
        # Every layer quantized, conv_in / conv_out included (by default they stay FP: first_last_precision).
        self.config = GradientAlignedQuantizer(first_last_precision="same")
        self.report = wrap_model(self.wrapped, self.config, self.family)


@pytest.fixture(scope="module", params=list(CONFIGS))
def built(request):
    cfg, batch = CONFIGS[request.param]
    return Built(cfg, batch)


@pytest.fixture(scope="module")
def ref():
    return Built(REFERENCE_UNET_CONFIG, 2)


def _inputs(cfg, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)
    t = torch.tensor([10, 900, 500][:batch])
    return x, t


def _linear_conv_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ---------------------------------------------------------------------------------------------


def test_every_conv_and_linear_is_wrapped(built):
    originals = _linear_conv_names(built.fp)
    assert len(originals) > 20
    wrapped = dict(quant_layers(built.wrapped))
    assert sorted(wrapped) == sorted(originals)
    assert sorted(built.report.layer_bits) == sorted(originals)
    assert built.report.kept_fp == []
    for name, layer in wrapped.items():
        orig = built.fp.get_submodule(name)
        cls = QuantConv2d if isinstance(orig, nn.Conv2d) else QuantLinear
        assert type(layer) is cls
        assert type(layer.layer) is type(orig)
        assert torch.equal(layer.weight, orig.weight)
        assert layer.weight_quantizer is not None and layer.act_quantizer is not None
        assert layer.weight_quantizer.bits == 4 and layer.act_quantizer.bits == 8
        assert built.report.layer_bits[name] == {"weight_bits": 4, "act_bits": 8}
        assert not layer.use_weight_quant and not layer.use_act_quant  # starts off
    # the only Conv2d / Linear left are the ones inside wrappers
    for name, m in built.wrapped.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert name.endswith(".layer") and isinstance(built.wrapped.get_submodule(name[: -len(".layer")]), QuantLayer)
    # conv_in, conv_out and the time-embedding layers included
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert name in wrapped


def test_attention_modules_get_quant_processor(built):
    attn_names = [n for n, m in built.fp.named_modules() if isinstance(m, Attention)]
    assert len(attn_names) >= 3  # down, mid and up attention
    assert sorted(built.report.attention) == sorted(attn_names)
    for name in attn_names:
        proc = built.wrapped.get_submodule(name).processor
        assert isinstance(proc, QuantAttnProcessor)
        assert isinstance(proc.core, QuantAttentionCore)
        assert proc.original_processor is not None and not isinstance(proc.original_processor, QuantAttnProcessor)
    assert len(attention_cores(built.wrapped)) == len(attn_names)


def test_unwrapped_output_is_exactly_the_original(built):
    x, t = _inputs(built.cfg, built.batch)
    with torch.no_grad():
        a = built.fp(x, t).sample
        b = built.wrapped(x, t).sample
    assert torch.equal(a, b)


def test_keep_fp_patterns(ref):
    model = copy.deepcopy(ref.fp)
    config = GradientAlignedQuantizer(keep_fp=("conv_out", "time_embedding.*", "down_blocks.1.attentions.*"),
                                      first_last_precision="same")
    report = wrap_model(model, config, family_for(model))
    expected_kept = [n for n in _linear_conv_names(ref.fp)
                     if n == "conv_out" or n.startswith("time_embedding.") or n.startswith("down_blocks.1.attentions.")]
    assert sorted(report.kept_fp) == sorted(expected_kept) and len(expected_kept) >= 4
    for name in expected_kept:
        assert type(model.get_submodule(name)) in (nn.Conv2d, nn.Linear)
    wrapped = [n for n, _ in quant_layers(model)]
    assert sorted(wrapped + report.kept_fp) == sorted(_linear_conv_names(ref.fp))
    # an attention module kept in FP keeps its original processor
    assert not isinstance(model.down_blocks[1].attentions[0].processor, QuantAttnProcessor)
    assert "down_blocks.1.attentions.0" not in report.attention
    assert isinstance(model.mid_block.attentions[0].processor, QuantAttnProcessor)
    # reconstruction units then never contain kept layers
    units = reconstruction_units(model, family_for(model))
    names = [n for n, _ in units]
    assert "conv_out" not in names and "time_embedding" not in names


def test_weight_only_and_no_split_configs(ref):
    model = copy.deepcopy(ref.fp)
    report = wrap_model(model, GradientAlignedQuantizer(act_bits=None), family_for(model))
    assert report.split_layers == {} and report.attention == []
    assert act_quantizers(model) == []
    assert all(layer.act_quantizer is None for _, layer in quant_layers(model))
    model = copy.deepcopy(ref.fp)
    report = wrap_model(model, GradientAlignedQuantizer(split_shortcut=False), family_for(model))
    assert report.split_layers == {}
    assert all(layer.split_quantizer is None for _, layer in quant_layers(model))


def _up_block_records(model, x, t):
    """For every up-block resnet: its actual input, the block's skip tensors and the tensor on the
    upsampled path that preceded the concatenation."""
    records, handles = {}, []
    for i, block in enumerate(model.up_blocks):
        def block_hook(mod, args, kwargs, i=i):
            names = ["hidden_states", "res_hidden_states_tuple", "temb"]
            bound = dict(zip(names, args))
            bound.update(kwargs)
            records[("block", i)] = (bound["hidden_states"], tuple(bound["res_hidden_states_tuple"]))
        handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
        for j, resnet in enumerate(block.resnets):
            def res_pre(mod, args, kwargs, i=i, j=j):
                records[("in", i, j)] = args[0] if args else kwargs["input_tensor"]
            def res_post(mod, args, kwargs, out, i=i, j=j):
                records[("out", i, j)] = out
            handles.append(resnet.register_forward_pre_hook(res_pre, with_kwargs=True))
            handles.append(resnet.register_forward_hook(res_post, with_kwargs=True))
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            def attn_post(mod, args, kwargs, out, i=i, j=j):
                records[("attn", i, j)] = out
            handles.append(attn.register_forward_hook(attn_post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(x, t)
    finally:
        for h in handles:
            h.remove()
    return records


def test_skip_splits_match_the_real_concatenation(built):
    splits = UNet2DFamily.skip_splits(built.fp)
    x, t = _inputs(built.cfg, 1)
    rec = _up_block_records(built.fp, x, t)
    checked = 0
    for i, block in enumerate(built.fp.up_blocks):
        hidden, skips = rec[("block", i)]
        assert len(skips) == len(block.resnets)
        has_attn = bool(getattr(block, "attentions", None))
        for j, resnet in enumerate(block.resnets):
            inp = rec[("in", i, j)]
            skip = skips[-1 - j]  # popped from the end
            if j == 0:
                path = hidden
            else:
                path = rec[("attn", i, j - 1)] if has_attn else rec[("out", i, j - 1)]
            split = splits[f"up_blocks.{i}.resnets.{j}.conv1"]
            assert inp.shape[1] == resnet.in_channels == path.shape[1] + skip.shape[1]
            assert split == path.shape[1]
            assert torch.equal(inp[:, :split], path)
            assert torch.equal(inp[:, split:], skip)
            if resnet.conv_shortcut is not None:
                assert splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] == split
            checked += 1
    assert checked == sum(len(b.resnets) for b in built.fp.up_blocks)
    # only up-block resnets' conv1 / conv_shortcut are split
    for name in splits:
        assert name.startswith("up_blocks.") and name.rsplit(".", 1)[1] in ("conv1", "conv_shortcut")
    # the wrapped layers use them
    assert built.report.split_layers == splits
    for name, split in splits.items():
        layer = built.wrapped.get_submodule(name)
        assert layer.split_at == split and layer.split_quantizer is not None
        assert layer.split_quantizer is not layer.act_quantizer
    unsplit = [layer for n, layer in quant_layers(built.wrapped) if n not in splits]
    assert all(layer.split_quantizer is None for layer in unsplit)


def test_split_input_quantizers_see_their_own_halves(ref):
    model = copy.deepcopy(ref.wrapped)
    name, split = next(iter(ref.report.split_layers.items()))
    layer = model.get_submodule(name)
    set_quant_state(model, weight=False, act=True)
    for q in act_quantizers(model):
        q.observing = True
    x, t = _inputs(ref.cfg, 1)
    seen = {}
    h = layer.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(x, t)
    h.remove()
    inp = seen["x"]
    assert layer.act_quantizer.running_min.item() == pytest.approx(inp[:, :split].min().item())
    assert layer.act_quantizer.running_max.item() == pytest.approx(inp[:, :split].max().item())
    assert layer.split_quantizer.running_min.item() == pytest.approx(inp[:, split:].min().item())
    assert layer.split_quantizer.running_max.item() == pytest.approx(inp[:, split:].max().item())


def test_reconstruction_units_cover_every_layer_once_in_execution_order(built):
    units = reconstruction_units(built.wrapped, built.family)
    names = [n for n, _ in units]
    assert len(names) == len(set(names))
    qnames = [n for n, _ in quant_layers(built.wrapped)]
    for q in qnames:
        owners = [u for u in names if q == u or q.startswith(u + ".")]
        assert len(owners) == 1, (q, owners)
    for u in names:  # no unit nested in another
        assert not any(u.startswith(v + ".") for v in names if v != u)
    for name, module in units:
        assert module is built.wrapped.get_submodule(name)
        assert isinstance(module, built.family.unit_types) or isinstance(module, QuantLayer)
    # execution order, observed independently
    order = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: order.append(n) if n not in order else None)
             for n, m in units]
    x, t = _inputs(built.cfg, 1)
    with torch.no_grad():
        built.wrapped(x, t)
    for h in hooks:
        h.remove()
    assert order == names
    assert names[0] == "time_embedding" and names[1] == "conv_in"
    assert names[-1] == "conv_out"
    resnets = [n for n, m in built.wrapped.named_modules() if isinstance(m, ResnetBlock2D)]
    assert set(resnets) <= set(names)
    # the model is left in eval mode and with quantization off
    assert not built.wrapped.training
    assert all(not layer.use_weight_quant for _, layer in quant_layers(built.wrapped))


def test_wrapping_twice_raises(ref):
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_model(ref.wrapped, GradientAlignedQuantizer(), ref.family)
    # attention processors alone also count as wrapped
    model = copy.deepcopy(ref.fp)
    wrap_model(model, GradientAlignedQuantizer(), family_for(model))
    with pytest.raises(ValueError):
        wrap_model(model, GradientAlignedQuantizer(keep_fp=("*",)), family_for(model))


def test_family_for_unsupported_models():
    with pytest.raises(TypeError, match="UNet2DModel"):
        family_for(nn.Sequential(nn.Conv2d(1, 1, 3)))
    # Class labels given as embedding vectors cannot be spread over classes (issue #8 supports
    # num_class_embeds and class_embed_type="timestep"; see test_families.py).
    cfg = dict(REFERENCE_UNET_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4, class_embed_type="identity")
    model = UNet2DModel(**cfg)
    with pytest.raises((TypeError, NotImplementedError), match="UNet2DModel"):
        family_for(model)
    assert family_for(UNet2DModel(**dict(cfg, class_embed_type=None))) is UNet2DFamily
    assert family_for(UNet2DModel(**dict(cfg, class_embed_type=None, num_class_embeds=10))) is UNet2DFamily


def test_quantization_switch_changes_and_restores_output(ref):
    model = copy.deepcopy(ref.wrapped)
    for _, layer in quant_layers(model):
        layer.weight_quantizer.calibrate(layer.layer.weight)
    x, t = _inputs(ref.cfg, 2)
    with torch.no_grad():
        fp = ref.fp(x, t).sample
        set_quant_state(model, weight=True, act=False)
        q = model(x, t).sample
        set_quant_state(model, weight=False, act=False)
        back = model(x, t).sample
    assert not torch.equal(q, fp)
    assert (q - fp).pow(2).mean() < fp.pow(2).mean()  # W4 noise, not garbage
    assert torch.equal(back, fp)


def test_quant_attention_processor_matches_original_math(ref):
    """With the core active but its quantizers uninitialised (identity), the re-implemented
    attention must compute what the original processor computes."""
    model = copy.deepcopy(ref.wrapped)
    for _, core in attention_cores(model):
        core.use_act_quant = True
    x, t = _inputs(ref.cfg, 2)
    with torch.no_grad():
        a = ref.fp(x, t).sample
        b = model(x, t).sample
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


def test_wrapped_model_can_be_moved_and_cast(ref):
    model = copy.deepcopy(ref.wrapped)
    model.to("cpu")
    model.to(torch.float64)
    fp = copy.deepcopy(ref.fp).to(torch.float64)
    x, t = _inputs(ref.cfg, 1)
    with torch.no_grad():
        assert torch.equal(model(x.double(), t).sample, fp(x.double(), t).sample)
