"""LoRA adapters on a quantized denoiser, through diffusers' own calls (``pipe.load_lora_weights``,
``unet.load_lora_adapter``, ``unet.add_adapter``, ``set_adapters``, ``disable_lora``, ``unload_lora_weights``).

The adapter runs beside the quantized layer, in the adapter's own float precision, as QLoRA does:
``wrapper(x) + lora_B(lora_A(dropout(x))) * scaling``, the LoRA branch reading the layer's unquantized
input. The quantized weights are never changed, so fusing is refused (it would requantize the codes and
lose the calibration) and unloading gives back the model bit for bit.

peft is an optional dependency: nothing here imports it until a LoRA call is made
(:func:`install`). The peft layer classes are in ``lora/layers.py``.
"""

from __future__ import annotations

import logging

from torch import nn

from ..quant.layers import QuantLayer
from ..runtime.layers import IntegerLayer
from .checks import check_plain_lora, refuse_fuse  # noqa: F401 - modeling calls lora.refuse_fuse

logger = logging.getLogger(__name__)

# The modules a LoRA targets on a quantized model: the wrappers, at the original layers' names.
WRAPPERS = (QuantLayer, IntegerLayer)

_installed = False


def install() -> None:
    """Teach peft's LoRA injection about the quantized layers (idempotent).

    diffusers builds the LoraConfig itself inside ``load_lora_adapter``, so the layer classes cannot be
    handed to it by the caller; instead peft's ``LoraModel.inject_adapter`` is wrapped once: for a model
    holding quantized layers it refuses targets inside a wrapper before anything is replaced, then
    registers the LoRA layer classes on the adapter's config through peft's custom-module hook
    (``LoraConfig._register_custom_module``), which peft's dispatch consults first. ``_replace_module``
    is wrapped for the integer layers alone (see below). Other models pass through untouched."""
    global _installed
    if _installed:
        return
    try:
        from peft.tuners.lora import LoraModel
    except ImportError as e:
        raise ImportError("LoRA adapters need peft: pip install peft") from e
    original = LoraModel.inject_adapter

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        if has_quantized_layers(model):
            config = self.peft_config[adapter_name]
            check_plain_lora(config)
            refuse_inner_targets(model, lambda key: self._check_target_module_exists(config, key),
                                 kwargs.get("state_dict"))
            register_layers(config)
        return original(self, model, adapter_name, *args, **kwargs)

    original_replace = LoraModel._replace_module

    def replace_module(self, parent, child_name, new_module, child):
        # peft looks for a float weight (or any parameter) to place the adapter by; an integer layer has
        # neither, and its LoRA layer already placed the adapter on the layer's device.
        if isinstance(child, IntegerLayer):
            setattr(parent, child_name, new_module)
            return
        original_replace(self, parent, child_name, new_module, child)

    LoraModel.inject_adapter = inject_adapter
    LoraModel._replace_module = replace_module
    _installed = True
    logger.debug("registered the quantized layers with peft's LoRA injection")


def register_layers(config) -> None:
    """Map the quantized wrappers to their LoRA layers on a peft ``LoraConfig``."""
    from .layers import custom_modules

    config._register_custom_module(custom_modules())


def has_quantized_layers(model: nn.Module) -> bool:
    return any(isinstance(m, WRAPPERS) for m in model.modules())


def refuse_inner_targets(model: nn.Module, targeted, state_dict=None) -> None:
    """Refuse an adapter that targets the float layer inside a wrapper (``to_q.layer``): the wrapper
    computes from that layer's weight without calling it, so the adapter would change nothing.
    ``targeted(name)`` says whether the config matches module ``name``; with a state dict, its keys
    name the targets too (peft then injects by them)."""
    keyed = set()
    if state_dict:
        keyed = {k.split(".lora_")[0] for k in state_dict if ".lora_" in k}
    inner = [f"{name}.layer" for name, m in model.named_modules() if isinstance(m, WRAPPERS) and hasattr(m, "layer")]
    wrong = [name for name in inner if name in keyed or targeted(name)]
    if wrong:
        outer = sorted({name.rsplit(".", 1)[0].rsplit(".", 1)[-1] for name in wrong})
        raise ValueError(
            f"the LoRA targets {len(wrong)} float layer(s) inside quantized wrappers (e.g. {wrong[0]!r}); the "
            "quantized layer computes from its own quantized weight, so an adapter there would have no effect. "
            f"Target the quantized layer by its original name instead: target_modules={outer!r} (without '.layer')")


def lora_layers(model: nn.Module) -> list[str]:
    """Names of the LoRA layers peft put into ``model`` (with or without adapters left in them)."""
    return [name for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def refuse_if_adapted(model: nn.Module, action: str) -> None:
    """A quantized checkpoint holds the calibrated base model only: saving one with a LoRA in it would
    either drop the adapter silently or bake it into the codes (requantizing). Refuse, saying how."""
    names = lora_layers(model)
    if not names:
        return
    adapters = sorted(getattr(model, "peft_config", {}) or {})
    raise ValueError(
        f"cannot {action} a quantized model with LoRA layers in it ({len(names)} layers, adapters {adapters}): the "
        "quantized checkpoint holds the calibrated base model only. Save the adapter on its own "
        "(unet.save_lora_adapter(folder) or pipe.save_lora_weights(folder, unet_lora_layers=...)), remove it with "
        "unet.unload_lora() / pipe.unload_lora_weights(), then save the quantized model; load the adapter "
        "again after loading the model")


def check_config_targets(model: nn.Module, config) -> None:
    """:func:`check_plain_lora` and :func:`refuse_inner_targets` for a peft config, its targets matched
    the way peft matches them."""
    from peft.tuners.tuners_utils import check_target_module_exists

    check_plain_lora(config)
    refuse_inner_targets(model, lambda key: check_target_module_exists(config, key))
