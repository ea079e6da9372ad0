"""The refusals the LoRA layers and the model's calls share (no peft needed)."""

from __future__ import annotations

# init_lora_weights values that do not read the base layer's float weight (PiSSA, OLoRA, LoftQ, ... do).
PLAIN_INITS = (True, False, "gaussian")


def check_plain_lora(config) -> None:
    """Only plain LoRA: DoRA and the other variants, and the initialisations computed from the base
    weight, need the layer's float weight, which a quantized layer does not have as such."""
    if getattr(config, "use_dora", False):
        raise ValueError("DoRA (use_dora=True) is not supported on a quantized layer: its magnitude vector is "
                         "computed from the float weight; use plain LoRA")
    if getattr(config, "init_lora_weights", True) not in PLAIN_INITS:
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is not supported on a quantized layer "
                         f"(it reads the float weight); use one of {PLAIN_INITS}")


def refuse_fuse() -> None:
    raise ValueError(
        "fuse_lora() is not supported on a quantized model: fusing would add the LoRA delta to the calibrated "
        "weights and requantize them, losing the calibration (and the integer runtime holds no float weights to "
        "add to). The adapter already runs beside the quantized layers at its own precision; use set_adapters() "
        "to weight it and unload_lora_weights() to remove it")
