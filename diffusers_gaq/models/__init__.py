"""Knowledge of diffusers architectures, one module per family behind one interface (base.py)."""

from __future__ import annotations

import copy

from torch import nn

from .base import CalibrationConditioning, ModelFamily
from .dit import DiTFamily
from .unet2d import UNet2DFamily
from .unet2d_condition import UNet2DConditionFamily
from .unet2d_condition_xl import UNet2DConditionXLFamily

# SDXL before Stable Diffusion: both take UNet2DConditionModel, SDXL's only with addition_embed_type="text_time".
FAMILIES: tuple[type[ModelFamily], ...] = (UNet2DFamily, DiTFamily, UNet2DConditionXLFamily, UNet2DConditionFamily)


def supported_models() -> list[str]:
    return list(dict.fromkeys(cls.__name__ for f in FAMILIES for cls in f.model_classes))  # SD and SDXL share one


def family_for(model: nn.Module) -> type[ModelFamily]:
    """The adapter for ``model``, or a clear error naming what is supported."""
    for family in FAMILIES:
        if family.supports(model):
            family.check(model)
            return family
    raise TypeError(f"cannot quantize a {type(model).__name__}: supported models are {', '.join(supported_models())}")


def supported_pipelines() -> list[type]:
    return [p for f in FAMILIES for p in f.pipeline_classes()]


def denoiser_of(pipe) -> tuple[type[ModelFamily], str, nn.Module]:
    """(family, component name, model) of the denoiser a pipeline quantizes; refuses, naming what
    is supported, any pipeline that is not one of the families' pipelines or whose model cannot be
    calibrated or sampled, before any work."""
    for family in FAMILIES:
        if isinstance(pipe, family.pipeline_classes()):
            model = getattr(pipe, family.component, None)
            if model is None:
                raise TypeError(f"{type(pipe).__name__} has no {family.component}; nothing to quantize")
            found = family_for(model)
            if found is not family:
                sampled_by = ", ".join(p.__name__ for p in found.pipeline_classes())
                raise TypeError(f"{type(pipe).__name__}.{family.component} is a {type(model).__name__} of the "
                                f"{found.name} family, which this package quantizes inside {sampled_by}; this "
                                f"pipeline is supported with {', '.join(c.__name__ for c in family.model_classes)} "
                                f"of the {family.name} family")
            family.check_pipeline(pipe, model)
            return family, family.component, model
    # Named only here: listing every family's pipeline class imports StableDiffusionPipeline, which
    # imports transformers' image processors (a second of import time and two torchvision warnings).
    names = ", ".join(p.__name__ for p in supported_pipelines())
    raise TypeError(f"quantize_pipeline got a {type(pipe).__name__}; supported pipelines: {names} "
                    f"(models: {', '.join(supported_models())})")


def rebuild_pipeline(pipe, component: str, model):
    """A new pipeline of ``pipe``'s class with ``model`` as ``component``; the scheduler is copied
    (schedulers hold sampling state), the other components are shared."""
    components = dict(pipe.components)
    components[component] = model
    components["scheduler"] = copy.deepcopy(pipe.scheduler)
    new = type(pipe)(**components)
    if getattr(pipe, "labels", None):  # DiTPipeline's label names come from id2label, not a component
        new.labels = dict(pipe.labels)
    return new


__all__ = ["rebuild_pipeline", "CalibrationConditioning", "FAMILIES", "ModelFamily", "denoiser_of", "family_for", "supported_models",
           "supported_pipelines"]
