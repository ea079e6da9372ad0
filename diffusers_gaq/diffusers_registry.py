"""diffusers' own loading path for saved quantized models: ``UNet2DModel.from_pretrained(folder)``.

A quantized checkpoint's weights file holds packed integer codes, not the base class's tensors, so a
base-class ``from_pretrained`` that knew nothing of it would build the model, find none of its
weights and leave them randomly initialised, with only a warning: FP-looking weights, silently wrong.
Two things prevent that:

* every saved config.json carries ``"quantization_config": {"quant_method": "diffusers_gaq", ...}``
  (config_json_entry), so that diffusers treats the folder as pre-quantized;
* ``import diffusers_gaq`` registers "diffusers_gaq" in diffusers' quantizer registry
  (``diffusers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` / ``AUTO_QUANTIZATION_CONFIG_MAPPING``, plain
  dictionaries keyed by ``quant_method``), so that ``UNet2DModel.from_pretrained(folder)`` (and
  DiTTransformer2DModel / Transformer2DModel / UNet2DConditionModel alike, ``subfolder=`` included)
  returns the quantized model itself, computing bit-identically to ``load_quantized(folder)``.

What diffusers allows and what it does not: its loader builds the base class on the meta device and
offers hooks (``maybe_update_loaded_keys`` sees the weight files, ``preprocess_model`` the empty model,
``maybe_update_state_dict`` the tensors). The quantizer below loads the checkpoint with diffusers-gaq's
own verified loader in the first hook, moves the result into the model diffusers built in the second
(the instance's class becomes ``Quantized<Class>``, still a subclass of the class called) and hands
diffusers an empty state dict in the third, so nothing is loaded twice and no key is reported
missing. diffusers resolves ``quant_method`` only in that registry, which exists only in the process
that imported diffusers_gaq: without the import, diffusers itself refuses the folder with
"Unknown quantization type, got diffusers_gaq" (its message, which we cannot change), which is still
never silently wrong. ``device_map`` and sharded checkpoints are refused with a message naming
``QuantizedUNet2DModel.from_pretrained``; a float16 / bfloat16 torch_dtype loads the model computing in
float32 (quantized_forward.py). From the Hub, diffusers fetches
only config.json and the weights, not quantization_config.json: the quantizer fetches it (and the
calibration report) from the same commit into the same cache snapshot before loading.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch


@contextlib.contextmanager
def _quiet(*logger_names: str):
    levels = {name: logging.getLogger(name).level for name in logger_names}
    for name in logger_names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# diffusers' quantizer registry imports torchao when it is installed. On a machine without CUDA,
# torchao logs that its CUDA extensions did not load, torch notes its enum registrations and diffusers
# that torchao's older tensor classes are gone: warnings about backends this import does not use.
with _quiet("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    from diffusers.quantizers import auto
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from .checkpoint_layout import COMPONENT_LIBRARY, QUANT_METHOD, config_json_entry
from .config import CONFIG_NAME
from .load_options import QUANTIZE_ON_LOAD_REFUSAL, check_torch_dtype

logger = logging.getLogger(__name__)

class _Method(str):
    """diffusers reads ``quant_method.value`` (its QuantizationMethod is an Enum we cannot extend)."""

    @property
    def value(self) -> str:
        return str(self)


def _loader_error(what: str, load_with: str | None) -> ValueError:
    call = load_with or "import diffusers_gaq; Quantized<Class>.from_pretrained(path)"
    return ValueError(f"{what}; load this diffusers-gaq checkpoint with diffusers_gaq's own call instead: {call} "
                      "(or diffusers_gaq.modeling.load_quantized(path), or "
                      "DiffusionPipeline.from_pretrained(pipeline_folder) after `import diffusers_gaq`)")


def register() -> None:
    """Add the quantizer to diffusers' registry (idempotent). Called by ``import diffusers_gaq``."""
    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return

    class GaqLoadingConfig(QuantizationConfigMixin):
        """config.json's quantization_config; nothing to configure (quantization_config.json holds it all)."""

        def __init__(self, quant_method: str = QUANT_METHOD, load_with: str | None = None, **settings):
            if settings:  # PipelineQuantizationConfig(quant_backend="diffusers_gaq", quant_kwargs=...)
                raise ValueError(f"{QUANTIZE_ON_LOAD_REFUSAL} (got quantization settings {sorted(settings)})")
            self.quant_method = _Method(quant_method)
            self.load_with = load_with

        def to_diff_dict(self) -> dict:  # diffusers' repr / logging of a config asks for it
            return {"quant_method": str(self.quant_method), "load_with": self.load_with}

    class GaqDiffusersQuantizer(DiffusersQuantizer):
        # Not "requires_calibration": diffusers would refuse quantize-on-load with its own message; validate_environment
        # refuses it with the call to make instead.
        requires_calibration = False
        use_keep_in_fp32_modules = False

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self._loaded = None

        def validate_environment(self, *args, torch_dtype=None, device_map=None, **kwargs):
            if not self.pre_quantized:  # from_pretrained(fp_model, quantization_config=GradientAlignedQuantizer(...))
                raise ValueError(QUANTIZE_ON_LOAD_REFUSAL)

            if device_map is not None:
                raise _loader_error(f"device_map={device_map!r} is not supported for a diffusers-gaq checkpoint",
                                    self.quantization_config.load_with)
            check_torch_dtype(torch_dtype)

        def update_torch_dtype(self, torch_dtype):
            return torch.float32  # the quantized model converts half-precision inputs and outputs itself

        def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
            files = [Path(f) for f in checkpoint_files if isinstance(f, (str, Path))]
            if len(files) != 1:
                raise _loader_error(f"a sharded or in-memory checkpoint ({len(checkpoint_files)} files) cannot be read "
                                    "here", self.quantization_config.load_with)
            folder = files[0].parent
            from .checkpoint_source import fetch_missing_files

            fetch_missing_files(folder)
            if not (folder / CONFIG_NAME).is_file():
                raise _loader_error(f"{folder} has no {CONFIG_NAME} next to the weights (diffusers fetches only "
                                    "config.json and the weights from the Hub)", self.quantization_config.load_with)
            # Imported here, not at the top: `import diffusers_gaq` registers this quantizer, and the model
            # classes behind load_quantized cost seconds of import that only a load needs.
            from .modeling import load_quantized

            self._loaded = load_quantized(folder)
            return list(self._loaded.state_dict().keys())

        def _process_model_before_weight_loading(self, model, **kwargs):
            loaded = self._loaded
            if not isinstance(loaded, type(model)):
                raise _loader_error(f"the checkpoint holds a {type(loaded).__mro__[2].__name__}, not a "
                                    f"{type(model).__name__}", self.quantization_config.load_with)
            # Become the loaded model: the same modules, tensors and quantization state in the
            # instance diffusers returns. Its class is Quantized<Class>, a subclass of type(model).
            model.__class__ = type(loaded)
            model.__dict__.clear()
            model.__dict__.update(loaded.__dict__)
            return model

        def maybe_update_state_dict(self, state_dict):
            return {}  # everything is in place already: load nothing over it

        def update_missing_keys(self, model, missing_keys, prefix):
            return []

        def check_if_quantized_param(self, *args, **kwargs) -> bool:
            return False

        def _process_model_after_weight_loading(self, model, **kwargs):
            model.is_quantized, model.quantization_method = True, self.quantization_config.quant_method
            self._loaded = None
            return model

        @property
        def is_serializable(self) -> bool:
            return True  # the model's own save_pretrained writes the diffusers-gaq format

        @property
        def is_trainable(self) -> bool:
            return False

    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = GaqLoadingConfig
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = GaqDiffusersQuantizer
    _register_component_library()
    _register_with_transformers(GaqLoadingConfig)
    logger.debug("registered quant_method %r with diffusers", QUANT_METHOD)


def _register_with_transformers(config_class) -> None:
    # diffusers' PipelineQuantizationConfig accepts a quant_backend only if transformers knows it too.
    # Registered there, `quant_backend="diffusers_gaq"` reaches the config class, which refuses
    # quantize-on-load with the call to make instead (its constructor above), before any weight loads.
    try:
        from transformers.quantizers import auto as transformers_auto
    except ImportError:
        return
    transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, config_class)


def _register_component_library() -> None:
    # A saved pipeline names its quantized denoiser ["diffusers_gaq.modeling", "Quantized<Class>"] in
    # model_index.json. Before downloading a Hub repo, diffusers' pipeline loader takes any library it
    # does not know for custom code that must ship in the repo (<component>/<library>.py); listing the
    # module among its loadable libraries, as a ModelMixin provider like diffusers itself, makes it
    # load the component with from_pretrained instead. Locally it resolves the imported module anyway.
    from diffusers.pipelines import pipeline_loading_utils

    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(
        COMPONENT_LIBRARY, {"ModelMixin": ["save_pretrained", "from_pretrained"]})


__all__ = ["QUANT_METHOD", "config_json_entry", "register"]
