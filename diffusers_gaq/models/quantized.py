"""The quantized model class: the base diffusers class plus the quantization state.

``quantized_class(UNet2DModel)`` is a subclass named ``QuantizedUNet2DModel``; a wrapped model's
``__class__`` is switched to it, so it stays a ``UNet2DModel`` for pipelines and schedulers
(``unet(x, t).sample``, ``.config``, ``.dtype``, ``.device``) while ``save_pretrained``,
``from_pretrained`` and ``push_to_hub`` speak the quantized format (serialization.py).
"""

from __future__ import annotations

from functools import lru_cache

from torch import nn


class QuantizedModelMixin:
    """State carried by a quantized model: ``gaq_config`` (GradientAlignedQuantizer),
    ``gaq_wrap`` (WrapReport), ``gaq_report`` (CalibrationReport or None after loading)."""

    gaq_config = None
    gaq_wrap = None
    gaq_report = None
    gaq_evaluation = None  # fidelity numbers for the model card, when an evaluation ran

    def save_pretrained(self, save_directory, *, overwrite: bool = False, **kwargs):
        from ..serialization import save_quantized

        return save_quantized(self, save_directory, overwrite=overwrite, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        from ..serialization import load_quantized

        return load_quantized(pretrained_model_name_or_path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        from ..hub import push_quantized

        return push_quantized(self, repo_id, **kwargs)


@lru_cache(maxsize=None)
def quantized_class(base: type) -> type:
    return type(f"Quantized{base.__name__}", (QuantizedModelMixin, base), {"__module__": __name__})


def mark_quantized(model: nn.Module, config, wrap_report, report=None) -> nn.Module:
    if not isinstance(model, QuantizedModelMixin):
        model.__class__ = quantized_class(type(model))
    model.gaq_config, model.gaq_wrap, model.gaq_report = config, wrap_report, report
    return model
