"""The names of a quantized checkpoint's files, its format version, and the error a folder that is
not a readable checkpoint raises. The lowest layer of the format: serialization.py and
checkpoint_checks.py both build on it."""

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MODEL_CONFIG_NAME = "config.json"
REPORT_TENSORS = "calibration_report.safetensors"
REPORT_JSON = "calibration_report.json"
# 2: quantization_config.json records weights_sha256, the digest of the weights file's tensors.
# 3: it also records files_sha256, the digests of config.json and of itself (file_digests.py).
# Version 1 and 2 checkpoints still load, with what they record verified.
FORMAT_VERSION = 3
PACKED_SUFFIX = ".weight_packed"


class CheckpointError(ValueError):
    """A folder is not a readable diffusers-gaq checkpoint; the message names the file and the problem."""


# config.json's "quantization_config" names this method, so that diffusers' own from_pretrained routes a
# quantized folder to diffusers_registry.py (after `import diffusers_gaq`) or refuses it: never FP-looking weights.
QUANT_METHOD = "diffusers_gaq"
# How a saved pipeline's model_index.json names the library of its quantized component.
COMPONENT_LIBRARY = "diffusers_gaq.modeling"


def config_json_entry(base_class: str) -> dict:
    """config.json's ``quantization_config``: enough for diffusers to route the load here (or refuse it);
    the full description stays in quantization_config.json."""
    return {"quant_method": QUANT_METHOD, "load_with": f"import diffusers_gaq; Quantized{base_class}.from_pretrained(path)"}
