"""Stable Diffusion XL (issue 17): StableDiffusionXLPipeline with a tiny random text_time UNet, two tiny
CLIP text encoders (the second with a projection: the pooled embedding) and in-memory tokenizers, as
test_families.py builds them. Nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.calibration.data import collect_calibration_data
from diffusers_gaq.models import denoiser_of, family_for
from diffusers_gaq.models.unet2d_condition_xl import SDXL_GUIDANCE_SCALE, UNet2DConditionXLFamily
from diffusers_gaq.models.wrap import reconstruction_units, set_quant_state, wrap_model
from diffusers_gaq.modeling import load_quantized_pipeline, save_quantized_pipeline
from diffusers_gaq.serialization import quantized_state_dict
from diffusers_gaq.runtime import is_integer_runtime
from test_families import SCHEDULER, TINY, tiny_clip, tiny_kl_vae

torch.set_num_threads(1)

POOLED, TIME_DIM = 16, 8


def tiny_sdxl_unet(**extra):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
        **extra).eval().requires_grad_(False)


def tiny_sdxl_pipeline(unet=None):
    tokenizer, encoder = tiny_clip()
    cfg = encoder.config.to_dict()
    cfg.update(projection_dim=POOLED)
    torch.manual_seed(1)
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval().requires_grad_(False)
    return StableDiffusionXLPipeline(vae=tiny_kl_vae(), text_encoder=encoder, text_encoder_2=encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet or tiny_sdxl_unet(),
                                     scheduler=DDIMScheduler(**SCHEDULER))


def sample(pipe, seed=0):
    return pipe(["a red fox", "a lighthouse"], num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


def example(model):
    torch.manual_seed(1)
    x, _, cond = UNet2DConditionXLFamily.example_input(model, 2)
    return x, torch.tensor([999, 10]), cond


def test_sdxl_family_wraps_every_layer_and_is_exact_with_quantization_off():
    pipe = tiny_sdxl_pipeline()
    family, component, model = denoiser_of(pipe)
    assert family is UNet2DConditionXLFamily and component == "unet"
    x, t, cond = example(model)
    with torch.no_grad():
        before = UNet2DConditionXLFamily.forward(model, x, t, cond)
    wrap = wrap_model(model, GradientAlignedQuantizer(weight_bits=8, act_bits=8), family)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    wrapped = {n[: -len(".layer")] for n in names if n.endswith(".layer")}
    assert set(names) - {n + ".layer" for n in wrapped} == set(wrap.kept_fp) == {"conv_in", "conv_out"}
    assert {"add_embedding.linear_1", "add_embedding.linear_2"} <= wrapped  # the added conditioning is quantized
    assert "add_embedding" in dict(reconstruction_units(model, family))
    set_quant_state(model, weight=False, act=False)
    with torch.no_grad():
        assert torch.equal(UNet2DConditionXLFamily.forward(model, x, t, cond), before)


def test_sdxl_calibration_data_carries_pooled_embeddings_and_time_ids_with_cfg():
    pipe = tiny_sdxl_pipeline()
    config = GradientAlignedQuantizer(**dict(TINY, calibration_prompts=("a cat", "a dog", "a cow")))
    conditioning = UNet2DConditionXLFamily.calibration_conditioning(pipe, pipe.unet, config)
    assert conditioning.num_branches == 2 and conditioning.guidance_scale == SDXL_GUIDANCE_SCALE
    data = collect_calibration_data(pipe.unet, pipe.scheduler.config, UNet2DConditionXLFamily, config, progress=False,
                                    conditioning=conditioning)
    cond = data.conditioning
    assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    assert cond["text_embeds"].shape == (len(data), POOLED) and cond["time_ids"].shape == (len(data), 6)
    side = float(pipe.default_sample_size * pipe.vae_scale_factor)
    assert torch.equal(cond["time_ids"][0], torch.tensor([side, side, 0.0, 0.0, side, side]))
    # Conditional rows carry the prompts' pooled embedding, unconditional ones zeros
    # (force_zeros_for_empty_prompt), as StableDiffusionXLPipeline samples with defaults.
    table = conditioning.branches[0]["text_embeds"]
    pooled_rows = [r for r in cond["text_embeds"] if r.abs().sum() > 0]
    assert all(any(torch.equal(r, p) for p in table) for r in pooled_rows)
    # (a batch of one encodes the same up to float reordering across batch sizes)
    _, _, pooled, _ = pipe.encode_prompt(["a cat"], device="cpu", do_classifier_free_guidance=True)
    assert torch.allclose(table[0], pooled[0], atol=1e-5)
    assert (cond["text_embeds"].abs().sum(1) == 0).sum() == len(data) // 2


@pytest.fixture(scope="module")
def quantized():
    pipe = tiny_sdxl_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    qpipe = quantize_pipeline(pipe, GradientAlignedQuantizer(**TINY), progress=False)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())  # caller's UNet untouched
    return pipe, qpipe


def test_sdxl_w8a8_quantize_sample_save_load_bit_exact(quantized, tmp_path):
    pipe, qpipe = quantized
    model = qpipe.unet
    assert type(qpipe) is StableDiffusionXLPipeline and type(model).__name__ == "QuantizedUNet2DConditionModel"
    assert qpipe.text_encoder_2 is pipe.text_encoder_2  # the text encoders stay the caller's, FP
    report = model.gaq_report
    assert [u.name for u in report.units] == [n for n, _ in reconstruction_units(model, family_for(model))]
    assert all(np.isfinite(u.loss_final) for u in report.units)
    fp_images, q_images = sample(pipe), sample(qpipe)
    assert np.isfinite(q_images).all() and not np.array_equal(q_images, fp_images)
    x, t, cond = example(model)
    with torch.no_grad():
        q_out = UNet2DConditionXLFamily.forward(model, x, t, cond)
        fp_out = UNet2DConditionXLFamily.forward(pipe.unet, x, t, cond)
    rel = ((q_out - fp_out).norm() / fp_out.norm()).item()
    assert 0 < rel < 0.5, rel

    folder = model.save_pretrained(tmp_path / "unet", model_card=False)
    loaded = type(model).from_pretrained(folder, runtime="simulated")
    a, b = quantized_state_dict(model), quantized_state_dict(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(UNet2DConditionXLFamily.forward(loaded, x, t, cond), q_out)
    save_quantized_pipeline(qpipe, tmp_path / "pipeline")
    reloaded = load_quantized_pipeline(tmp_path / "pipeline", runtime="simulated")
    assert type(reloaded) is StableDiffusionXLPipeline
    assert np.array_equal(sample(reloaded), q_images)
    # Loaded for inference, on the integer runtime (text-time embeddings and cross-attention projections
    # included): close to the simulated model, up to activation codes moved by float order.
    runtime = type(model).from_pretrained(folder)
    assert is_integer_runtime(runtime)
    with torch.no_grad():
        r_out = UNet2DConditionXLFamily.forward(runtime, x, t, cond)
    assert ((r_out - q_out).norm() / q_out.norm()).item() < 0.05


def test_sdxl_refusals_name_the_problem():
    with pytest.raises(NotImplementedError, match="time_cond_proj_dim"):
        family_for(tiny_sdxl_unet(time_cond_proj_dim=8))
    with pytest.raises(NotImplementedError, match="text_encoder_2"):
        quantize_pipeline(StableDiffusionXLPipeline(
            vae=tiny_kl_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            unet=tiny_sdxl_unet(), scheduler=DDIMScheduler(**SCHEDULER)), GradientAlignedQuantizer(**TINY),
            progress=False)
    # An SDXL UNet inside StableDiffusionPipeline (which passes no text_embeds / time_ids): refused, naming SDXL's.
    tokenizer, encoder = tiny_clip()
    sd = StableDiffusionPipeline(vae=tiny_kl_vae(), text_encoder=encoder, tokenizer=tokenizer, unet=tiny_sdxl_unet(),
                                 scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    with pytest.raises(TypeError, match="StableDiffusionXLPipeline"):
        quantize_pipeline(sd, GradientAlignedQuantizer(**TINY), progress=False)
