"""Whole-model export to optimum-quanto (diffusers_gaq.quanto_export.export_to_quanto / save_quanto /
load_quanto), on real diffusers UNets with random weights quantized by quantize_pipeline on a tiny budget.

Tolerances (see also the module docstring of quanto_export):

* Per layer, fed the same input ("teacher-forced"), a quanto module equals our wrapper up to float32
  summation order: ``max|y - y_ours| <= 1e-5 * max|y_ours|``, the bound test_quanto_primitives.py
  documents. Weights dequantize bit-exactly and input scales are equal bit for bit.
* End to end, W4A8: every quanto path (2/4-bit weights, every convolution) dequantizes and calls the
  same float op as our fake-quant model, so the outputs are identical; measured max difference
  exactly 0 on three seeds. We assert the per-layer bound 1e-5 relative.
* End to end, W8A8: quanto's 8-bit Linear with int8 inputs runs ``torch._int_mm`` (exact int32 sums,
  one multiply by the scales) where we sum float products; the ~1e-7 relative difference
  occasionally moves a value across a rounding boundary of the next 8-bit activation quantizer,
  i.e. by a whole quantization step, and through the time embedding (added to every pixel) such a
  flip reaches a whole sample. It is not an export error: our own fake-quant model moves by the same
  kind of amount when only the batch is split differently (float conv algorithms change). Measured
  on three seeds, mean|quanto - ours| was 0, 9% and 28% of mean|ours - FP| (the quantization error
  itself); we assert <= 50%, which still fails loudly for a wrong scale, zero point or layout (those
  give errors of the order of the quantization error or larger), while the teacher-forced per-layer
  check above is the tight one.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from diffusers import DDIMPipeline, UNet2DModel
from diffusers.models.attention_processor import Attention
from helpers import SMALL_UNET_CONFIG, fp_pipeline
from optimum.quanto import QConv2d, QLinear, qint8
from torch import nn

from diffusers_gaq import quantize_pipeline
from diffusers_gaq.models.attention import QuantAttnProcessor
from diffusers_gaq.models.wrap import quant_layers, set_quant_state
from diffusers_gaq.quant.layers import QuantLayer
from diffusers_gaq.quant.quantizers import ActQuantizer
from diffusers_gaq.quanto_export import (
    MODEL_CONFIG_NAME,
    QMAP_NAME,
    WEIGHTS_NAME,
    export_to_quanto,
    load_quanto,
    save_quanto,
)

torch.set_num_threads(1)

# Calibrated on helpers.TINY_BUDGET, the smallest budget that runs every stage. Uniform sample
# weights: with quantize_attention=False the gradient-aligned meta step needs a double backward
# through torch's CPU flash attention, which torch does not implement.
# What quanto can express: symmetric int8 activations, one quantizer per input, plain attention.
EXPRESSIBLE = dict(act_bits=8, act_symmetric=True, split_shortcut=False, quantize_attention=False, weighting="uniform")

VARIANTS = {
    "w4a8": dict(EXPRESSIBLE, weight_bits=4, weight_symmetric=False),
    "w8a8": dict(EXPRESSIBLE, weight_bits=8, weight_symmetric=True),
    # The defaults: asymmetric activations, split skip inputs, quantized attention matmuls.
    "w4a8-default": dict(weight_bits=4, act_bits=8),
    # Asymmetric 8-bit weights (weight-only, so that the weights are the only problem).
    "w8-asymmetric": dict(weight_bits=8, act_bits=None, weight_symmetric=False, method="minmax", weighting="uniform"),
}
END_TO_END_REL = {"w4a8": 1e-5}
W8A8_ERROR_SHARE = 0.5
LAYER_REL = 1e-5


@pytest.fixture(scope="module")
def fp_pipe() -> DDIMPipeline:
    return fp_pipeline(SMALL_UNET_CONFIG)


@pytest.fixture(scope="module")
def quantized(fp_pipe, small_w4a8, tiny_quantizer) -> dict[str, DDIMPipeline]:
    # "w4a8-default" is exactly conftest's shared small_w4a8 run (the same UNet and settings): reuse it.
    return {name: small_w4a8[1] if name == "w4a8-default" else
            quantize_pipeline(fp_pipe, tiny_quantizer(**settings), progress=False)
            for name, settings in VARIANTS.items()}


def _inputs(batch: int = 6):
    gen = torch.Generator().manual_seed(123)
    return torch.randn(batch, 1, 32, 32, generator=gen), torch.linspace(0, 999, batch).long()


@torch.no_grad()
def _run(model, x, t) -> torch.Tensor:
    return model(x, t).sample


@torch.no_grad()
def _capture_layers(model, x, t) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (input, output) of every QuantLayer in one forward pass."""
    seen, hooks = {}, []
    for name, layer in quant_layers(model):
        hooks.append(layer.register_forward_hook(
            lambda m, args, out, n=name: seen.__setitem__(n, (args[0].detach().clone(), out.detach().clone()))))
    try:
        model(x, t)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- expressible models


@pytest.mark.parametrize("variant", ["w4a8", "w8a8"])
def test_export_reproduces_fake_quant_model(variant, quantized, fp_pipe):
    ours = quantized[variant].unet
    x, t = _inputs()
    before = _run(ours, x, t)
    exported = export_to_quanto(ours)

    # A plain UNet2DModel of quanto modules; our model is untouched.
    assert type(exported) is UNet2DModel
    assert not any(isinstance(m, (QuantLayer, QuantAttnProcessor, ActQuantizer)) for m in exported.modules())
    assert not any(k.startswith("gaq_") for k in vars(exported))
    assert dict(exported.config) == dict(ours.config)
    assert torch.equal(_run(ours, x, t), before)
    assert quant_layers(ours)

    bits = VARIANTS[variant]["weight_bits"]
    for name, layer in quant_layers(ours):
        q = exported.get_submodule(name)
        assert isinstance(q, QConv2d if isinstance(layer.layer, nn.Conv2d) else QLinear), name
        assert q.weight_qtype.bits == bits and q.activation_qtype == qint8, name
        assert torch.equal(q.weight.dequantize(), layer.quantized_weight()), name
        aq = layer.act_quantizer
        assert torch.equal(q.input_scale, aq.scale.detach().abs() + 1e-12), name
        assert torch.equal(q.bias, layer.layer.bias), name

    # Teacher-forced: each quanto module on the input our wrapper saw gives our wrapper's output.
    for name, (inp, out) in _capture_layers(ours, x, t).items():
        y = exported.get_submodule(name)(inp)
        assert type(y) is torch.Tensor, name  # not a quantized activation
        assert _rel(y, out) <= LAYER_REL, (name, _rel(y, out))

    # End to end (see the module docstring for why W8A8 is looser).
    y = _run(exported, x, t)
    if variant in END_TO_END_REL:
        assert _rel(y, before) <= END_TO_END_REL[variant], _rel(y, before)
    else:
        fp = _run(fp_pipe.unet, x, t)
        export_err, quant_err = (y - before).abs().mean().item(), (before - fp).abs().mean().item()
        logging.getLogger(__name__).info("W8A8 export: mean|quanto-ours| %.3g, mean|ours-fp| %.3g", export_err, quant_err)
        assert export_err <= W8A8_ERROR_SHARE * quant_err, (export_err, quant_err)


def test_exported_model_samples_in_ddim_pipeline(quantized):
    qpipe = quantized["w4a8"]
    pipe = DDIMPipeline(unet=export_to_quanto(qpipe.unet), scheduler=copy.deepcopy(qpipe.scheduler))
    kwargs = dict(batch_size=2, num_inference_steps=3, output_type="np")
    images = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    ours = qpipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert images.shape == (2, 32, 32, 1) and images.dtype.kind == "f"
    assert (images >= 0).all() and (images <= 1).all()
    # W4A8 exports compute the same float ops as our model (module docstring).
    assert abs(images - ours).max() <= 1e-5


# ----------------------------------------------------------------------------- refusals


def test_default_config_is_refused_with_reasons(quantized):
    ours = quantized["w4a8-default"].unet
    x, t = _inputs(2)
    before = _run(ours, x, t)
    with pytest.raises(ValueError) as info:
        export_to_quanto(ours)
    msg = str(info.value)
    assert "cannot export this model to optimum-quanto exactly" in msg
    assert "asymmetric activation quantizer (act_symmetric=False)" in msg
    assert "split input (split_shortcut=True)" in msg
    assert "quantized attention matmuls (quantize_attention=True)" in msg
    # Offending layers are named.
    assert "up_blocks.0.resnets.0.conv1" in msg and "down_blocks.1.attentions.0" in msg
    assert "activations=False" in msg  # every problem is in the activations: the way out is offered
    assert torch.equal(_run(ours, x, t), before)


def test_asymmetric_eight_bit_weights_are_refused(quantized):
    ours = quantized["w8-asymmetric"].unet
    with pytest.raises(ValueError, match=r"asymmetric 8-bit weights.*weight_symmetric=True") as info:
        export_to_quanto(ours)
    assert any(name in str(info.value) for name, _ in quant_layers(ours))
    assert "activations=False" not in str(info.value)  # not an activation problem: no such hint


def test_uncalibrated_or_float_models_are_refused(fp_pipe):
    with pytest.raises(ValueError, match="no quantized layers"):
        export_to_quanto(fp_pipe.unet)
    with pytest.raises(ValueError, match="no optimum-quanto modules"):
        save_quanto(fp_pipe.unet, "unused")


# ----------------------------------------------------------------------------- weight-only export


def test_weight_only_export_keeps_weights_exact(quantized, caplog):
    """activations=False on the default config (which quanto cannot run with activations)."""
    ours = quantized["w4a8-default"].unet
    with caplog.at_level(logging.WARNING, logger="diffusers_gaq.quanto_export"):
        exported = export_to_quanto(ours, activations=False)
    assert "activation quantization of" in caplog.text and "differ" in caplog.text

    for name, layer in quant_layers(ours):
        q = exported.get_submodule(name)
        assert q.activation_qtype is None, name
        assert torch.equal(q.weight.dequantize(), layer.quantized_weight()), name
    # Attention runs diffusers' own processor again.
    for name, module in exported.named_modules():
        if isinstance(module, Attention):
            assert not isinstance(module.processor, QuantAttnProcessor), name
            assert type(module.processor) is type(ours.get_submodule(name).processor.original_processor)

    # Numerics: those of our model with activation quantization off, not of our W4A8 model.
    x, t = _inputs()
    y = _run(exported, x, t)
    weights_only = copy.deepcopy(ours)
    set_quant_state(weights_only, weight=True, act=False)
    assert _rel(y, _run(weights_only, x, t)) <= LAYER_REL
    assert _rel(y, _run(ours, x, t)) > 1e-3


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("variant, activations", [("w8a8", True), ("w4a8", True), ("w4a8-default", False)])
def test_save_load_round_trip_is_exact(variant, activations, quantized, fp_pipe, tmp_path):
    exported = export_to_quanto(quantized[variant].unet, activations=activations)
    folder = save_quanto(exported, tmp_path / "quanto")
    assert sorted(p.name for p in folder.iterdir()) == sorted([MODEL_CONFIG_NAME, QMAP_NAME, WEIGHTS_NAME])
    assert json.loads((folder / MODEL_CONFIG_NAME).read_text())["_class_name"] == "UNet2DModel"

    x, t = _inputs()
    expected = _run(exported, x, t)
    for base_config in (None, fp_pipe.unet.config):
        reloaded = load_quanto(folder, base_config)
        assert type(reloaded) is UNet2DModel
        assert torch.equal(_run(reloaded, x, t), expected)
        for name, m in exported.named_modules():
            if isinstance(m, (QConv2d, QLinear)):
                r = reloaded.get_submodule(name)
                assert torch.equal(r.weight.dequantize(), m.weight.dequantize()), name
                assert r.activation_qtype == m.activation_qtype, name

    with pytest.raises(FileExistsError):
        save_quanto(exported, folder)
    save_quanto(exported, folder, overwrite=True)
    with pytest.raises(ValueError, match="block_out_channels"):
        load_quanto(folder, dict(fp_pipe.unet.config, block_out_channels=(8, 16, 16, 16)))


def test_load_refuses_incomplete_folders(quantized, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_quanto(export_to_quanto(quantized["w4a8"].unet), tmp_path / "quanto")
    with pytest.raises(ValueError, match="fake-quant modules"):
        save_quanto(quantized["w4a8"].unet, tmp_path / "other")
    state = load_file(str(folder / WEIGHTS_NAME))
    state.pop("conv_out.bias")
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="conv_out.bias"):
        load_quanto(folder)
    (folder / QMAP_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=QMAP_NAME):
        load_quanto(folder)
