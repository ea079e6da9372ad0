"""What the torchao export weighs and costs: file size and one forward of the exported model, loaded by
stock diffusers, beside the FP model in the same process.

    python examples/benchmark_torchao_export.py --models cifar10 --threads 1 --batch-size 8

It reuses the checkpoints ``benchmark_runtime.py`` prepares under ``--workdir`` (the FP model and
its W8A8 / W4A8 quantization), writing them first if they are missing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_runtime import prepare  # noqa: E402


def best_forward_seconds(model, x, t, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, t)
            times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, folder: Path, batch_size: int, repeats: int) -> None:
    from diffusers import UNet2DModel

    from diffusers_gaq.modeling import load_quantized
    from diffusers_gaq.torchao_export import export_to_torchao

    if not (folder / "done").exists():
        prepare(name, folder)
    fp = UNet2DModel.from_pretrained(folder / "fp")
    fp_bytes = (folder / "fp" / "diffusion_pytorch_model.safetensors").stat().st_size
    shape = (batch_size, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size)
    x, t = torch.randn(shape, generator=torch.Generator().manual_seed(0)), torch.full((batch_size,), 500)
    for kind in ("w8a8", "w4a8"):
        with tempfile.TemporaryDirectory() as tmp:
            export_to_torchao(load_quantized(folder / kind, runtime="simulated")).save_pretrained(tmp)
            size = (Path(tmp) / "diffusion_pytorch_model.safetensors").stat().st_size
            exported = UNet2DModel.from_pretrained(tmp, torch_dtype=torch.float32)
        # Alternate FP and export so that both see the same machine state.
        t_fp, t_ex = best_forward_seconds(fp, x, t, repeats), best_forward_seconds(exported, x, t, repeats)
        t_fp = min(t_fp, best_forward_seconds(fp, x, t, repeats))
        print(f"{name} {kind}: safetensors {size / 2**20:.1f} MiB vs FP {fp_bytes / 2**20:.1f} MiB "
              f"({size / fp_bytes:.3f}x); forward at batch {batch_size}, {torch.get_num_threads()} thread(s): "
              f"FP {t_fp * 1e3:.0f} ms, export {t_ex * 1e3:.0f} ms ({t_fp / t_ex:.2f}x FP's speed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cifar10"], choices=["reference", "cifar10"])
    parser.add_argument("--workdir", type=Path, default=Path("out/benchmark_runtime"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        measure(name, args.workdir / name, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
