"""The quantized model class: the base diffusers class plus the quantization state.

``quantized_class(UNet2DModel)`` is a subclass named ``QuantizedUNet2DModel`` (likewise
``QuantizedUNet2DConditionModel``, ``QuantizedDiTTransformer2DModel``, ``QuantizedTransformer2DModel``);
a wrapped model's ``__class__`` is switched to it, so it stays a ``UNet2DModel`` for pipelines and
schedulers (``unet(x, t).sample``, ``.config``, ``.dtype``, ``.device``) while ``save_pretrained``,
``from_pretrained`` and ``push_to_hub`` speak the quantized format (serialization.py).
"""

from __future__ import annotations

from functools import lru_cache

from diffusers import ModelMixin  # noqa: F401 - looked up here by diffusers' pipeline loader, see below
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
        """Load a diffusers-gaq checkpoint (folder or Hub repo id). Hub options (revision, token,
        cache_dir, local_files_only, force_download, endpoint) go to huggingface_hub; diffusers' loading
        options that do not apply to a quantized model (torch_dtype, variant, ...) are ignored."""
        from ..serialization import load_quantized

        hub_options = ("revision", "token", "cache_dir", "local_files_only", "force_download", "endpoint")
        hub = {k: kwargs[k] for k in hub_options if kwargs.get(k) is not None}
        return load_quantized(pretrained_model_name_or_path, device=kwargs.get("device"), **hub)

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


def _eager_classes():
    # Named module attributes, so that diffusers' pipeline loader finds them from model_index.json.
    # model_index.json records ["diffusers_gaq.models.quantized", "QuantizedUNet2DModel"]; the loader
    # then picks the load method by checking the class against the base classes it finds *in this
    # module* (getattr(module, "ModelMixin")), hence the ModelMixin import at the top.
    from . import FAMILIES

    bases = dict.fromkeys(base for family in FAMILIES for base in family.model_classes)  # SD and SDXL share one
    classes = [quantized_class(base) for base in bases]
    return {cls.__name__: cls for cls in classes}


globals().update(_eager_classes())
