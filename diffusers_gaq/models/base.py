"""The interface every model family implements, and the calibration conditioning it hands out.

A *family* is what diffusers-gaq knows about one kind of denoiser (``UNet2DModel``,
``DiTTransformer2DModel``, ``UNet2DConditionModel``, ...): which pipelines carry it and under
which component name, the shape of its input, how to call it, how to build the conditioning
of the calibration trajectories (class labels, prompt embeddings, classifier-free guidance),
its reconstruction units and the skip concatenations whose halves get separate quantizers.
Everything outside ``models/`` asks the family instead of knowing the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class CalibrationConditioning:
    """Conditioning of the calibration trajectories.

    ``branches`` holds one dict per model call made at every sampling step: one branch for
    unconditional or plainly conditional models, two (conditional first, then unconditional)
    when classifier-free guidance is on. Each dict maps a model keyword argument (its name in
    ``CalibrationData.conditioning``) to a table whose row ``j % len(table)`` is the value for
    trajectory ``j``; so a trajectory's conditioning depends on its index alone, whichever
    process samples it. With two branches the pipeline's guidance,
    ``eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)``, drives the trajectory, and
    both inputs become calibration samples (the quantized model sees both in use).
    """

    branches: list[dict[str, torch.Tensor]] = field(default_factory=lambda: [{}])
    guidance_scale: float | None = None

    def __post_init__(self):
        if not self.branches:
            raise ValueError("CalibrationConditioning needs at least one branch")
        keys = set(self.branches[0])
        if any(set(b) != keys for b in self.branches):
            raise ValueError("every conditioning branch must hold the same keys, got "
                             f"{[sorted(b) for b in self.branches]}")
        if len(self.branches) > 2:
            raise ValueError(f"at most two branches (conditional, unconditional), got {len(self.branches)}")
        if len(self.branches) == 2 and self.guidance_scale is None:
            raise ValueError("two conditioning branches need a guidance_scale")

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def for_trajectories(self, ids, device: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
        """Per branch, the conditioning of trajectories ``ids`` (batch-first tensors)."""
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        out = []
        for branch in self.branches:
            out.append({k: (v[ids % len(v)].to(device) if device is not None else v[ids % len(v)])
                        for k, v in branch.items()})
        return out


class ModelFamily:
    """Base of the families. Subclasses set the class attributes and override what differs."""

    name: str = ""
    model_classes: tuple[type, ...] = ()
    # Reconstruction units, as in BRECQ / Q-Diffusion: the outermost modules of these types that hold
    # quantized layers; quantized layers outside any unit are reconstructed alone.
    unit_types: tuple[type, ...] = ()
    # The pipeline attribute that holds the denoiser.
    component: str = "unet"
    # The pipeline's own default classifier-free guidance scale (None: the pipeline has no guidance);
    # calibration trajectories and evaluation samples use it unless the config / plan names one.
    default_guidance_scale: float | None = None

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_classes)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        """Refuse configurations the calibration cannot drive, before any work starts."""

    @classmethod
    def pipeline_classes(cls) -> tuple[type, ...]:
        """Pipelines whose ``component`` this family quantizes, and that it knows how to sample."""
        return ()

    @classmethod
    def check_pipeline(cls, pipe, model: nn.Module) -> None:
        """Refuse a supported model inside a pipeline that could not sample it, before any work."""

    @classmethod
    def skip_splits(cls, model: nn.Module) -> dict[str, int]:
        return {}

    @classmethod
    def first_last_layers(cls, model: nn.Module) -> list[str]:
        """Module names of the model's first and last layers (input and output projections), which
        ``GradientAlignedQuantizer.first_last_precision`` applies to; quantization hurts them most."""
        return []

    @classmethod
    def sample_shape(cls, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) of the denoiser's input (pixels or latents)."""
        size = model.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return model.config.in_channels, h, w

    @classmethod
    def conditioning_bytes_per_sample(cls, model: nn.Module) -> int:
        """Bytes of conditioning stored with each calibration sample (for disk-space checks)."""
        return 0

    @classmethod
    def forward(cls, model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                conditioning: dict | None = None) -> torch.Tensor:
        """The model's noise prediction (what the scheduler steps with) for a batch."""
        raise NotImplementedError

    @classmethod
    def example_conditioning(cls, model: nn.Module, batch_size: int = 1) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def example_input(cls, model: nn.Module, batch_size: int = 1):
        """(sample, timestep, conditioning) for one forward pass, e.g. to list units in call order."""
        c, h, w = cls.sample_shape(model)
        t = torch.full((batch_size,), 500, dtype=torch.long)
        return torch.randn(batch_size, c, h, w), t, cls.example_conditioning(model, batch_size)

    @classmethod
    def calibration_conditioning(cls, pipe, model: nn.Module, config, device: torch.device | None = None
                                 ) -> CalibrationConditioning:
        """Conditioning of the calibration trajectories; ``pipe`` may be None for models whose
        conditioning needs no other pipeline component. Raises before any sampling when the
        config cannot drive this model."""
        return CalibrationConditioning()


def spread_labels(num_classes: int, n: int) -> torch.Tensor:
    """n class labels spread evenly over [0, num_classes): trajectory j gets (j * K) // n (every
    class, cycling, when n > K)."""
    if n <= num_classes:
        return torch.tensor([(j * num_classes) // n for j in range(n)], dtype=torch.long)
    return torch.arange(n, dtype=torch.long) % num_classes


def labels_table(config, num_classes: int | None, field_hint: str) -> torch.Tensor:
    """The class-label table of the calibration trajectories: ``config.class_labels`` when given
    (checked against ``num_classes``), else an even spread over every class."""
    if config.class_labels:
        labels = torch.tensor(list(config.class_labels), dtype=torch.long)
        if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"GradientAlignedQuantizer.class_labels={list(config.class_labels)} is invalid for this "
                             f"model: {field_hint} gives {num_classes} classes, so labels must lie in "
                             f"[0, {num_classes - 1}]")
        return labels
    if num_classes is None:
        raise ValueError(f"this model takes class labels but {field_hint} does not say how many classes there are; "
                         "set GradientAlignedQuantizer.class_labels (CLI: --class-labels) to the labels to calibrate on")
    return spread_labels(num_classes, config.samples_per_timestep)


def guidance_scale(config, default: float) -> float:
    """The guidance scale of the calibration trajectories: the config's, else the pipeline's default."""
    return default if config.guidance_scale is None else float(config.guidance_scale)


__all__ = ["CalibrationConditioning", "ModelFamily", "guidance_scale", "labels_table", "spread_labels"]
