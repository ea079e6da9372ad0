"""Tests for diffusers_gaq.quanto_export: our codes/scales/zero points -> optimum-quanto modules.

Note: the first 2/4-bit test JIT-compiles quanto's C++ unpack extension if it was never built
in this environment (~30-60 s once).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from optimum.quanto import QConv2d, QLinear, qint8, quantization_map, requantize
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers_gaq.quanto_export import (
    requantize_exported,
    restore_input_only_activations,
    to_quanto_module,
)


def _channel(t, ndim):
    return t.reshape((-1,) + (1,) * (ndim - 1))


def make_codes(module, bits, seed, symmetric=False):
    """Random codes, positive scales and integer zero points for ``module``."""
    gen = torch.Generator().manual_seed(seed)
    out = module.weight.shape[0]
    w_int = torch.randint(0, 2**bits, module.weight.shape, generator=gen, dtype=torch.uint8)
    scale = torch.rand(out, generator=gen) * 0.05 + 0.005
    if symmetric:
        zero_point = torch.full((out,), float(2 ** (bits - 1)))
    else:
        zero_point = torch.randint(0, 2**bits, (out,), generator=gen).float()
    return w_int, scale, zero_point


def w_hat_of(w_int, scale, zero_point):
    return _channel(scale, w_int.dim()) * (w_int.float() - _channel(zero_point, w_int.dim()))


def act_fake_quant(x, act_scale, act_zero_point, bits=8):
    """Our activation quantizer (quant/quantizers.py fake_quantize); zero point None = symmetric signed."""
    s = torch.tensor(act_scale, dtype=torch.float32)
    if act_zero_point is None:
        return torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
    z = float(act_zero_point)
    return (torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z) * s


def reference_forward(module, x, w_hat):
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, w_hat, module.bias)
    return F.linear(x, w_hat, module.bias)


def assert_matches(y, ref):
    """The documented tolerance: float32 accumulation-order differences only."""
    assert type(y) is torch.Tensor, type(y)  # a plain tensor, not a quantized activation
    err = (y - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err


def conv_layer():
    torch.manual_seed(0)
    return nn.Conv2d(8, 16, 3, padding=1)


def linear_layer():
    torch.manual_seed(1)
    return nn.Linear(32, 24)


def layer_input(module, seed=5):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 8, 6, 6) if isinstance(module, nn.Conv2d) else (3, 5, 32)
    return torch.randn(shape, generator=gen)


LAYERS = {"conv": conv_layer, "linear": linear_layer}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_dequantizes_exactly_and_forward_matches(kind, bits):
    module = LAYERS[kind]()
    original = module.weight.detach().clone()
    w_int, scale, zero_point = make_codes(module, bits, seed=bits, symmetric=bits == 8)
    q = to_quanto_module(module, w_int, scale, zero_point, bits)
    assert isinstance(q, QConv2d if kind == "conv" else QLinear)
    assert q.frozen and q.weight_qtype.bits == bits and q.activation_qtype is None
    w_hat = w_hat_of(w_int, scale, zero_point)
    assert torch.equal(q.weight.dequantize(), w_hat)
    x = layer_input(module)
    assert_matches(q(x), reference_forward(module, x, w_hat))
    # The source layer is untouched and its bias is not shared.
    assert torch.equal(module.weight, original)
    assert q.bias.data_ptr() != module.bias.data_ptr()


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_zero_point", [None, 128])
def test_forward_with_input_quantization(kind, bits, act_zero_point):
    module = LAYERS[kind]()
    w_int, scale, zero_point = make_codes(module, bits, seed=10 + bits, symmetric=bits == 8)
    act_scale = 0.015  # randn inputs exceed 127 * 0.015, so clamping is exercised too
    q = to_quanto_module(module, w_int, scale, zero_point, bits, act_scale, act_zero_point, act_bits=8)
    assert q.activation_qtype == qint8
    assert torch.equal(q.input_scale, torch.tensor(act_scale, dtype=torch.float32))
    x = layer_input(module)
    x_hat = act_fake_quant(x, act_scale, act_zero_point)
    ref = reference_forward(module, x_hat, w_hat_of(w_int, scale, zero_point))
    assert_matches(q(x), ref)
    # Input quantization is really active (not a weight-only module).
    assert not torch.equal(ref, reference_forward(module, x, w_hat_of(w_int, scale, zero_point)))


@pytest.mark.parametrize(
    "make, group_size",
    [
        (lambda: nn.Linear(256, 8), 128),
        (lambda: nn.Conv2d(32, 8, 3), 96),  # in_features 288: quanto picks 96
        (lambda: nn.Linear(200, 8), None),  # no divisor in 128/96/64/32: per-axis
    ],
)
def test_int4_follows_quanto_group_size(make, group_size, tmp_path):
    torch.manual_seed(2)
    module = make()
    w_int, scale, zero_point = make_codes(module, 4, seed=3)
    q = to_quanto_module(module, w_int, scale, zero_point, 4)
    assert q.weight_group_size == group_size
    w_hat = w_hat_of(w_int, scale, zero_point)
    assert torch.equal(q.weight.dequantize(), w_hat)
    # requantize re-derives the group size from the shape and reloads the same weight.
    model = nn.Sequential(q)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    fresh = nn.Sequential(make())
    requantize(fresh, load_file(tmp_path / "m.safetensors"), quantization_map(model))
    assert torch.equal(fresh[0].weight.dequantize(), w_hat)


def _float_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, stride=2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 24),
        nn.SiLU(),
        nn.Linear(24, 10),
    )


def _export(model, with_act):
    """Replace the layers of ``model`` by quanto modules built from random codes (mixed bits)."""
    plan = {"0": (4, False), "2": (8, True), "4": (4, False), "6": (8, True)}
    for i, (name, (bits, symmetric)) in enumerate(plan.items()):
        layer = model.get_submodule(name)
        w_int, scale, zero_point = make_codes(layer, bits, seed=100 + i, symmetric=symmetric)
        act = dict(act_scale=0.02 + 0.01 * i, act_zero_point=[None, 128][i % 2], act_bits=8) if with_act else {}
        setattr(model, name, to_quanto_module(layer, w_int, scale, zero_point, bits, **act))
    return model


def _save_and_reload(model, tmp_path, reload):
    qmap = json.loads(json.dumps(quantization_map(model)))  # as it would be stored next to the weights
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = _float_model(seed=99)  # different float weights: everything must come from the file
    reload(fresh, load_file(tmp_path / "model.safetensors"), qmap)
    return fresh


def test_weight_only_model_survives_quanto_requantize(tmp_path):
    model = _export(_float_model(seed=0), with_act=False)
    x = torch.randn(2, 8, 6, 6)
    expected = model(x)
    fresh = _save_and_reload(model, tmp_path, requantize)
    assert quantization_map(fresh) == quantization_map(model)
    assert torch.equal(fresh(x), expected)


def test_input_quantized_model_survives_requantize_exported(tmp_path):
    model = _export(_float_model(seed=0), with_act=True)
    x = torch.randn(2, 8, 6, 6)
    expected = model(x)
    # Each layer equals the fake-quant reference, chained.
    h = x
    for layer in model:
        if isinstance(layer, (QConv2d, QLinear)):
            w = layer.weight.dequantize()
            # zero point None and 128 are the same quantizer (see test_forward_with_input_quantization).
            h_q = act_fake_quant(h, layer.input_scale.item(), None)
            h = layer._conv_forward(h_q, w, layer.bias) if isinstance(layer, QConv2d) else F.linear(h_q, w, layer.bias)
        else:
            h = layer(h)
    assert_matches(expected, h)

    fresh = _save_and_reload(model, tmp_path, requantize_exported)
    assert torch.equal(fresh(x), expected)
    assert restore_input_only_activations(fresh) == ["0", "2", "4", "6"]  # idempotent
    assert torch.equal(fresh(x), expected)


def test_plain_quanto_reload_of_input_quantized_model_is_loud(tmp_path):
    """Plain requantize restores quanto's own hooks (output quantization); the NaN marker shows it."""
    model = _export(_float_model(seed=0), with_act=True)
    fresh = _save_and_reload(model, tmp_path, requantize)
    out = fresh(torch.randn(2, 8, 6, 6))
    assert torch.isnan(out.dequantize() if hasattr(out, "dequantize") else out).all()


# ----------------------------------------------------------------------------- unexpressible cases


def test_eight_bit_asymmetric_weights_raise():
    module = linear_layer()
    w_int, scale, _ = make_codes(module, 8, seed=0)
    w_int[:, 0], w_int[:, 1] = 0, 255  # every channel uses its full code range
    zero_point = torch.full((24,), 100.0)
    with pytest.raises(ValueError, match="symmetric"):
        to_quanto_module(module, w_int, scale, zero_point, 8)


def test_eight_bit_asymmetric_zero_point_within_int8_is_exact():
    module = linear_layer()
    gen = torch.Generator().manual_seed(0)
    zero_point = torch.randint(90, 160, (24,), generator=gen).float()
    w_int = (zero_point[:, None] + torch.randint(-128, 96, (24, 32), generator=gen)).clamp(0, 255).to(torch.uint8)
    scale = torch.rand(24, generator=gen) * 0.01 + 0.001
    q = to_quanto_module(module, w_int, scale, zero_point, 8)
    assert torch.equal(q.weight.dequantize(), w_hat_of(w_int, scale, zero_point))


@pytest.mark.parametrize(
    "act, match",
    [
        (dict(act_scale=0.02, act_zero_point=0, act_bits=8), "asymmetric"),  # unsigned (e.g. softmax)
        (dict(act_scale=0.02, act_zero_point=37, act_bits=8), "asymmetric"),
        (dict(act_scale=0.02, act_zero_point=None, act_bits=4), "qint8 only"),
        (dict(act_scale=0.02, act_zero_point=None, act_bits=None), "qint8 only"),
        (dict(act_scale=torch.tensor([0.1, 0.2]), act_zero_point=None, act_bits=8), "per tensor"),
        (dict(act_scale=-0.1, act_zero_point=None, act_bits=8), "> 0"),
        (dict(act_scale=None, act_zero_point=128, act_bits=8), "without act_scale"),
    ],
)
def test_unexpressible_activation_quantizers_raise(act, match):
    module = conv_layer()
    w_int, scale, zero_point = make_codes(module, 4, seed=0)
    with pytest.raises(ValueError, match=match):
        to_quanto_module(module, w_int, scale, zero_point, 4, **act)


def test_invalid_weight_arguments_raise():
    module = conv_layer()
    w_int, scale, zero_point = make_codes(module, 4, seed=0)
    with pytest.raises(ValueError, match="2, 4 and 8 bits"):
        to_quanto_module(module, w_int, scale, zero_point, 3)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        to_quanto_module(module, w_int, scale, zero_point + 16, 4)  # zero point outside the code range
    with pytest.raises(ValueError, match="integer values"):
        to_quanto_module(module, w_int, scale, zero_point + 0.5, 4)
    with pytest.raises(ValueError, match="max=255"):
        to_quanto_module(module, w_int.clone().fill_(255), scale, zero_point, 4)
    with pytest.raises(ValueError, match="shape"):
        to_quanto_module(module, w_int[:, :4], scale, zero_point, 4)
    with pytest.raises(ValueError, match="per output channel"):
        to_quanto_module(module, w_int, scale[:5], zero_point, 4)
    with pytest.raises(ValueError, match="float32"):
        to_quanto_module(conv_layer().half(), w_int, scale, zero_point, 4)
    with pytest.raises(TypeError):
        to_quanto_module(nn.Conv1d(8, 16, 3), w_int[..., 0], scale, zero_point, 4)
