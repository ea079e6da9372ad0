"""What diffusers users pass when loading, on a saved quantized Stable-Diffusion-like pipeline: half
precision (torch_dtype and .to), quantization_config= / PipelineQuantizationConfig (refused with the call
to make instead), and the options that cannot apply (refused by name). Real tiny diffusers and
transformers models built from configs (tests/test_families.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, PipelineQuantizationConfig, UNet2DConditionModel
from test_families import TINY, build_pipeline

import diffusers_gaq  # noqa: F401  (registers the quantized classes with diffusers)
from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.modeling import QuantizedUNet2DConditionModel, save_quantized_pipeline

torch.set_num_threads(1)
PROMPT = dict(prompt=["a red fox"], num_inference_steps=4, guidance_scale=3.0, output_type="np", height=32, width=32)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    fp = build_pipeline("sd")
    fp_folder = tmp_path_factory.mktemp("fp") / "pipeline"
    fp.save_pretrained(fp_folder)
    qpipe = quantize_pipeline(fp, GradientAlignedQuantizer(**TINY), progress=False)
    return fp_folder, save_quantized_pipeline(qpipe, tmp_path_factory.mktemp("sd") / "pipeline")


def _images(pipe) -> np.ndarray:
    return pipe(generator=torch.Generator().manual_seed(0), **PROMPT).images


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pipeline_samples_with_bounded_drift(dtype, sd):
    fp_folder, folder = sd
    quantized32 = _images(DiffusionPipeline.from_pretrained(folder))
    half = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    assert half.text_encoder.dtype == dtype and half.vae.dtype == dtype
    assert half.unet.dtype == torch.float32  # integer weights, float32 compute, half inputs and outputs
    quantized_half = _images(half)
    fp32 = _images(DiffusionPipeline.from_pretrained(fp_folder))
    # Half-precision text embeddings and latents perturb the UNet's inputs by ~1e-3; an 8-bit activation
    # quantizer turns such a perturbation into whole-step flips, so the images move by about what
    # quantization itself moved them (measured on this model: mean 0.0153 against a quantization error
    # of mean 0.0162, fp16; FP's own half-precision drift: mean 0.0002). Bound: the quantization error.
    quantization_error = np.abs(quantized32 - fp32)
    drift = np.abs(quantized_half - quantized32)
    assert np.isfinite(quantized_half).all()
    assert drift.mean() <= 1.5 * quantization_error.mean() and drift.max() <= 2 * quantization_error.max(), \
        (drift.mean(), quantization_error.mean())


def test_casting_keeps_float32_compute_and_half_io(sd):
    _, folder = sd
    pipe = DiffusionPipeline.from_pretrained(folder)
    before = _images(pipe)
    pipe.to(torch.bfloat16)  # the other components are cast; the quantized UNet stays float32
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.unet.half() is pipe.unet and pipe.unet.dtype == torch.float32
    x = torch.randn(1, 4, 4, 4, dtype=torch.bfloat16)
    cond = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, dtype=torch.bfloat16)
    out = pipe.unet(x, torch.tensor([10]), encoder_hidden_states=cond).sample
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        ref = pipe.unet(x.float(), torch.tensor([10]), encoder_hidden_states=cond.float()).sample
    assert torch.equal(out, ref.to(torch.bfloat16))
    assert np.isfinite(_images(pipe)).all() and _images(pipe).shape == before.shape


def test_model_from_pretrained_accepts_half_torch_dtype(sd):
    _, folder = sd
    unet = QuantizedUNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float16)
    assert unet.dtype == torch.float32
    same = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float16)
    assert type(same) is QuantizedUNet2DConditionModel


def test_quantization_config_is_refused_with_the_call_to_make(sd):
    fp_folder, folder = sd
    config = GradientAlignedQuantizer(weight_bits=4)
    with pytest.raises(ValueError, match=r"does not quantize while loading.*quantize_pipeline\(pipe"):
        UNet2DConditionModel.from_pretrained(fp_folder, subfolder="unet", quantization_config=config)
    with pytest.raises(ValueError, match=r"does not quantize while loading.*quantize_pipeline\(pipe"):
        DiffusionPipeline.from_pretrained(fp_folder, quantization_config=PipelineQuantizationConfig(
            quant_backend="diffusers_gaq", quant_kwargs={"weight_bits": 4}))
    with pytest.raises(ValueError, match="quantized already"):
        QuantizedUNet2DConditionModel.from_pretrained(folder, subfolder="unet", quantization_config=config)


@pytest.mark.parametrize("option", [{"variant": "fp16"}, {"device_map": "cpu"}])
def test_options_that_cannot_apply_are_refused_by_name(option, sd):
    _, folder = sd
    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        QuantizedUNet2DConditionModel.from_pretrained(folder, subfolder="unet", **option)
