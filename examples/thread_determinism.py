"""What the thread count changes in a calibration, and what one thread costs: the numbers of
docs/reliability.md "Determinism".

    python examples/thread_determinism.py [--budget tiny] [--repeats 2]

Runs `diffusers-gaq quantize reference` with OMP_NUM_THREADS=1 and =2, alternating, each in a fresh
process; compares the two saved weight files (code bytes, activation steps) and prints the best
wall time of each thread count.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def quantize(threads: int, budget: str, out: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffusers_gaq", "quantize", "reference", "--budget", budget, "--quiet",
                    "--output", str(out)], env=env, check=True)
    return time.perf_counter() - start


def compare(a: dict, b: dict) -> str:
    codes = [k for k in a if a[k].dtype == torch.uint8]
    differ = sum(int((a[k] != b[k]).sum()) for k in codes)
    total = sum(a[k].numel() for k in codes)
    sa, sb = a["gaq.act_scales"], b["gaq.act_scales"]
    relative = float(((sa - sb).abs() / sa.abs().clamp_min(1e-12)).max())
    return (f"code bytes differing: {differ} of {total} ({100 * differ / total:.2f} %); activation steps differing: "
            f"{int((sa != sb).sum())} of {sa.numel()}, by up to {100 * relative:.1f} % relative")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="tiny")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for threads in (1, 2) if r % 2 == 0 else (2, 1):  # alternate the order between repeats
                times[threads].append(quantize(threads, args.budget, Path(tmp) / f"t{threads}-{r}"))
        print(compare(load_file(str(Path(tmp) / "t1-0" / WEIGHTS)), load_file(str(Path(tmp) / "t2-0" / WEIGHTS))))
    print(f"quantize (budget {args.budget}) best of {args.repeats}: 1 thread {min(times[1]):.1f} s, "
          f"2 threads {min(times[2]):.1f} s ({min(times[1]) / min(times[2]):.2f}x)")


if __name__ == "__main__":
    main()
