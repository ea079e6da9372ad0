"""The README's Python walk-through, end to end: quantize, sample, save, reload, compare.

    python examples/quickstart.py                  # W4A8 with the default budget (tens of minutes on CPU)
    GAQ_BUDGET=tiny python examples/quickstart.py  # seconds: what the test suite runs
"""

import os
import tempfile

import torch
from diffusers import DDIMPipeline, DiffusionPipeline

import diffusers_gaq  # noqa: F401  (makes QuantizedUNet2DModel known to diffusers' pipeline loader)
from diffusers_gaq import GradientAlignedQuantizer, QuantizedUNet2DModel, quantize_pipeline
from diffusers_gaq.config import BUDGETS
from diffusers_gaq.reference import load_reference_pipeline

budget = BUDGETS[os.environ.get("GAQ_BUDGET", "default")]

pipe = load_reference_pipeline()  # or DDIMPipeline.from_pretrained("google/ddpm-cifar10-32")
config = GradientAlignedQuantizer(weight_bits=4, act_bits=8, **budget)
qpipe = quantize_pipeline(pipe, config)  # `pipe` is left unchanged
images = qpipe(batch_size=4, num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images

with tempfile.TemporaryDirectory() as tmp:
    qpipe.unet.save_pretrained(f"{tmp}/ddpm-w4a8")  # packed 4-bit integers + scales + model card
    qpipe.save_pretrained(f"{tmp}/ddpm-w4a8-pipeline")  # the whole pipeline, scheduler included

    unet = QuantizedUNet2DModel.from_pretrained(f"{tmp}/ddpm-w4a8")
    reloaded = DiffusionPipeline.from_pretrained(f"{tmp}/ddpm-w4a8-pipeline")
    assert isinstance(reloaded, DDIMPipeline) and isinstance(reloaded.unet, QuantizedUNet2DModel)

    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        same = torch.equal(qpipe.unet(x, t).sample, unet(x, t).sample)
        same = same and torch.equal(qpipe.unet(x, t).sample, reloaded.unet(x, t).sample)
    print(f"{config.tag}: {len(images)} images; reloaded models bit-identical: {same}")
    assert same
