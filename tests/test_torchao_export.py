"""The torchao export (diffusers_gaq.torchao_export): our weight codes as torchao ``IntxUnpackedToInt8Tensor``
weights that stock diffusers loads through its ``TorchAoConfig`` path, checked in a fresh process that never
imports diffusers_gaq. torchao is in the test extra; where it is missing these tests skip with that reason."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY_BUDGET, tiny_pipeline

pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao; it is in the test extra)")

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline  # noqa: E402
from diffusers_gaq.models.wrap import quant_layers, set_quant_state  # noqa: E402
from diffusers_gaq.quant.quantizers import WeightQuantizer  # noqa: E402
from diffusers_gaq.runtime import to_integer_runtime  # noqa: E402
from diffusers_gaq.torchao_export import export_to_torchao, intx_weight, save_torchao_pipeline  # noqa: E402

# Mixed widths (one torchao config per layer), a layer kept in full precision and odd widths.
MIXED = {"down_blocks.0.*": "w8a8", "mid_block.resnets.0.*": "fp", "up_blocks.1.*": "w3a8"}


@pytest.fixture(scope="module")
def quantized():
    pipes = {}
    for name, settings in {"w4a8": {}, "mixed": {"layer_precision": MIXED}}.items():
        config = GradientAlignedQuantizer(**dict(TINY_BUDGET, weight_bits=4, act_bits=8, weighting="uniform", **settings))
        pipes[name] = quantize_pipeline(tiny_pipeline(), config, progress=False)
    return pipes


def _weights_only(unet):
    """Our model with activation quantization off: what a weight-only export must compute."""
    unet = copy.deepcopy(unet)
    set_quant_state(unet, weight=True, act=False)
    return unet


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_intx_weight_dequantizes_to_our_weight_bit_for_bit(bits, per_channel):
    torch.manual_seed(bits)
    w = torch.randn(6, 5, 3, 3) * torch.rand(6, 1, 1, 1)
    wq = WeightQuantizer(bits, per_channel=per_channel)
    wq.calibrate(w)
    wq.harden(w)
    tensor = intx_weight(wq.codes, wq.scale, wq.zero_point, bits)
    assert tensor.qdata.dtype == torch.int8 and tensor.target_dtype == getattr(torch, f"int{bits}")
    assert torch.equal(tensor.dequantize(), wq(w))


def test_intx_weight_refuses_codes_outside_the_width():
    codes = torch.full((2, 3), 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\] for 4 bits"):
        intx_weight(codes, torch.ones(2), torch.zeros(2), 4)


@pytest.mark.parametrize("kind", ["w4a8", "mixed"])
def test_stock_diffusers_loads_the_exported_pipeline_without_diffusers_gaq(kind, quantized, tmp_path):
    qpipe = quantized[kind]
    folder = save_torchao_pipeline(qpipe, tmp_path / "torchao")
    config = json.loads((folder / "unet" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "torchao"
    kept = {"conv_in", "conv_out"} | ({"mid_block.resnets.0.conv1", "mid_block.resnets.0.conv2",
                                        "mid_block.resnets.0.time_emb_proj"} if kind == "mixed" else set())
    assert kept <= set(config["modules_to_not_convert"])
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        expected = _weights_only(qpipe.unet)(x, t).sample
    torch.save({"x": x, "t": t}, tmp_path / "inputs.pt")
    code = f"""
import sys, torch
from diffusers import DiffusionPipeline, UNet2DModel
pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, torch_dtype=torch.float32)
assert type(pipe.unet) is UNet2DModel, type(pipe.unet)
inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
with torch.no_grad():
    out = pipe.unet(inputs["x"], inputs["t"]).sample
torch.save(out, {str(tmp_path / 'out.pt')!r})
intx = sorted(n for n, m in pipe.unet.named_modules() if type(getattr(m, "weight", None)).__name__ == "IntxUnpackedToInt8Tensor")
images = pipe(batch_size=1, num_inference_steps=3, output_type="np").images
print("images", images.shape, "imported", "diffusers_gaq" in sys.modules)
print("intx", ",".join(intx))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imported False" in r.stdout and "images (1, 16, 16, 1)" in r.stdout
    # Exactly the layers with quantized weights carry torchao weights; the others stay float.
    quantized_names = sorted(n for n, layer in quant_layers(qpipe.unet) if layer.weight_quantizer is not None)
    assert f"intx {','.join(quantized_names)}" in r.stdout
    assert not kept & set(quantized_names)
    # Same weights to the bit, same float ops: equal up to float summation order at most.
    out = torch.load(tmp_path / "out.pt")
    assert torch.allclose(out, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_exported_model_saves_and_loads_with_diffusers_own_calls(quantized, tmp_path):
    from diffusers import UNet2DModel

    exported = export_to_torchao(quantized["w4a8"].unet)
    assert type(exported) is UNet2DModel
    exported.save_pretrained(tmp_path / "unet")
    loaded = UNet2DModel.from_pretrained(tmp_path / "unet", torch_dtype=torch.float32)
    name, layer = quant_layers(quantized["w4a8"].unet)[0]
    assert torch.equal(loaded.get_submodule(name).weight.dequantize(),
                       layer.weight_quantizer(layer.layer.weight))
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, exported(x, t).sample)


def test_export_leaves_the_quantized_model_unchanged(quantized):
    unet = quantized["w4a8"].unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    export_to_torchao(unet)
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_what_cannot_be_exported_is_refused(quantized, tmp_path):
    with pytest.raises(ValueError, match="runtime='simulated'"):
        export_to_torchao(_runtime_copy(quantized["w4a8"].unet))
    off = copy.deepcopy(quantized["w4a8"].unet)
    set_quant_state(off, weight=False, act=True)
    with pytest.raises(ValueError, match="weight quantization is switched off"):
        export_to_torchao(off)
    with pytest.raises(TypeError, match="holds no quantized denoiser"):
        save_torchao_pipeline(tiny_pipeline(), tmp_path / "fp")
    assert not (tmp_path / "fp").exists()


def _runtime_copy(unet):
    unet = copy.deepcopy(unet)
    to_integer_runtime(unet, "dequantize")
    return unet
