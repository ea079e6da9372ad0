"""What diffusers-gaq knows about ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x style
text-conditional latent UNets), as sampled by ``StableDiffusionPipeline``.

Quantized: every conv and linear of the UNet, including the cross-attention projections (q from
the image tokens, k and v from the text encoder's hidden states) and the attention matmuls. The
text encoder and the VAE stay in full precision. Reconstruction units: ResnetBlock2D, one
``BasicTransformerBlock`` (self-attention, cross-attention, feed-forward), down / up samplers,
the time embedding; the transformers' proj_in / proj_out go alone. Skip concatenations are those
of ``UNet2DModel``.

Conditioning: each calibration trajectory gets one prompt (the user's ``calibration_prompts``,
else a small built-in list) and runs the pipeline's classifier-free guidance, so the
conditional and the unconditional ("" prompt) inputs both become calibration samples.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from .base import CalibrationConditioning, ModelFamily, guidance_scale
from .unet2d import unet_skip_splits

# StableDiffusionPipeline.__call__'s default.
SD_GUIDANCE_SCALE = 7.5

# Used when the config names no prompts: varied subjects, styles and scenes, so that the
# cross-attention inputs of calibration are not all alike.
DEFAULT_CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old man with a beard, studio lighting",
    "a bowl of fruit on a wooden table, still life oil painting",
    "a futuristic city skyline at night, neon lights, rain",
    "a red fox in a snowy forest, wildlife photography",
    "an isometric illustration of a cozy living room",
    "a mountain lake with pine trees, morning fog, landscape",
)

# Configuration keys that make the UNet need inputs this family does not build.
_UNSUPPORTED = {
    "class_embed_type": "class embeddings",
    "num_class_embeds": "class embeddings",
    # "text_time" (SDXL) is the SDXL family's (unet2d_condition_xl.py); the others stay unsupported.
    "addition_embed_type": "added conditioning other than SDXL's text_time (text / image embeddings)",
    "time_cond_proj_dim": "a guidance-embedding timestep condition (LCM-style)",
    "encoder_hid_dim_type": "an encoder_hidden_states projection",
}


def unsupported_fields(model: nn.Module, unsupported: dict[str, str]) -> str | None:
    """The model's config fields among ``unsupported`` (field -> why), as "k=v, ... (why; ...)", or None."""
    used = {k: why for k, why in unsupported.items() if model.config.get(k) is not None}
    if not used:
        return None
    return (f"{', '.join(f'{k}={model.config.get(k)!r}' for k in used)} "
            f"({'; '.join(sorted(set(used.values())))})")


class UNet2DConditionFamily(ModelFamily):
    name = "unet2d_condition"
    model_classes = (UNet2DConditionModel,)
    unit_types = (ResnetBlock2D, BasicTransformerBlock, Downsample2D, Upsample2D, TimestepEmbedding)
    component = "unet"
    default_guidance_scale = SD_GUIDANCE_SCALE

    @classmethod
    def check(cls, model: nn.Module) -> None:
        used = unsupported_fields(model, _UNSUPPORTED)
        if used:
            raise NotImplementedError(
                f"UNet2DConditionModel with {used} is not supported; supported: Stable Diffusion 1.x / 2.x "
                "style UNet2DConditionModel conditioned on encoder_hidden_states only (StableDiffusionPipeline), and "
                "the SDXL UNet with addition_embed_type='text_time' (StableDiffusionXLPipeline)")

    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        from diffusers import StableDiffusionPipeline

        return (StableDiffusionPipeline,)

    @classmethod
    def skip_splits(cls, model: nn.Module) -> dict[str, int]:
        return unet_skip_splits(model)

    @classmethod
    def first_last_layers(cls, model: nn.Module) -> list[str]:
        return ["conv_in", "conv_out"]

    @classmethod
    def conditioning_bytes_per_sample(cls, model):
        return 77 * model.config.cross_attention_dim * 4  # CLIP's 77 tokens, float32

    @classmethod
    def forward(cls, model, sample, timestep, conditioning=None):
        return model(sample, timestep, encoder_hidden_states=(conditioning or {})["encoder_hidden_states"],
                     return_dict=False)[0]

    @classmethod
    def example_conditioning(cls, model, batch_size=1):
        # Any sequence length works for cross-attention; 8 tokens keep the pass cheap.
        return {"encoder_hidden_states": torch.randn(batch_size, 8, model.config.cross_attention_dim)}

    @classmethod
    def calibration_conditioning(cls, pipe, model, config, device=None) -> CalibrationConditioning:
        if pipe is None or not hasattr(pipe, "encode_prompt"):
            raise ValueError("calibrating a UNet2DConditionModel needs its pipeline's text encoder: pass the "
                             "StableDiffusionPipeline to quantize_pipeline")
        prompts = list(config.calibration_prompts or DEFAULT_CALIBRATION_PROMPTS)
        scale = guidance_scale(config, cls.default_guidance_scale)
        device = pipe.text_encoder.device  # the text encoder stays where the caller put it
        # The pipeline's own encoder (tokenizer max length, clip_skip default, attention masks);
        # negative prompt "" as StableDiffusionPipeline uses by default.
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(prompts, device, 1, True)
        cond = cond.detach().float().cpu()
        if scale <= 1:
            return CalibrationConditioning([{"encoder_hidden_states": cond}])
        uncond = uncond[:1].detach().float().cpu()  # every row is the embedding of ""
        return CalibrationConditioning([{"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}],
                                       guidance_scale=scale)


__all__ = ["UNet2DConditionFamily", "DEFAULT_CALIBRATION_PROMPTS", "SD_GUIDANCE_SCALE"]
