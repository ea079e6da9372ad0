"""What diffusers-gaq knows about ``UNet2DModel``: reconstruction units, the skip
concatenations of its up blocks, and how to call it."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn


class UNet2DFamily:
    """Adapter for ``diffusers.UNet2DModel`` (DDPM / DDIM pixel UNets)."""

    name = "unet2d"
    model_classes = (UNet2DModel,)
    # Reconstruction units, as in BRECQ / Q-Diffusion; quantized layers outside them go alone.
    unit_types = (ResnetBlock2D, Attention, Downsample2D, Upsample2D, TimestepEmbedding)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return isinstance(model, UNet2DModel)

    @staticmethod
    def check(model: nn.Module) -> None:
        """Refuse configurations the calibration cannot drive, before any work starts."""
        if model.config.class_embed_type is not None or model.config.num_class_embeds is not None:
            raise NotImplementedError(
                "class-conditional UNet2DModel (class_embed_type / num_class_embeds) is not supported yet; "
                "supported: unconditional UNet2DModel"
            )

    @staticmethod
    def skip_splits(model: UNet2DModel) -> dict[str, int]:
        """Channel index where each up-block resnet's input switches from the upsampled path to the
        skip connection: {module name of conv1 / conv_shortcut: split index}.

        Replays the skip stack of ``UNet2DModel.forward``: conv_in's output, then every down-block
        resnet's (or attention's) output and every downsampler's output, popped in reverse by the
        up blocks, each resnet taking cat([hidden, skip], dim=1)."""
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

    @staticmethod
    def forward(model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict | None = None):
        return model(sample, timestep, return_dict=False)[0]

    @staticmethod
    def example_input(model: nn.Module, batch_size: int = 1):
        c, s = model.config.in_channels, model.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return torch.randn(batch_size, c, h, w), torch.full((batch_size,), 500, dtype=torch.long)
