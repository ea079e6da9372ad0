"""The integer runtime's layers against the simulated (fake-quant) layers they replace: one real
oneDNN int8 call per case, no mocks. Equal up to float accumulation order on the oneDNN kernel (the
int32 sums are exact; the stated bound is relative to the output's magnitude), bit-identical on the
dequantizing kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_gaq.quant.layers import QuantConv2d, QuantLinear
from diffusers_gaq.quant.quantizers import ActQuantizer, WeightQuantizer
from diffusers_gaq.runtime import IntegerLayer, onednn_available, runtime_weight_nbytes, to_integer_runtime
from diffusers_gaq.runtime.kernels import signed_weight

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="oneDNN's int8 kernels are not exact or not present "
                                  "on this CPU / torch build")

# Relative to the output's largest magnitude: float32 accumulation over a few hundred products.
REL_BOUND = 1e-5


def _act_quantizer(x, bits, symmetric=False, groups=1, group_index=None):
    q = ActQuantizer(bits, symmetric=symmetric, range_method="minmax", num_groups=groups)
    q.observing = True
    q.group_index = group_index
    q(x)
    q.finalize()
    return q


def _frozen(layer, x, w_bits, a_bits=8, split_at=None, symmetric_w=False, groups=1, group_index=None,
            act=True):
    wq = WeightQuantizer(w_bits, symmetric=symmetric_w, init="mse")
    wq.calibrate(layer.weight)
    wq.harden(layer.weight)
    aq = sq = None
    if act:
        xa = x[:, :split_at] if split_at else x
        aq = _act_quantizer(xa, a_bits, groups=groups, group_index=group_index)
        if split_at:
            sq = _act_quantizer(x[:, split_at:] * 0 + x[:, split_at:] * 5, a_bits, groups=groups,
                                group_index=group_index)
    cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    q = cls(layer, wq, aq, split_at=split_at, split_quantizer=sq)
    q.use_weight_quant, q.use_act_quant = True, act
    return q


def _pair(qlayer, runtime):
    sim = nn.Sequential(qlayer)
    import copy

    run = copy.deepcopy(sim)
    report = to_integer_runtime(run, runtime)
    return sim, run, report


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _conv_input(seed=0, channels=32, batch=4, size=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g) * 2 + 0.5


@needs_onednn
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("kind", ["conv3x3", "conv1x1_stride2", "linear"])
def test_onednn_layer_equals_simulated(w_bits, kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(48, 40), torch.randn(3, 7, 48) * 3
    elif kind == "conv3x3":
        layer, x = nn.Conv2d(32, 24, 3, padding=1), _conv_input()
    else:
        layer, x = nn.Conv2d(32, 24, 1, stride=2), _conv_input()
    sim, run, report = _pair(_frozen(layer, x, w_bits), "onednn")
    assert list(report.kernels.values()) == ["onednn"]
    with torch.no_grad():
        a, b = run(x), sim(x)
    assert a.shape == b.shape
    assert _rel(a, b) < REL_BOUND


@needs_onednn
def test_eight_bit_asymmetric_codes_need_and_get_offsets():
    # A skewed weight: its asymmetric 8-bit codes minus their zero point span more than int8.
    torch.manual_seed(1)
    layer = nn.Conv2d(16, 8, 3, padding=1)
    layer.weight.data = layer.weight.data.abs() + 0.01
    layer.weight.data[:, 0, 0, 0] = -0.002
    x = _conv_input(channels=16)
    qlayer = _frozen(layer, x, 8)
    _, offset = signed_weight(qlayer.weight_quantizer.codes, qlayer.weight_quantizer.zero_point)
    assert offset.ne(0).any(), "the case must exercise the offset path"
    sim, run, _ = _pair(qlayer, "onednn")
    assert run[0].weight_offset is not None
    with torch.no_grad():
        assert _rel(run(x), sim(x)) < REL_BOUND


@needs_onednn
def test_split_input_runs_one_integer_call_per_part():
    torch.manual_seed(2)
    layer = nn.Conv2d(32, 16, 3, padding=1)
    x = _conv_input()
    x[:, 20:] *= 30  # the skip half has a much wider range: two quantizers
    sim, run, report = _pair(_frozen(layer, x, 4, split_at=20), "onednn")
    assert report.kernels == {"0": "onednn"}
    with torch.no_grad():
        assert _rel(run(x), sim(x)) < REL_BOUND


@needs_onednn
def test_timestep_aware_input_takes_each_samples_group():
    torch.manual_seed(3)
    layer = nn.Linear(24, 16)
    x = torch.randn(6, 24)
    x[3:] *= 10  # group 1 has ten times the range of group 0
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    qlayer = _frozen(layer, x, 8, groups=2, group_index=groups)
    sim, run, _ = _pair(qlayer, "onednn")
    for model in (sim, run):
        model[0].act_quantizer.group_index = groups
    with torch.no_grad():
        assert _rel(run(x), sim(x)) < REL_BOUND  # a mixed batch: one call per group
        for model in (sim, run):
            model[0].act_quantizer.group_index = torch.ones(6, dtype=torch.long)
        assert _rel(run(x), sim(x)) < REL_BOUND  # one group for the whole batch


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_dequantize_kernel_is_bit_identical(kind):
    torch.manual_seed(4)
    layer, x = (nn.Conv2d(16, 8, 3, padding=1), _conv_input(channels=16)) if kind == "conv" else \
        (nn.Linear(16, 8), torch.randn(5, 16))
    sim, run, report = _pair(_frozen(layer, x, 8), "dequantize")
    assert report.kernels == {"0": "dequantize"}
    with torch.no_grad():
        assert torch.equal(run(x), sim(x))


@pytest.mark.parametrize("case, reason", [
    ("weight_only", "input is not quantized"),
    ("act16", "16 bits"),
])
def test_layers_oneDNN_cannot_compute_fall_back_exactly_or_are_refused_by_name(case, reason):
    torch.manual_seed(5)
    layer, x = nn.Conv2d(16, 8, 3, padding=1), _conv_input(channels=16)
    qlayer = _frozen(layer, x, 8, a_bits=16, act=case != "weight_only")
    sim, run, report = _pair(qlayer, "auto")
    assert report.kernels == {"0": "dequantize"} and reason in report.reasons["0"]
    with torch.no_grad():
        assert torch.equal(run(x), sim(x))
    if onednn_available():
        with pytest.raises(ValueError, match=r"layer 0 cannot run on oneDNN.*" + reason + r".*runtime='auto'"):
            _pair(qlayer, "onednn")


def test_runtime_layer_holds_no_float_weight():
    layer, x = nn.Conv2d(64, 64, 3, padding=1), _conv_input(channels=64)
    sim, run, _ = _pair(_frozen(layer, x, 4), "auto")
    int_layer = run[0]
    assert isinstance(int_layer, IntegerLayer)
    # Floats left: per-channel scales, the bias and the input quantizer's step; nothing weight-sized.
    tensors = list(int_layer.named_parameters()) + list(int_layer.named_buffers())
    assert [n for n, t in tensors if t.is_floating_point() and t.numel() > 64] == []
    assert not any(t.requires_grad for _, t in tensors)
    # int8 values, a scale per channel and the bias: a quarter of the float weight, plus a little.
    fp_bytes = layer.weight.numel() * 4 + layer.bias.numel() * 4
    assert runtime_weight_nbytes(run) <= 0.27 * fp_bytes


@needs_onednn
def test_moving_a_packed_layer_keeps_its_result():
    layer, x = nn.Linear(32, 16), torch.randn(4, 32)
    _, run, _ = _pair(_frozen(layer, x, 8), "onednn")
    with torch.no_grad():
        before = run(x)
        run.to("cpu")  # repacks from the plain int8 weight
        assert run[0].kernel == "onednn"
        assert torch.equal(run(x), before)


def test_unknown_runtime_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'auto'.*'simulated'"):
        to_integer_runtime(nn.Sequential(), "int4")
