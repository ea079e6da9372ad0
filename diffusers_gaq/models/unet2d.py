"""What diffusers-gaq knows about ``UNet2DModel``: pixel (DDPM / DDIM) and latent (LDM) UNets,
unconditional or class-conditional; its reconstruction units, the skip concatenations of its up
blocks, and how to call it."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from ..class_conditional_pipeline import ClassConditionalDDIMPipeline
from .base import CalibrationConditioning, ModelFamily, labels_table


def unet_skip_splits(model: nn.Module) -> dict[str, int]:
    """Channel index where each up-block resnet's input switches from the upsampled path to the
    skip connection: {module name of conv1 / conv_shortcut: split index}.

    Replays the skip stack of ``UNet2DModel.forward`` (``UNet2DConditionModel`` keeps the same one):
    conv_in's output, then every down-block resnet's (or resnet + attention's) output and every
    downsampler's output, popped in reverse by the up blocks, each resnet taking
    cat([hidden, skip], dim=1)."""
    skips = [model.conv_in.out_channels]
    for block in model.down_blocks:
        skips += [r.out_channels for r in block.resnets]
        if getattr(block, "downsamplers", None):
            skips += [block.downsamplers[0].out_channels] * len(block.downsamplers)
    splits = {}
    for i, block in enumerate(model.up_blocks):
        for j, resnet in enumerate(block.resnets):
            skip = skips.pop()
            split = resnet.in_channels - skip
            prefix = f"up_blocks.{i}.resnets.{j}"
            splits[f"{prefix}.conv1"] = split
            if resnet.conv_shortcut is not None:
                splits[f"{prefix}.conv_shortcut"] = split
    return splits


def is_class_conditional(model: UNet2DModel) -> bool:
    return model.config.class_embed_type is not None or model.config.num_class_embeds is not None


class UNet2DFamily(ModelFamily):
    """Adapter for ``diffusers.UNet2DModel``: DDPM / DDIM pixel UNets, LDM latent UNets, and
    class-conditional UNets (``num_class_embeds`` or ``class_embed_type="timestep"``)."""

    name = "unet2d"
    model_classes = (UNet2DModel,)
    unit_types = (ResnetBlock2D, Attention, Downsample2D, Upsample2D, TimestepEmbedding)
    component = "unet"

    @classmethod
    def check(cls, model: nn.Module) -> None:
        if model.config.class_embed_type == "identity":
            raise NotImplementedError(
                "UNet2DModel with class_embed_type='identity' (class labels given as embedding vectors) is not "
                "supported: calibration has no labels to spread; supported: unconditional UNet2DModel, and "
                "class-conditional ones with num_class_embeds or class_embed_type='timestep'")

    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        from diffusers import DDIMPipeline, DDPMPipeline, LDMPipeline

        return (DDIMPipeline, DDPMPipeline, LDMPipeline, ClassConditionalDDIMPipeline)

    @classmethod
    def check_pipeline(cls, pipe, model: nn.Module) -> None:
        conditional = is_class_conditional(model)
        if conditional and not isinstance(pipe, ClassConditionalDDIMPipeline):
            raise TypeError(f"{type(pipe).__name__} cannot pass class labels to its class-conditional UNet2DModel, so "
                            "it could not sample the quantized model either; use "
                            "diffusers_gaq.ClassConditionalDDIMPipeline(unet=..., scheduler=...)")
        if not conditional and isinstance(pipe, ClassConditionalDDIMPipeline):
            raise TypeError("ClassConditionalDDIMPipeline holds an unconditional UNet2DModel (no class_embed_type / "
                            "num_class_embeds); use DDIMPipeline")

    @classmethod
    def skip_splits(cls, model: nn.Module) -> dict[str, int]:
        return unet_skip_splits(model)

    @classmethod
    def first_last_layers(cls, model: nn.Module) -> list[str]:
        return ["conv_in", "conv_out"]

    @classmethod
    def forward(cls, model, sample, timestep, conditioning=None):
        labels = (conditioning or {}).get("class_labels")
        if labels is None:
            return model(sample, timestep, return_dict=False)[0]
        return model(sample, timestep, class_labels=labels, return_dict=False)[0]

    @classmethod
    def example_conditioning(cls, model, batch_size=1):
        if not is_class_conditional(model):
            return {}
        return {"class_labels": torch.zeros(batch_size, dtype=torch.long)}

    @classmethod
    def calibration_conditioning(cls, pipe, model, config, device=None) -> CalibrationConditioning:
        if not is_class_conditional(model):
            return CalibrationConditioning()
        # nn.Embedding classes with num_class_embeds; "timestep" labels go through the sinusoidal
        # projection, so any integer works and the caller must say which.
        num_classes = model.config.num_class_embeds if model.config.class_embed_type is None else None
        labels = labels_table(config, num_classes, "UNet2DModel.config.num_class_embeds")
        # No null class here: plain class conditioning, one branch.
        return CalibrationConditioning([{"class_labels": labels}])


__all__ = ["UNet2DFamily", "is_class_conditional", "unet_skip_splits"]
