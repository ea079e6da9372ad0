"""The integer runtime on a whole model: the embedded reference pipeline (its real trained weights),
quantized, saved, and loaded the way a user loads it. Real oneDNN kernels, real DDIM sampling."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from helpers import TINY_BUDGET

from diffusers_gaq import GradientAlignedQuantizer, QuantizedUNet2DModel, quantize_pipeline
from diffusers_gaq.quant.layers import QuantLayer
from diffusers_gaq.quanto_export import export_to_quanto
from diffusers_gaq.reference import load_reference_pipeline
from diffusers_gaq.runtime import IntegerLayer, is_integer_runtime, onednn_available, runtime_weight_nbytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from benchmark_runtime import ddim_images  # noqa: E402  (the benchmark's exactness measure, at test size)

torch.set_num_threads(1)

SETTINGS = {
    "w8a8": dict(weight_bits=8, act_bits=8, method="minmax", weighting="uniform"),
    # the defaults (uniform weights, block reconstruction) on the tiny budget
    "w4a8": dict(weight_bits=4, act_bits=8, weighting="uniform"),
}


@pytest.fixture(scope="module")
def reference():
    pipe = load_reference_pipeline()
    return DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))


@pytest.fixture(scope="module")
def saved(reference, tmp_path_factory):
    """tag -> folder of the reference UNet quantized with SETTINGS[tag] on the tiny budget."""
    folders = {}
    for tag, settings in SETTINGS.items():
        qpipe = quantize_pipeline(reference, GradientAlignedQuantizer(**dict(TINY_BUDGET, **settings)), progress=False)
        folders[tag] = qpipe.unet.save_pretrained(tmp_path_factory.mktemp(tag) / "unet", model_card=False)
    return folders


def _psnr(a, b):
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.mark.parametrize("tag", list(SETTINGS))
def test_runtime_samples_what_the_simulated_model_samples(tag, saved, reference):
    simulated = QuantizedUNet2DModel.from_pretrained(saved[tag], runtime="simulated")
    runtime = QuantizedUNet2DModel.from_pretrained(saved[tag])  # the default: the integer runtime
    assert is_integer_runtime(runtime) and not is_integer_runtime(simulated)
    report = runtime.quantization.runtime
    expected_kernel = "onednn" if onednn_available() else "dequantize"
    assert set(report.kernels.values()) == {expected_kernel} and report.reasons == {}
    # The simulated model computed in float64 is its arithmetic without float32 rounding: the runtime's
    # int32 sums are exact, so it is measured against that (the float32 simulation's own rounding moves
    # activation codes across rounding boundaries as much; docs/runtime.md "How exact").
    exact = ddim_images(copy.deepcopy(simulated).double(), reference.scheduler, torch.float64, steps=20, seed=0)
    psnr = _psnr(ddim_images(runtime, reference.scheduler, torch.float32, steps=20, seed=0), exact)
    assert psnr >= 38, f"{tag}: runtime vs simulated (float64) samples {psnr:.1f} dB"


@pytest.mark.parametrize("tag", list(SETTINGS))
def test_dequantizing_runtime_is_bit_identical_to_the_simulated_model(tag, saved):
    simulated = QuantizedUNet2DModel.from_pretrained(saved[tag], runtime="simulated")
    runtime = QuantizedUNet2DModel.from_pretrained(saved[tag], runtime="dequantize")
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([900, 20])
    with torch.no_grad():
        assert torch.equal(runtime(x, t).sample, simulated(x, t).sample)


@pytest.mark.parametrize("tag", list(SETTINGS))
def test_runtime_holds_integer_weights_only(tag, saved, reference):
    runtime = QuantizedUNet2DModel.from_pretrained(saved[tag])
    simulated = QuantizedUNet2DModel.from_pretrained(saved[tag], runtime="simulated")
    wrapped = {n for n, m in simulated.named_modules() if isinstance(m, QuantLayer) and m.weight_quantizer is not None}
    integer = {n: m for n, m in runtime.named_modules() if isinstance(m, IntegerLayer)}
    assert set(integer) == wrapped and not any(isinstance(m, QuantLayer) for m in runtime.modules())
    for name, layer in integer.items():
        weight_numel = math.prod(layer.weight_shape)
        floats = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers())
                  if t.is_floating_point() and t.numel() >= min(weight_numel, 256)]
        assert floats == [], f"{name} holds float tensors {floats}"
    # The quantized layers hold a quarter of their float bytes and a little: int8 values, a float32 scale
    # per channel, the bias, and for 8-bit asymmetric codes an int16 offset per channel and a channel of ones.
    fp_layer_bytes = sum(4 * (math.prod(layer.weight_shape) + layer.weight_shape[0]) for layer in integer.values())
    assert sum(layer.weight_nbytes() for layer in integer.values()) <= 0.27 * fp_layer_bytes
    # The whole model also counts what stays float (norms, the first and last layers, biases): measured
    # by examples/benchmark_runtime.py (docs/runtime.md); here a bound that keeps it from growing.
    fp_bytes = sum(p.numel() * p.element_size() for p in reference.unet.parameters())
    assert runtime_weight_nbytes(runtime) <= 0.28 * fp_bytes


def test_what_needs_the_simulated_model_says_so(saved, tmp_path):
    runtime = QuantizedUNet2DModel.from_pretrained(saved["w4a8"])
    with pytest.raises(ValueError, match="runtime='simulated'"):
        runtime.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again").exists()
    with pytest.raises(ValueError, match="runtime='simulated'"):
        runtime.push_to_hub("me/never-uploaded")
    with pytest.raises(ValueError, match="runtime='simulated'"):
        export_to_quanto(runtime)
    with pytest.raises(ValueError, match="not one of"):
        QuantizedUNet2DModel.from_pretrained(saved["w4a8"], runtime="int8")


def test_moving_the_runtime_model_keeps_its_output(saved):
    runtime = QuantizedUNet2DModel.from_pretrained(saved["w8a8"])
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([500, 500])
    with torch.no_grad():
        before = runtime(x, t).sample
        runtime.to("cpu", torch.float32)  # what pipe.to("cpu") does: the packed weights are rebuilt
        after = runtime(x, t).sample
    assert torch.equal(after, before)
