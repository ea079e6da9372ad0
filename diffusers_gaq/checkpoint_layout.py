"""The names of a quantized checkpoint's files, its format version, and the error a folder that is
not a readable checkpoint raises. The lowest layer of the format: serialization.py and
checkpoint_checks.py both build on it."""

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MODEL_CONFIG_NAME = "config.json"
REPORT_TENSORS = "calibration_report.safetensors"
REPORT_JSON = "calibration_report.json"
# 2: quantization_config.json records weights_sha256, the digest of the weights file's tensors.
# Version 1 checkpoints (no digest) still load.
FORMAT_VERSION = 2
PACKED_SUFFIX = ".weight_packed"


class CheckpointError(ValueError):
    """A folder is not a readable diffusers-gaq checkpoint; the message names the file and the problem."""
