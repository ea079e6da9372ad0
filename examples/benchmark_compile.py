"""torch.compile (Inductor) of a quantized reference UNet against eager: time per forward, first-call
compile time, graphs and recompiles over a sampling loop's timesteps, and the largest difference.

    OMP_NUM_THREADS=1 python examples/benchmark_compile.py --threads 1 --batch 8 --runtime simulated

The model: the embedded reference UNet quantized W4A8 with the default settings (split shortcut, quantized
attention) on a min-max calibration (speed does not depend on the scales).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHEAP = dict(method="minmax", weighting="uniform", num_inference_steps=2, num_calibration_timesteps=1,
             samples_per_timestep=2, num_groups=1, val_fraction=0.0, calibration_batch_size=2, recon_batch_size=2)
TIMESTEPS = [torch.tensor(t) for t in range(999, 0, -100)]


def quantized_unet(folder: Path, runtime: str):
    from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
    from diffusers_gaq.modeling import QuantizedUNet2DModel
    from diffusers_gaq.reference import load_reference_pipeline

    qpipe = quantize_pipeline(load_reference_pipeline(), GradientAlignedQuantizer(weight_bits=4, act_bits=8, **CHEAP),
                              progress=False)
    qpipe.unet.save_pretrained(folder, model_card=False)
    return QuantizedUNet2DModel.from_pretrained(folder, runtime=runtime).eval()


def per_forward(fn, x, repeats: int) -> float:
    start = time.perf_counter()
    for i in range(repeats):
        fn(x, TIMESTEPS[i % len(TIMESTEPS)])
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runtime", default="simulated")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        unet = quantized_unet(Path(tmp), args.runtime)
        size = unet.config.sample_size
        x = torch.randn(args.batch, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
        eager = [unet(x, t).sample for t in TIMESTEPS]
        compiled = torch.compile(unet, fullgraph=True)
        start = time.perf_counter()
        first = compiled(x, TIMESTEPS[0]).sample
        compile_s = time.perf_counter() - start
        outs = [first] + [compiled(x, t).sample for t in TIMESTEPS[1:]]
        diff = max(float((o - e).abs().max() / e.abs().max()) for o, e in zip(outs, eager))
        eager_s = per_forward(unet, x, args.repeats)
        compiled_s = per_forward(compiled, x, args.repeats)
    print(f"runtime={args.runtime} batch={args.batch} threads={args.threads} torch={torch.__version__}")
    print(f"graphs={counters['stats']['unique_graphs']} recompiles over {len(TIMESTEPS)} timesteps="
          f"{sum(counters['recompiles'].values())} graph_breaks={sum(counters['graph_break'].values())}")
    print(f"eager {eager_s * 1e3:.1f} ms/forward, compiled {compiled_s * 1e3:.1f} ms/forward "
          f"({eager_s / compiled_s:.2f}x), first call (compile) {compile_s:.1f} s, "
          f"max |compiled - eager| / max |eager| = {diff:.2e}")


if __name__ == "__main__":
    main()
