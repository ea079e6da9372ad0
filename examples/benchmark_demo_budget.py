"""Where the demo's time goes, for a candidate calibration budget: calibration (data, meta steps,
reconstruction), sampling of the FP and quantized images, FID-ref, with PSNR as the quality check.

    OMP_NUM_THREADS=1 python examples/benchmark_demo_budget.py --budget quick --num-images 64 --steps 20
    OMP_NUM_THREADS=1 python examples/benchmark_demo_budget.py --budget '{"recon_iters": 80, ...}'

CPU seconds of this process (one thread) are what an idle core takes, whatever else runs on the
machine; wall seconds are shown too. Per-phase wall seconds inside calibration come from the
calibration report.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="quick", help="a budget name (quick, demo, ...) or a JSON object")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    cpu, wall = time.process_time, time.perf_counter
    c0, w0 = cpu(), wall()
    from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
    from diffusers_gaq.demo import budget_for
    from diffusers_gaq.evaluation import fid_reference, sample_psnr
    from diffusers_gaq.evaluation.sampling import SamplingPlan, paired_samples
    from diffusers_gaq.reference import load_reference_pipeline

    budget = json.loads(args.budget) if args.budget.lstrip().startswith("{") else budget_for(args.budget)
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    print(f"import + load: {cpu() - c0:.1f} CPU s, {wall() - w0:.1f} s wall", flush=True)

    c, w = cpu(), wall()
    # what the demo runs: learned sample weights (not the library's default, uniform)
    qpipe = quantize_pipeline(pipe, GradientAlignedQuantizer(weight_bits=4, act_bits=8, weighting="gradient_aligned",
                                                             **budget), progress=False)
    report = qpipe.unet.gaq_report
    meta, recon = sum(u.meta_seconds for u in report.units), sum(u.recon_seconds for u in report.units)
    print(f"calibration: {cpu() - c:.1f} CPU s, {wall() - w:.1f} s wall (wall: data {report.data_seconds:.1f}, "
          f"meta {meta:.1f}, reconstruction {recon:.1f}, rest of the units "
          f"{sum(u.seconds for u in report.units) - meta - recon:.1f})", flush=True)

    plan = SamplingPlan(num_images=args.num_images, num_inference_steps=args.steps)
    c = cpu()
    fp, fp_wall = paired_samples(pipe, plan)
    c1 = cpu()
    q, q_wall = paired_samples(qpipe, plan)
    c2 = cpu()
    print(f"sampling {args.num_images} x {args.steps} steps: FP {c1 - c:.1f} CPU s ({fp_wall:.1f} s wall), "
          f"quantized {c2 - c1:.1f} CPU s ({q_wall:.1f} s wall)", flush=True)
    c = cpu()
    fid_fp, fid_q = fid_reference(fp), fid_reference(q)
    print(f"PSNR vs FP {sample_psnr(fp, q):.2f} dB; FID-ref FP {fid_fp:.2f}, W4A8 {fid_q:.2f} ({cpu() - c:.1f} CPU s)")
    print(f"total: {cpu() - c0:.1f} CPU s, {wall() - w0:.1f} s wall; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
