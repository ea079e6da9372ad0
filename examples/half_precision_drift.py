"""How far a half-precision pipeline moves a quantized pipeline's images, against the quantization
error itself and FP's own half-precision drift: the numbers of README "Loading and sharing".

    python examples/half_precision_drift.py

The pipeline is the test suite's tiny Stable-Diffusion-like one (random weights, tiny CLIP text
encoder and VAE built from configs; tests/test_families.py), quantized W8A8 on the tiny budget.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_families import TINY, build_pipeline  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline  # noqa: E402
from diffusers_gaq.modeling import save_quantized_pipeline  # noqa: E402

PROMPT = dict(prompt=["a red fox"], num_inference_steps=4, guidance_scale=3.0, output_type="np", height=32, width=32)


def images(folder: Path, dtype=None) -> np.ndarray:
    pipe = DiffusionPipeline.from_pretrained(folder, **({"torch_dtype": dtype} if dtype else {}))
    return pipe(generator=torch.Generator().manual_seed(0), **PROMPT).images


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        fp_folder, q_folder = Path(tmp) / "fp", Path(tmp) / "q"
        fp = build_pipeline("sd")
        fp.save_pretrained(fp_folder)
        save_quantized_pipeline(quantize_pipeline(fp, GradientAlignedQuantizer(**TINY), progress=False), q_folder)
        fp32, q32 = images(fp_folder), images(q_folder)
        error = np.abs(q32 - fp32)
        for dtype in (torch.float16, torch.bfloat16):
            fp_drift = np.abs(images(fp_folder, dtype) - fp32)
            q_drift = np.abs(images(q_folder, dtype) - q32)
            print(f"{dtype}: quantized pipeline's drift mean {q_drift.mean():.4f} max {q_drift.max():.4f}; "
                  f"quantization error mean {error.mean():.4f} max {error.max():.4f}; "
                  f"FP's own drift mean {fp_drift.mean():.4f} max {fp_drift.max():.4f}")


if __name__ == "__main__":
    main()
