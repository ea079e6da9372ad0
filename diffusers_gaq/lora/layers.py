"""peft LoRA layers around the quantized wrappers (simulated ``QuantLinear`` / ``QuantConv2d`` and the
integer runtime's ``IntegerLinear`` / ``IntegerConv2d``), in the manner of peft's own bnb / torchao layers.

The forward pass is peft's unchanged: ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``, where the
base layer is the wrapper (it quantizes its own input and weight) and the LoRA branch reads the float
input at the adapter's own precision. What differs from peft's nn.Linear / nn.Conv2d layers is what the
wrappers cannot give: a float weight to merge into (merging is refused), the convolution's class and
geometry (read from the wrapped conv), and, for the integer layers, the device of a float weight.
"""

from __future__ import annotations

import math

from peft.tuners.lora.layer import Conv2d as LoraConv2d
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from torch.nn import functional as F

from ..quant.layers import QuantConv2d, QuantLayer, QuantLinear
from ..runtime.layers import IntegerConv2d, IntegerLayer, IntegerLinear
from .checks import check_plain_lora, refuse_fuse

class _QuantLoraMixin:
    """What the two LoRA layers share: features, device and the refusals."""

    def _get_in_out_features(self, module: nn.Module):
        if isinstance(module, (QuantConv2d, IntegerConv2d)):
            return module.in_channels, module.out_channels
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # An integer layer has no float weight: its scales give the device; the adapter keeps its dtype.
        if isinstance(base_layer, IntegerLayer):
            return base_layer.weight_scale.device, None
        return super()._get_base_layer_device_and_dtype(base_layer)

    def resolve_lora_variant(self, *, config, **kwargs):
        check_plain_lora(config)
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(f"the LoRA variant {type(variant).__name__} is not supported on a quantized layer; use "
                             "plain LoRA")
        return None

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        refuse_fuse()


class QuantLoraLinear(_QuantLoraMixin, LoraLinear):
    """LoRA beside a quantized linear layer."""

    def __repr__(self) -> str:
        return super().__repr__().replace("lora.Linear", "lora.QuantLoraLinear", 1)


def _conv_geometry(base: nn.Module) -> tuple:
    """(kernel_size, stride, padding) of a wrapped convolution, and refuse what peft's LoRA conv layer
    does not model (groups)."""
    conv = base.layer if isinstance(base, QuantLayer) else base
    if conv.groups != 1:
        raise ValueError(f"LoRA on a grouped convolution (groups={conv.groups}) is not supported")
    return conv.kernel_size, conv.stride, conv.padding


class QuantLoraConv2d(_QuantLoraMixin, LoraConv2d):
    """LoRA beside a quantized 2-D convolution: lora_A is a convolution with the layer's kernel size,
    stride and padding (as peft builds it for an nn.Conv2d), lora_B a 1x1 convolution."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs) -> None:
        # peft's _ConvNd.__init__ reads base_layer.weight and builds the adapter with type(base_layer);
        # neither fits a wrapper, so the same steps are taken here from the wrapped conv's geometry.
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        _conv_geometry(base_layer)
        self._active_adapter = adapter_name
        self._kernel_dim = 4
        self.conv_fn = F.conv2d
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        self.resolve_lora_variant(config=config)
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        kernel_size, stride, padding = _conv_geometry(self.get_base_layer())
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Conv2d(self.in_features, r, kernel_size, stride, padding, bias=False)
        self.lora_B[adapter_name] = nn.Conv2d(r, self.out_features, 1, 1, bias=config.lora_bias)
        self.lora_bias[adapter_name] = config.lora_bias
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        if config.init_lora_weights:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def __repr__(self) -> str:
        return super().__repr__().replace("lora.Conv2d", "lora.QuantLoraConv2d", 1)


def custom_modules() -> dict[type, type]:
    """The mapping for ``LoraConfig._register_custom_module``."""
    return {QuantLinear: QuantLoraLinear, IntegerLinear: QuantLoraLinear,
            QuantConv2d: QuantLoraConv2d, IntegerConv2d: QuantLoraConv2d}
