"""Model families beyond DDIM on pixels (issue #8): LDM, class-conditional UNet2DModel, DiT
(DiTTransformer2DModel and the legacy Transformer2DModel) and Stable Diffusion-style
UNet2DConditionModel pipelines.

Every model is a tiny configuration with random weights, built here: nothing is downloaded.
For Stable Diffusion the CLIP tokenizer is faked: the real one needs its vocab.json /
merges.txt from the Hub, so the test gives transformers' CLIPTokenizer an in-memory vocabulary
of single characters (with and without CLIP's end-of-word marker) and no merges, which
tokenizes any lower-case prompt character by character; the tiny CLIPTextModel is built from a
config. What is under test (the UNet's cross-attention inputs, CFG, save / load) does not
depend on the tokenizer being the real one.
"""

from __future__ import annotations

import copy
import string

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    LDMPipeline,
    StableDiffusionPipeline,
    Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from torch import nn

from diffusers_gaq import ClassConditionalDDIMPipeline, GradientAlignedQuantizer, quantize_pipeline
from diffusers_gaq.calibration.capture import capture_unit
from diffusers_gaq.calibration.data import collect_calibration_data
from diffusers_gaq.config import BUDGETS
from diffusers_gaq.modeling import QuantizedModelMixin, load_quantized, load_quantized_pipeline, save_quantized_pipeline
from diffusers_gaq.models import denoiser_of, family_for
from diffusers_gaq.models.unet2d_condition import DEFAULT_CALIBRATION_PROMPTS
from diffusers_gaq.models.wrap import reconstruction_units, set_quant_state, wrap_model
from diffusers_gaq.quant.layers import QuantLayer
from diffusers_gaq.serialization import quantized_state_dict
from diffusers_gaq.runtime import is_integer_runtime

torch.set_num_threads(1)  # tiny models: threads only contend (the suite's convention)

SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
# The CLI's "tiny" budget at W8A8 (issue #8's end-to-end check), fewer trajectory steps for speed.
TINY = dict(BUDGETS["tiny"], weighting="gradient_aligned", weight_bits=8, act_bits=8, num_inference_steps=6, num_calibration_timesteps=3,
            num_groups=3, seed=0)


# ---- tiny pipelines -------------------------------------------------------------------------------
def _seeded(build):
    torch.manual_seed(0)
    return build().eval().requires_grad_(False)


def tiny_vq():
    return _seeded(lambda: VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                   latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, norm_num_groups=4,
                                   layers_per_block=1))


def tiny_kl_vae():
    return _seeded(lambda: AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                         latent_channels=4, norm_num_groups=4, layers_per_block=1))


def tiny_unet2d(**extra):
    return _seeded(lambda: UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), **extra))


def tiny_dit(legacy: bool = False):
    kwargs = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                  sample_size=8, patch_size=2)
    if legacy:  # facebook/DiT-XL-2-256's config names this class
        return _seeded(lambda: Transformer2DModel(**kwargs, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
                                                  norm_elementwise_affine=False, activation_fn="gelu-approximate"))
    return _seeded(lambda: DiTTransformer2DModel(**kwargs))


def tiny_sd_unet(**extra):
    return _seeded(lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, **extra))


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {}
    for ch in string.ascii_lowercase + string.digits + ",.'-!":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24,
                                           bos_token_id=vocab["<|startoftext|>"],
                                           eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    return tokenizer, encoder.eval().requires_grad_(False)


def build_pipeline(kind: str):
    scheduler = DDIMScheduler(**SCHEDULER)
    if kind == "ldm":
        return LDMPipeline(vqvae=tiny_vq(), unet=tiny_unet2d(), scheduler=scheduler)
    if kind == "class_conditional":
        return ClassConditionalDDIMPipeline(unet=tiny_unet2d(num_class_embeds=10), scheduler=scheduler)
    if kind in ("dit", "dit_legacy"):
        return DiTPipeline(transformer=tiny_dit(legacy=kind == "dit_legacy"), vae=tiny_kl_vae(), scheduler=scheduler)
    if kind == "sd":
        tokenizer, encoder = tiny_clip()
        return StableDiffusionPipeline(vae=tiny_kl_vae(), text_encoder=encoder, tokenizer=tokenizer,
                                       unet=tiny_sd_unet(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    raise ValueError(kind)


def sample(pipe, kind: str, seed: int = 0):
    """Two images from the pipeline, two DDIM steps, as numpy."""
    gen = torch.Generator().manual_seed(seed)
    common = dict(num_inference_steps=2, generator=gen, output_type="np")
    if kind == "ldm":
        return pipe(batch_size=2, **common).images
    if kind == "class_conditional":
        return pipe(class_labels=[0, 7], **common).images
    if kind in ("dit", "dit_legacy"):
        return pipe(class_labels=[1, 2], **common).images
    return pipe(["a red fox", "a lighthouse"], **common).images


# (kind, pipeline component, quantized class name, conditioning keys)
CASES = {
    "ldm": ("unet", "QuantizedUNet2DModel", ()),
    "class_conditional": ("unet", "QuantizedUNet2DModel", ("class_labels",)),
    "dit": ("transformer", "QuantizedDiTTransformer2DModel", ("class_labels",)),
    "dit_legacy": ("transformer", "QuantizedTransformer2DModel", ("class_labels",)),
    "sd": ("unet", "QuantizedUNet2DConditionModel", ("encoder_hidden_states",)),
}
KINDS = list(CASES)


def example(model, family, batch: int = 2):
    torch.manual_seed(1)
    x, _, cond = family.example_input(model, batch)
    t = torch.tensor([999, 10] * (batch // 2), dtype=torch.long)
    if "class_labels" in cond:
        cond["class_labels"] = torch.arange(batch, dtype=torch.long) + 3
    return x, t, cond


def raw_output(model, x, t, cond):
    """The model's whole output (both halves for learned-sigma DiT)."""
    if "encoder_hidden_states" in cond:
        return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    if isinstance(model, UNet2DModel):
        return model(x, t, class_labels=cond.get("class_labels")).sample
    return model(x, timestep=t, class_labels=cond["class_labels"]).sample


# ---- wrapping: every layer, and exactness with quantization off -----------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_every_linear_and_conv_wrapped_or_kept(kind):
    pipe = build_pipeline(kind)
    family, component, model = denoiser_of(pipe)
    assert component == CASES[kind][0]
    original = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    kept = sorted(original)[-1]  # any one layer, kept in FP on purpose
    wrapped = copy.deepcopy(model)
    report = wrap_model(wrapped, GradientAlignedQuantizer(keep_fp=(kept,), first_last_precision="same"), family)
    assert set(report.layer_bits) | set(report.kept_fp) == original
    assert report.kept_fp == [kept] and kept not in report.layer_bits
    for name, module in wrapped.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            parent = name.rsplit(".", 1)[0]
            assert name == kept or (name.endswith(".layer") and isinstance(wrapped.get_submodule(parent), QuantLayer)), name
    attention = [n for n, m in wrapped.named_modules() if hasattr(m, "set_processor")]
    assert attention and set(report.attention) == set(attention)
    # Every quantized layer belongs to exactly one reconstruction unit, called in the forward pass.
    units = [n for n, _ in reconstruction_units(wrapped, family)]
    for name in report.layer_bits:
        assert sum(name == u or name.startswith(u + ".") for u in units) == 1, name
    if kind == "sd":  # cross-attention: k / v of attn2 read the text encoder's states
        assert any(n.endswith("attn2.to_k") for n in report.layer_bits)
        assert any(u.endswith("transformer_blocks.0") for u in units)
    if kind.startswith("dit"):  # adaLN-Zero modulation and its timestep MLP are quantized inside the block
        assert "transformer_blocks.0.norm1.linear" in report.layer_bits
        assert units[0] == "pos_embed.proj" and units[-2:] == ["proj_out_1", "proj_out_2"]


@pytest.mark.parametrize("kind", KINDS)
def test_quantization_off_is_exactly_the_original(kind):
    pipe = build_pipeline(kind)
    family, _, model = denoiser_of(pipe)
    wrapped = copy.deepcopy(model)
    wrap_model(wrapped, GradientAlignedQuantizer(weight_bits=4, act_bits=8), family)
    set_quant_state(wrapped, weight=False, act=False)
    x, t, cond = example(model, family)
    with torch.no_grad():
        assert torch.equal(raw_output(wrapped, x, t, cond), raw_output(model, x, t, cond))
        assert torch.equal(family.forward(wrapped, x, t, cond), family.forward(model, x, t, cond))


# ---- calibration data: conditioning per sample, classifier-free guidance -------------------------
def _data(pipe, **overrides):
    family, _, model = denoiser_of(pipe)
    config = GradientAlignedQuantizer(**dict(TINY, **overrides))
    conditioning = family.calibration_conditioning(pipe, model, config)
    return collect_calibration_data(model, pipe.scheduler.config, family, config, progress=False,
                                    conditioning=conditioning), config


def test_dit_calibration_covers_conditional_and_null_class():
    pipe = build_pipeline("dit")
    data, cfg = _data(pipe)
    s, n = cfg.num_calibration_timesteps, cfg.samples_per_timestep
    assert len(data) == s * 2 * n  # conditional + null-class input for every kept x_t
    labels = data.conditioning["class_labels"].reshape(s, 2, n)
    spread = torch.tensor([j * 1000 // n for j in range(n)])
    assert torch.equal(labels[:, 0], spread.expand(s, n)) and bool((labels[:, 1] == 1000).all())
    x = data.samples.reshape(s, 2, n, *data.samples.shape[1:])
    assert torch.equal(x[:, 0], x[:, 1])  # both branches see the same x_t
    val = data.is_val.reshape(s, 2, n)
    assert torch.equal(val[:, 0], val[:, 1]) and val.any()  # a held-out trajectory is held out in both
    # Guidance drives the trajectory: without it (scale 1: conditional branch only) later x_t differ.
    plain, _ = _data(pipe, guidance_scale=1.0)
    assert len(plain) == s * n and torch.equal(plain.samples[:n], x[0, 0])  # same start
    assert not torch.equal(plain.samples[-n:], x[-1, 0])
    # The per-sample labels reach the units: a block's captured inputs carry them.
    family, _, model = denoiser_of(pipe)
    wrapped = copy.deepcopy(model)
    wrap_model(wrapped, GradientAlignedQuantizer(), family)
    inputs = capture_unit(wrapped, wrapped.transformer_blocks[1], data, family, 7, "inputs")
    assert torch.equal(inputs.kwargs["class_labels"], data.conditioning["class_labels"])


def test_class_conditional_labels_spread_or_given():
    pipe = build_pipeline("class_conditional")
    data, cfg = _data(pipe)
    n = cfg.samples_per_timestep
    assert len(data) == cfg.num_calibration_timesteps * n
    assert torch.equal(data.conditioning["class_labels"][:n], torch.tensor([j * 10 // n for j in range(n)]))
    given, _ = _data(pipe, class_labels=(4, 9))
    assert torch.equal(given.conditioning["class_labels"][:4], torch.tensor([4, 9, 4, 9]))
    assert not torch.equal(given.samples, data.samples)  # the label changes the trajectory
    with pytest.raises(ValueError, match="class_labels"):
        quantize_pipeline(pipe, GradientAlignedQuantizer(**dict(TINY, class_labels=(10,))), progress=False)


def test_stable_diffusion_calibration_uses_prompts_and_cfg():
    pipe = build_pipeline("sd")
    prompts = ("a red fox", "an old lighthouse", "a bowl of fruit")
    data, cfg = _data(pipe, calibration_prompts=prompts)
    s, n = cfg.num_calibration_timesteps, cfg.samples_per_timestep
    states = data.conditioning["encoder_hidden_states"].reshape(s, 2, n, 24, 32)
    cond, uncond = pipe.encode_prompt(list(prompts), "cpu", 1, True)
    for j in range(n):
        assert torch.equal(states[0, 0, j], cond[j % 3]) and torch.equal(states[-1, 1, j], uncond[0])
    default, _ = _data(pipe)
    first = pipe.encode_prompt([DEFAULT_CALIBRATION_PROMPTS[0]], "cpu", 1, False)[0][0]
    assert torch.equal(default.conditioning["encoder_hidden_states"][0], first)


# ---- end to end: quantize (tiny W8A8), sample, save / load bit-exactly ----------------------------
@pytest.fixture(scope="module")
def quantized():
    """kind -> (FP pipeline, quantized pipeline), built once per module and on first use."""
    cache = {}

    def get(kind):
        if kind not in cache:
            pipe = build_pipeline(kind)
            before = {k: v.clone() for k, v in denoiser_of(pipe)[2].state_dict().items()}
            qpipe = quantize_pipeline(pipe, GradientAlignedQuantizer(**TINY), progress=False)
            after = denoiser_of(pipe)[2].state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is untouched
            cache[kind] = (pipe, qpipe)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_sample_save_load_round_trip(kind, quantized, tmp_path):
    component, class_name, _ = CASES[kind]
    pipe, qpipe = quantized(kind)
    model, fp_model = getattr(qpipe, component), getattr(pipe, component)
    assert type(qpipe) is type(pipe) and type(model).__name__ == class_name and isinstance(model, type(fp_model))
    # Only the denoiser is quantized: the VAE / text encoder are the caller's, untouched.
    for name, other in pipe.components.items():
        if name not in (component, "scheduler") and isinstance(other, nn.Module):
            assert getattr(qpipe, name) is other
            assert not any(isinstance(m, QuantLayer) for m in other.modules())
    report = model.gaq_report
    assert [u.name for u in report.units] == [n for n, _ in reconstruction_units(model, family_for(model))]
    assert all(np.isfinite(u.loss_final) for u in report.units)

    fp_images, q_images = sample(pipe, kind), sample(qpipe, kind)
    assert q_images.shape == fp_images.shape and np.isfinite(q_images).all()
    assert not np.array_equal(q_images, fp_images)  # the quantized model computes something else ...
    family = family_for(model)
    x, t, cond = example(model, family)
    with torch.no_grad():
        q_out, fp_out = raw_output(model, x, t, cond), raw_output(fp_model, x, t, cond)
    rel = ((q_out - fp_out).norm() / fp_out.norm()).item()
    assert 0 < rel < 0.5, rel  # ... close to the FP model at W8A8

    # The single model: save_pretrained / from_pretrained of its quantized class.
    folder = model.save_pretrained(tmp_path / "model", model_card=False)
    loaded = type(model).from_pretrained(folder, runtime="simulated")
    assert type(loaded) is type(model)
    a, b = quantized_state_dict(model), quantized_state_dict(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(raw_output(loaded, x, t, cond), q_out)
    assert torch.equal(raw_output(load_quantized(folder, runtime="simulated"), x, t, cond), q_out)

    # The whole pipeline: saved, reloaded through model_index.json, samples bit-identically.
    save_quantized_pipeline(qpipe, tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / component / "quantization_config.json").is_file()
    card = (tmp_path / "pipeline" / "README.md").read_text()
    assert class_name in card and f"{component}=" in card  # the usage snippet names this model's class
    reloaded = load_quantized_pipeline(tmp_path / "pipeline", runtime="simulated")
    assert type(reloaded) is type(pipe) and type(getattr(reloaded, component)).__name__ == class_name
    assert np.array_equal(sample(reloaded, kind), q_images)

    # Loaded for inference: the integer runtime samples what the simulated model samples, up to the
    # activation codes that float accumulation order moves across a rounding boundary.
    runtime = load_quantized_pipeline(tmp_path / "pipeline")
    assert is_integer_runtime(getattr(runtime, component))
    r_images = sample(runtime, kind)
    mse = float(np.mean((r_images.astype(np.float64) - q_images) ** 2))
    assert mse == 0 or 10 * np.log10(1.0 / mse) > 30, mse


# ---- what is refused, before any work ----------------------------------------------------------------
def test_unsupported_pipeline_names_every_supported_one():
    class Other(DDIMPipeline.__mro__[1]):  # a DiffusionPipeline that is none of ours
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

    with pytest.raises(TypeError) as err:
        quantize_pipeline(Other(tiny_unet2d(), DDIMScheduler()), GradientAlignedQuantizer(**TINY), progress=False)
    for name in ("DDIMPipeline", "DDPMPipeline", "LDMPipeline", "ClassConditionalDDIMPipeline", "DiTPipeline",
                 "StableDiffusionPipeline", "DiTTransformer2DModel", "UNet2DConditionModel"):
        assert name in str(err.value)


def test_unsupported_architectures_refused_with_what_is_supported():
    with pytest.raises(NotImplementedError, match="addition_embed_type"):
        family_for(tiny_sd_unet(addition_embed_type="text", encoder_hid_dim=32))
    torch.manual_seed(0)
    continuous = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                    norm_num_groups=2)
    with pytest.raises(NotImplementedError, match="DiTTransformer2DModel"):
        family_for(continuous)
    with pytest.raises(NotImplementedError, match="identity"):
        family_for(tiny_unet2d(class_embed_type="identity"))
    # A class-conditional UNet in a pipeline that cannot pass labels: refused, naming the one that can.
    pipe = DDIMPipeline(unet=tiny_unet2d(num_class_embeds=10), scheduler=DDIMScheduler(**SCHEDULER))
    with pytest.raises(TypeError, match="ClassConditionalDDIMPipeline"):
        quantize_pipeline(pipe, GradientAlignedQuantizer(**TINY), progress=False)


def test_family_config_fields_validated_and_round_trip():
    cfg = GradientAlignedQuantizer(class_labels=[1, 2], calibration_prompts="a cat", guidance_scale=3.0)
    assert cfg.class_labels == (1, 2) and cfg.calibration_prompts == ("a cat",)
    assert GradientAlignedQuantizer.from_dict(cfg.to_dict()) == cfg
    for bad, field in ((dict(class_labels=[-1]), "class_labels"), (dict(calibration_prompts=[""]), "calibration_prompts"),
                       (dict(guidance_scale=-1.0), "guidance_scale")):
        with pytest.raises(ValueError, match=field):
            GradientAlignedQuantizer(**bad)


def test_quantized_classes_are_found_by_the_pipeline_loader():
    import diffusers_gaq.modeling as q

    for name in ("QuantizedUNet2DModel", "QuantizedUNet2DConditionModel", "QuantizedDiTTransformer2DModel",
                 "QuantizedTransformer2DModel"):
        cls = getattr(q, name)
        assert issubclass(cls, QuantizedModelMixin) and cls.__module__ == q.__name__


def test_cli_flags_reach_the_config():
    from diffusers_gaq.cli import build_config, build_parser

    args = build_parser().parse_args(["quantize", "reference", "--output", "unused", "--class-labels", "3", "7",
                                      "--prompt", "a red fox", "--prompt", "a lighthouse", "--guidance-scale", "2"])
    config = build_config(args)
    assert config.class_labels == (3, 7) and config.calibration_prompts == ("a red fox", "a lighthouse")
    assert config.guidance_scale == 2.0
    default = build_config(build_parser().parse_args(["quantize", "reference", "--output", "unused"]))
    assert default.class_labels == () and default.calibration_prompts == () and default.guidance_scale is None
