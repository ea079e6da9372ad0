"""What diffusers-gaq knows about the Stable Diffusion XL UNet (``UNet2DConditionModel`` with
``addition_embed_type="text_time"``), as sampled by ``StableDiffusionXLPipeline``.

SDXL's UNet takes, besides the timestep and the text encoders' hidden states (the two encoders'
penultimate layers concatenated, 2048 wide), two *added* conditions: the pooled embedding of the
second text encoder ("text_embeds") and six micro-conditioning numbers ("time_ids": original size,
crop corner, target size), which ``add_time_proj`` / ``add_embedding`` turn into an embedding
added to the timestep embedding. All three are per-sample conditioning of the calibration data.

Quantized: everything Stable Diffusion's family quantizes, and ``add_embedding`` (a
TimestepEmbedding, reconstructed as its own unit like ``time_embedding``). Text encoders and VAE
stay in full precision.

Calibration conditioning: the pipeline's own ``encode_prompt`` and ``_get_add_time_ids`` with
``StableDiffusionXLPipeline.__call__``'s defaults (no negative prompt, so with
``force_zeros_for_empty_prompt`` the unconditional embeddings are zeros; guidance 5.0; original =
target size = the default resolution, crop (0, 0)), so the quantized model sees the inputs it will
get when sampled with defaults.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .base import CalibrationConditioning, guidance_scale
from .unet2d_condition import DEFAULT_CALIBRATION_PROMPTS, UNet2DConditionFamily, unsupported_fields

# StableDiffusionXLPipeline.__call__'s default.
SDXL_GUIDANCE_SCALE = 5.0

# Configuration keys that make the UNet need inputs this family does not build.
_UNSUPPORTED = {
    "class_embed_type": "class embeddings",
    "num_class_embeds": "class embeddings",
    "time_cond_proj_dim": "a guidance-embedding timestep condition (LCM-style)",
    "encoder_hid_dim_type": "an encoder_hidden_states projection (IP-adapter style image embeddings)",
}


def is_text_time(model: nn.Module) -> bool:
    return isinstance(model, UNet2DConditionModel) and model.config.get("addition_embed_type") == "text_time"


class UNet2DConditionXLFamily(UNet2DConditionFamily):
    name = "unet2d_condition_xl"
    default_guidance_scale = SDXL_GUIDANCE_SCALE

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return is_text_time(model)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        used = unsupported_fields(model, _UNSUPPORTED)
        if used:
            raise NotImplementedError(
                f"UNet2DConditionModel with addition_embed_type='text_time' and {used} is not supported; supported: "
                "the Stable Diffusion XL base UNet, conditioned on encoder_hidden_states, text_embeds and time_ids only")

    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        from diffusers import StableDiffusionXLPipeline

        return (StableDiffusionXLPipeline,)

    @classmethod
    def check_pipeline(cls, pipe, model: nn.Module) -> None:
        if getattr(pipe, "text_encoder_2", None) is None:
            raise NotImplementedError("StableDiffusionXLPipeline without text_encoder_2 is not supported: the pooled "
                                      "text embedding of the calibration prompts comes from it")

    @classmethod
    def pooled_dim(cls, model: nn.Module) -> int:
        """Width of ``text_embeds``: what add_embedding takes, less the six projected time ids."""
        return model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim

    @classmethod
    def conditioning_bytes_per_sample(cls, model):
        return (77 * model.config.cross_attention_dim + cls.pooled_dim(model) + 6) * 4  # float32

    @classmethod
    def forward(cls, model, sample, timestep, conditioning=None):
        cond = conditioning or {}
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return model(sample, timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                     added_cond_kwargs=added, return_dict=False)[0]

    @classmethod
    def example_conditioning(cls, model, batch_size=1):
        c, h, w = cls.sample_shape(model)
        size = [8.0 * h, 8.0 * w]  # the VAE's factor 8: the pixel size a latent of this size decodes to
        return {"encoder_hidden_states": torch.randn(batch_size, 8, model.config.cross_attention_dim),
                "text_embeds": torch.randn(batch_size, cls.pooled_dim(model)),
                "time_ids": torch.tensor([size + [0.0, 0.0] + size]).expand(batch_size, 6).clone()}

    @classmethod
    def calibration_conditioning(cls, pipe, model, config, device=None) -> CalibrationConditioning:
        if pipe is None or not hasattr(pipe, "_get_add_time_ids"):
            raise ValueError("calibrating an SDXL UNet needs its pipeline's two text encoders: pass the "
                             "StableDiffusionXLPipeline to quantize_pipeline")
        prompts = list(config.calibration_prompts or DEFAULT_CALIBRATION_PROMPTS)
        scale = guidance_scale(config, cls.default_guidance_scale)
        device = pipe.text_encoder_2.device  # the text encoders stay where the caller put them
        with torch.no_grad():
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                                     do_classifier_free_guidance=True)
        height = width = pipe.default_sample_size * pipe.vae_scale_factor  # __call__'s default resolution
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        branch = {"encoder_hidden_states": cond.detach().float().cpu(), "text_embeds": pooled.detach().float().cpu(),
                  "time_ids": time_ids}
        if scale <= 1:
            return CalibrationConditioning([branch])
        # No negative prompt: every row is the same (zeros under force_zeros_for_empty_prompt, else "").
        null = {"encoder_hidden_states": uncond[:1].detach().float().cpu(),
                "text_embeds": uncond_pooled[:1].detach().float().cpu(), "time_ids": time_ids}
        return CalibrationConditioning([branch, null], guidance_scale=scale)


__all__ = ["UNet2DConditionXLFamily", "SDXL_GUIDANCE_SCALE", "is_text_time"]
