"""Knowledge of diffusers architectures, one module per family behind one interface."""

from __future__ import annotations

from torch import nn

from .unet2d import UNet2DFamily

FAMILIES = (UNet2DFamily,)


def family_for(model: nn.Module):
    """The adapter for ``model``, or a clear error naming what is supported."""
    for family in FAMILIES:
        if family.supports(model):
            family.check(model)
            return family
    supported = ", ".join(cls.__name__ for f in FAMILIES for cls in f.model_classes)
    raise TypeError(f"cannot quantize a {type(model).__name__}: supported models are {supported}")


__all__ = ["family_for", "FAMILIES"]
