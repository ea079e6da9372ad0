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

    # Loaded for inference: the integer runtime (int8 weights on oneDNN's int8 kernels on x86 CPUs).
    unet = QuantizedUNet2DModel.from_pretrained(f"{tmp}/ddpm-w4a8")
    reloaded = DiffusionPipeline.from_pretrained(f"{tmp}/ddpm-w4a8-pipeline")
    assert isinstance(reloaded, DDIMPipeline) and isinstance(reloaded.unet, QuantizedUNet2DModel)
    print(unet.quantization.runtime.summary())
    # The simulated (fake-quant) model, one argument away, is the saved model bit for bit.
    simulated = QuantizedUNet2DModel.from_pretrained(f"{tmp}/ddpm-w4a8", runtime="simulated")

    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        same = torch.equal(qpipe.unet(x, t).sample, simulated(x, t).sample)
        runtime_images = reloaded(batch_size=4, num_inference_steps=10, output_type="np",
                                  generator=torch.Generator().manual_seed(0)).images
    simulated_images = qpipe(batch_size=4, num_inference_steps=10, output_type="np",
                             generator=torch.Generator().manual_seed(0)).images
    psnr = 10 * torch.log10(1 / torch.tensor((runtime_images - simulated_images) ** 2).double().mean().clamp_min(1e-20))
    print(f"{config.tag}: {len(images)} images; simulated reload bit-identical: {same}; "
          f"integer runtime vs simulated: {psnr.item():.1f} dB PSNR")
    assert same and psnr > 30
