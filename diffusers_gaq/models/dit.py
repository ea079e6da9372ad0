"""What diffusers-gaq knows about DiT: ``DiTTransformer2DModel`` and the legacy
``Transformer2DModel`` with patched input and ``norm_type="ada_norm_zero"`` (the class named in
facebook/DiT-XL-2-256's config), as sampled by ``DiTPipeline``.

Quantized: the patch embedding conv, every linear layer of every block (q, k, v, out, the
feed-forward, the adaLN-Zero modulation linear and its timestep-embedding MLP), the attention
matmuls, and the final adaLN / output projections. Reconstruction unit: one
``BasicTransformerBlock`` (attention + feed-forward + its adaLN modulation); the patch embedding
and the output projections go alone.

Conditioning: a class label per trajectory, and the null class (``num_embeds_ada_norm``, 1000
for every DiT checkpoint, the label DiTPipeline hard-codes) for the unconditional half of
classifier-free guidance. Output: with learned sigma (``out_channels == 2 * in_channels``) the
noise prediction is the first half of the channels, as DiTPipeline splits it.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, Transformer2DModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .base import CalibrationConditioning, ModelFamily, guidance_scale, labels_table

# DiTPipeline.__call__'s default.
DIT_GUIDANCE_SCALE = 4.0


class DiTFamily(ModelFamily):
    name = "dit"
    model_classes = (DiTTransformer2DModel, Transformer2DModel)
    unit_types = (BasicTransformerBlock,)
    component = "transformer"
    default_guidance_scale = DIT_GUIDANCE_SCALE

    @classmethod
    def check(cls, model: nn.Module) -> None:
        cfg = model.config
        if isinstance(model, Transformer2DModel) and (cfg.patch_size is None or cfg.norm_type != "ada_norm_zero"):
            raise NotImplementedError(
                f"Transformer2DModel with patch_size={cfg.patch_size}, norm_type={cfg.norm_type!r} is not supported; "
                "supported: the DiT form (patch_size set, norm_type='ada_norm_zero', class labels), i.e. "
                "DiTTransformer2DModel")
        if cfg.num_embeds_ada_norm is None:
            raise NotImplementedError("DiT without num_embeds_ada_norm (no class labels) is not supported")

    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        from diffusers import DiTPipeline

        return (DiTPipeline,)

    @classmethod
    def first_last_layers(cls, model: nn.Module) -> list[str]:
        # The patch embedding's conv, and the final linear to patch pixels (proj_out_1 is the
        # adaLN modulation of the last norm, not the output).
        return ["pos_embed.proj", "proj_out_2"]

    @staticmethod
    def learned_sigma(model: nn.Module) -> bool:
        out = model.config.out_channels or model.config.in_channels
        return out == 2 * model.config.in_channels

    @classmethod
    def forward(cls, model, sample, timestep, conditioning=None):
        out = model(sample, timestep=timestep, class_labels=(conditioning or {})["class_labels"], return_dict=False)[0]
        return out[:, : model.config.in_channels] if cls.learned_sigma(model) else out

    @classmethod
    def example_conditioning(cls, model, batch_size=1):
        return {"class_labels": torch.zeros(batch_size, dtype=torch.long)}

    @classmethod
    def calibration_conditioning(cls, pipe, model, config, device=None) -> CalibrationConditioning:
        num_classes = model.config.num_embeds_ada_norm
        labels = labels_table(config, num_classes, "num_embeds_ada_norm")
        scale = guidance_scale(config, cls.default_guidance_scale)
        if scale <= 1:  # DiTPipeline runs without guidance then: the conditional branch only
            return CalibrationConditioning([{"class_labels": labels}])
        null = torch.tensor([num_classes], dtype=torch.long)
        return CalibrationConditioning([{"class_labels": labels}, {"class_labels": null}], guidance_scale=scale)


__all__ = ["DiTFamily", "DIT_GUIDANCE_SCALE"]
