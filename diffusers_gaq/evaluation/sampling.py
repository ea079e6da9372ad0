"""Paired samples from any supported pipeline: the same initial noise, the same conditioning and a
deterministic DDIM scheduler (eta = 0), so that an FP and a quantized pipeline can be compared image
by image.

What each family is given (evaluation_plan.SamplingPlan holds the choice):
    DDIMPipeline / DDPMPipeline / LDMPipeline   nothing (unconditional)
    ClassConditionalDDIMPipeline, DiTPipeline   class labels, by default spread over every class
    StableDiffusionPipeline                     prompts, by default EVALUATION_PROMPTS (not the
                                                calibration prompts: these are held out)
DiT and Stable Diffusion run their classifier-free guidance (the pipeline's default scale unless
the plan sets one).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import numpy as np
import torch

# Held out from calibration (models/unet2d_condition.DEFAULT_CALIBRATION_PROMPTS): evaluating on the
# calibration prompts would measure the fit, not the quantization.
EVALUATION_PROMPTS = (
    "a bowl of ripe oranges on a wooden table",
    "a snowy mountain village at dusk",
    "a portrait of an old fisherman, oil painting",
    "a red bicycle leaning against a brick wall",
    "a city street in the rain at night, neon lights",
    "a tabby cat asleep on a windowsill",
    "a sailing boat on a calm sea at sunrise",
    "a plate of pasta with basil, food photography",
)


@dataclass
class SamplingPlan:
    """How many images, how, and with which conditioning; empty class_labels / prompts mean the defaults."""

    num_images: int = 64
    num_inference_steps: int = 50
    seed: int = 0
    batch_size: int = 250
    class_labels: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    guidance_scale: float | None = None

    def __post_init__(self):
        # A count below one would give no images, or PSNR 100 dB from images never denoised.
        for name in ("num_images", "num_inference_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")

    def describe(self, kind: str) -> str:
        text = (f"{self.num_images} images, DDIM eta=0, {self.num_inference_steps} steps, same initial noise "
                f"(seed {self.seed})")
        if kind in ("class_conditional", "dit"):
            text += ", class labels " + ("given" if self.class_labels else "spread over every class")
        if kind == "text_to_image":
            text += ", prompts " + ("given" if self.prompts else "diffusers_gaq.evaluation.sampling.EVALUATION_PROMPTS")
        return text


def pipeline_kind(pipe) -> str:
    """'unconditional', 'class_conditional', 'dit' or 'text_to_image'; refuses (naming what is
    supported) any pipeline quantize_pipeline does not take."""
    from ..models import denoiser_of
    from ..models.dit import DiTFamily
    from ..models.unet2d import is_class_conditional
    from ..models.unet2d_condition import UNet2DConditionFamily

    family, _, model = denoiser_of(pipe)
    if family is DiTFamily:
        return "dit"
    if issubclass(family, UNet2DConditionFamily):  # Stable Diffusion and SDXL
        return "text_to_image"
    return "class_conditional" if is_class_conditional(model) else "unconditional"


def with_ddim(pipe):
    """The same components under a deterministic DDIM scheduler; the caller's pipeline is untouched."""
    from diffusers import DDIMScheduler

    if pipeline_kind(pipe) == "unconditional":
        from . import as_ddim

        return as_ddim(pipe)  # DDPMPipeline samples with DDIM through DDIMPipeline
    components = dict(pipe.components)
    components["scheduler"] = DDIMScheduler.from_config(pipe.scheduler.config)
    # Non-module init arguments (StableDiffusionPipeline's requires_safety_checker) come from the config,
    # so that rebuilding does not warn about a safety checker the caller left out on purpose.
    params = inspect.signature(type(pipe).__init__).parameters
    extra = {k: pipe.config[k] for k in params if k not in components and k != "self" and k in pipe.config}
    new = type(pipe)(**components, **extra)
    if getattr(pipe, "labels", None):  # DiTPipeline's label names come from id2label, not a component
        new.labels = dict(pipe.labels)
    return new


def _num_classes(pipe, kind: str) -> int | None:
    from ..models import denoiser_of

    model = denoiser_of(pipe)[2]
    if kind == "dit":
        return model.config.num_embeds_ada_norm
    return model.config.num_class_embeds if model.config.class_embed_type is None else None


def conditioning(pipe, plan: SamplingPlan) -> tuple[str, list]:
    """(kind, one entry per image: a class label, a prompt, or None)."""
    from ..models.base import spread_labels

    kind = pipeline_kind(pipe)
    n = plan.num_images
    if kind in ("class_conditional", "dit"):
        num_classes = _num_classes(pipe, kind)
        if plan.class_labels:
            labels = [int(v) for v in plan.class_labels]
            if num_classes is not None and not all(0 <= v < num_classes for v in labels):
                raise ValueError(f"class labels {labels} are invalid for this model: it has {num_classes} classes, "
                                 f"so labels must lie in [0, {num_classes - 1}]")
            return kind, [labels[i % len(labels)] for i in range(n)]
        if num_classes is None:
            raise ValueError("this model takes class labels but its config does not say how many classes there are; "
                             "pass the labels to sample (CLI: evaluate --class-labels 0 1 2 ...)")
        return kind, spread_labels(num_classes, n).tolist()
    if kind == "text_to_image":
        prompts = list(plan.prompts) or list(EVALUATION_PROMPTS)
        return kind, [prompts[i % len(prompts)] for i in range(n)]
    return kind, [None] * n


@torch.no_grad()
def paired_samples(pipe, plan: SamplingPlan, progress: bool = False) -> tuple[np.ndarray, float]:
    """``plan.num_images`` samples as numpy [N, H, W, C] in [0, 1] and the seconds they took.
    Batch b starts from generator seed ``plan.seed + b``: two pipelines of the same model given the
    same plan start every image from the same noise with the same conditioning."""
    from ..models import denoiser_of

    kind, cond = conditioning(pipe, plan)
    # the pipeline's own default (DiT 4, SD 7.5, SDXL 5) unless the plan names one
    scale = denoiser_of(pipe)[0].default_guidance_scale if plan.guidance_scale is None else plan.guidance_scale
    ddim = with_ddim(pipe)
    ddim.set_progress_bar_config(disable=not progress)
    out, start = [], time.perf_counter()
    for b, first in enumerate(range(0, plan.num_images, plan.batch_size)):
        batch = cond[first : first + plan.batch_size]
        common = dict(num_inference_steps=plan.num_inference_steps, output_type="np",
                      generator=torch.Generator().manual_seed(plan.seed + b))
        if kind == "unconditional":
            images = ddim(batch_size=len(batch), eta=0.0, **common).images
        elif kind == "class_conditional":
            images = ddim(class_labels=batch, eta=0.0, **common).images
        elif kind == "dit":
            images = ddim(class_labels=batch, guidance_scale=scale, **common).images
        else:
            images = ddim(prompt=batch, guidance_scale=scale, eta=0.0, **common).images
        out.append(np.asarray(images, dtype=np.float64))
    seconds = time.perf_counter() - start
    images = np.concatenate(out)
    return (images[..., None] if images.ndim == 3 else images), seconds


__all__ = ["EVALUATION_PROMPTS", "SamplingPlan", "conditioning", "paired_samples", "pipeline_kind", "with_ddim"]
