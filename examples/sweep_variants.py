"""A cheap instrument for engine choices: PSNR against FP samples from the same noise, for a list of
config variants, on the reference pipeline, with the calibration data shared by every variant.

    python examples/sweep_variants.py --bits w8a8 --base '{"method": "minmax", "weighting": "uniform"}' \
        --variant ema='{}' --variant shuffled='{"act_range_init": "ema_shuffled"}' --jsonl runs/sweep.jsonl

Each finished row is appended to the JSONL file; a variant already there (same label, bits, seed,
budget, base) is skipped, so an interrupted sweep resumes. 64 images x 20 DDIM steps by default: a
PSNR difference of 1-2 dB between nearby variants is within one calibration's noise (DESIGN.md 9).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline  # noqa: E402
from diffusers_gaq.calibration.data import collect_calibration_data  # noqa: E402
from diffusers_gaq.config import BUDGETS  # noqa: E402
from diffusers_gaq.evaluation import generate, sample_psnr  # noqa: E402
from diffusers_gaq.models import family_for  # noqa: E402
from diffusers_gaq.reference import load_reference_pipeline  # noqa: E402


def parse_bits(tag: str) -> tuple[int, int | None]:
    w, a = tag.lower().lstrip("w").split("a")
    return int(w), (None if int(a) >= 32 else int(a))


def report(paths: list[str]) -> None:
    """The rows of one or more JSONL files as a markdown table, in the order they were run."""
    print("| bits | base | variant | overrides | PSNR vs FP (dB) | summed block loss | calibration (s) |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            print(f"| {r['bits']} | `{r['base']}` | {r['label']} | `{r['overrides']}` | {r['psnr_db']:.2f} | "
                  f"{r['loss_final_sum']:.3f} | {r['calibration_seconds']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", help="comma-separated JSONL files: print their rows as a table and exit")
    p.add_argument("--bits", default="w8a8")
    p.add_argument("--seeds", default="0")
    p.add_argument("--budget", default="demo", choices=sorted(BUDGETS))
    p.add_argument("--base", default="{}", help="JSON overrides shared by every variant")
    p.add_argument("--variant", action="append", default=[], help="label=JSON overrides (repeatable)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jsonl", default=str(ROOT / "runs" / "sweep.jsonl"))
    args = p.parse_args()
    if args.report:
        return report(args.report.split(","))
    torch.set_num_threads(args.threads)
    out = Path(args.jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["label"], r["bits"], r["seed"], r["budget"], r["base"]))
    pipe = load_reference_pipeline()
    fp_images, _ = generate(pipe, args.num_images, args.steps, seed=1234)
    w, a = parse_bits(args.bits)
    base = json.loads(args.base)
    for seed in [int(s) for s in args.seeds.split(",")]:
        # gradient-aligned weights, as when the sweeps were recorded (--base may set weighting)
        config0 = GradientAlignedQuantizer(weight_bits=w, act_bits=a, seed=seed,
                                           **{**BUDGETS[args.budget], "weighting": "gradient_aligned", **base})
        data = collect_calibration_data(pipe.unet, pipe.scheduler.config, family_for(pipe.unet), config0, progress=False)
        for spec in args.variant:
            label, _, overrides = spec.partition("=")
            key = (label, args.bits, seed, args.budget, args.base)
            if key in done:
                continue
            config = config0.replace(**json.loads(overrides or "{}"))
            t0 = time.perf_counter()
            qpipe = quantize_pipeline(pipe, config, calibration_data=data, progress=False)
            seconds = time.perf_counter() - t0
            images, _ = generate(qpipe, args.num_images, args.steps, seed=1234)
            units = qpipe.unet.gaq_report.units
            row = {"label": label, "bits": args.bits, "seed": seed, "budget": args.budget, "base": args.base,
                   "overrides": overrides, "psnr_db": sample_psnr(fp_images, images),
                   "loss_final_sum": sum(u.loss_final for u in units), "calibration_seconds": seconds,
                   "num_images": args.num_images, "steps": args.steps}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
