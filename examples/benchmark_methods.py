"""Compare quantization methods on the reference pipeline: FID-ref, PSNR against FP samples from the
same noise, calibration time, sampling time relative to FP, peak RSS.

    python examples/benchmark_methods.py run --methods fp,minmax,quanto,uniform --bits w8a8,w4a8,w4a4
    python examples/benchmark_methods.py run --methods uniform,normal,gradient_aligned --bits w4a8 --seeds 0,1,2
    python examples/benchmark_methods.py report          # -> docs/benchmarks.md tables + PNG plots
    python examples/benchmark_methods.py run --methods gradient_aligned --bits w4a8 --variant _tau2 --overrides '{"tau": 2}'
    python examples/benchmark_methods.py ablations --bits w4a8 --seed 0   # the variants of one setting

Every finished row is appended to a JSONL file (default runs/benchmark.jsonl), so an interrupted
run resumes where it stopped and rows from several invocations land in one report.

Methods: fp; minmax (round-to-nearest, min-max scales); quanto (optimum-quanto's quantize +
Calibration(streamline=False) + freeze; no 4-bit activations); uniform (Q-Diffusion-style block
reconstruction, all sample weights 1); normal (the same with PTQ4DM's normal timestep schedule);
gradient_aligned (meta-learned sample weights). All reconstruction methods share the calibration
data (per timestep schedule) and the reconstruction budget.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline  # noqa: E402
from diffusers_gaq.config import BUDGETS  # noqa: E402
from diffusers_gaq.evaluation import fid_reference, generate, sample_psnr  # noqa: E402
from diffusers_gaq.reference import load_reference_pipeline  # noqa: E402
from diffusers_gaq.system import PeakRSS  # noqa: E402


def parse_bits(tag: str) -> tuple[int, int | None]:
    w, a = tag.lower().lstrip("w").split("a")
    return int(w), (None if int(a) >= 32 else int(a))


def quanto_quantize(pipe, weight_bits: int, act_bits: int | None, data):
    """optimum-quanto's own path: quantize -> Calibration(streamline=False) over our calibration inputs -> freeze."""
    import copy

    from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

    if act_bits not in (8, None) or weight_bits not in (4, 8):
        raise ValueError("optimum-quanto supports int8/int4 weights and int8 activations only")
    unet = copy.deepcopy(pipe.unet).eval()
    quantize(unet, weights=qint4 if weight_bits == 4 else qint8, activations=qint8 if act_bits else None)
    if act_bits:
        with torch.no_grad(), Calibration(streamline=False):
            for i in range(0, len(data), 64):
                unet(data.samples[i : i + 64], data.timesteps[i : i + 64])
    freeze(unet)
    return type(pipe)(unet=unet, scheduler=copy.deepcopy(pipe.scheduler))


def make_config(method: str, bits: str, seed: int, budget: str) -> GradientAlignedQuantizer:
    w, a = parse_bits(bits)
    kw = dict(weight_bits=w, act_bits=a, seed=seed, **BUDGETS[budget])
    if method == "minmax":
        kw.update(method="minmax", weighting="uniform", weight_init="minmax")
    elif method in ("uniform", "quanto"):
        kw.update(weighting="uniform")
    elif method == "normal":
        kw.update(weighting="uniform", timestep_schedule="normal")
    elif method == "gradient_aligned":
        kw.update(weighting="gradient_aligned")
    else:
        raise ValueError(f"unknown method {method}")
    return GradientAlignedQuantizer(**kw)


def fp_reference(pipe, args, cache: Path):
    if cache.exists():
        z = np.load(cache)
        return z["images"], float(z["seconds"])
    images, seconds = generate(pipe, args.num_images, args.num_inference_steps, seed=1234)
    np.savez_compressed(cache, images=images, seconds=seconds)
    return images, seconds


def run(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["method"], r["bits"], r["seed"], r["budget"], r["num_images"], r.get("variant", "")))
    pipe = load_reference_pipeline()
    fp_images, fp_seconds = fp_reference(pipe, args, out.parent / f"fp_images_{args.num_images}_{args.num_inference_steps}.npz")
    fp_fid = fid_reference(fp_images)
    print(f"FP: FID-ref {fp_fid:.3f}, sampling {fp_seconds:.1f}s", flush=True)
    overrides = json.loads(args.overrides) if args.overrides else {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for bits in args.bits.split(","):
            for method in args.methods.split(","):
                key = (method, bits if method != "fp" else "fp", seed, args.budget, args.num_images, args.variant)
                if key in done:
                    continue
                done.add(key)
                if method == "quanto" and parse_bits(bits)[1] not in (8, None):
                    print(f"skip quanto {bits}: optimum-quanto has no {parse_bits(bits)[1]}-bit activations", flush=True)
                    continue
                row = {"method": method, "bits": key[1], "seed": seed, "budget": args.budget,
                       "num_images": args.num_images, "num_inference_steps": args.num_inference_steps,
                       "variant": args.variant, "overrides": overrides,
                       "machine": f"{platform.machine()} {torch.get_num_threads()} threads"}
                if method == "fp":
                    row.update(fid_ref=fp_fid, psnr_db=None, calibration_seconds=0.0, sampling_ratio=1.0,
                               sampling_seconds=fp_seconds)
                else:
                    config = make_config(method, bits, seed, args.budget).replace(**overrides)
                    t0 = time.perf_counter()
                    with PeakRSS() as rss_cal:
                        if method == "quanto":
                            from diffusers_gaq.calibration.data import collect_calibration_data
                            from diffusers_gaq.models import family_for

                            data = collect_calibration_data(pipe.unet, pipe.scheduler.config, family_for(pipe.unet),
                                                            config, progress=False)
                            qpipe = quanto_quantize(pipe, *parse_bits(bits), data)
                        else:
                            qpipe = quantize_pipeline(pipe, config, progress=False, record_conflict=args.conflict)
                    cal = time.perf_counter() - t0
                    with PeakRSS() as rss_sample:
                        images, seconds = generate(qpipe, args.num_images, args.num_inference_steps, seed=1234)
                    # Sampling speed relative to FP, timed back to back in this process (same load).
                    _, t_fp = generate(pipe, args.timing_images, args.num_inference_steps, seed=99)
                    _, t_q = generate(qpipe, args.timing_images, args.num_inference_steps, seed=99)
                    row.update(fid_ref=fid_reference(images), psnr_db=sample_psnr(fp_images, images),
                               calibration_seconds=cal, sampling_seconds=seconds, sampling_ratio=t_q / t_fp,
                               peak_rss_calibration_mib=rss_cal.peak / 2**20, peak_rss_sampling_mib=rss_sample.peak / 2**20)
                    report = getattr(qpipe.unet, "gaq_report", None)
                    if report is not None:
                        row["data_digest"] = report.data_digest  # pairs the methods of one seed
                        config = qpipe.unet.gaq_config
                        if config.average_weight_bits is not None:  # mixed precision by measurement
                            from diffusers_gaq.weight_bits import model_weight_bits

                            row["allocated_layers"] = list(config.allocated_layers)
                            row["average_weight_bits"] = model_weight_bits(qpipe.unet).average_quantized_bits
                        row["meta_seconds"] = sum(u.meta_seconds for u in report.units)
                        row["val_loss_final"] = float(np.mean([u.val_loss_final for u in report.units]))
                        omegas = torch.stack([u.omega for u in report.units])
                        row["omega_std"] = float(omegas.std(dim=1).mean())
                        if args.conflict:
                            save = out.parent / f"report_{method}_{bits}_{seed}{args.variant}.pt"
                            torch.save({"units": [(u.name, u.omega, u.conflict_before, u.conflict_after)
                                                  for u in report.units],
                                        "train_timesteps": report.train_timesteps}, save)
                print(json.dumps(row), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def _stats(values):
    arr = np.array([v for v in values if v is not None], dtype=float)
    if len(arr) == 0:
        return None, None
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def report(args) -> None:
    """Render the rows of one or more JSONL files as markdown tables (stdout or --markdown) and plots."""
    rows = [r for path in args.jsonl.split(",") for r in load_rows(Path(path))]
    rows = [r for r in rows if r.get("variant", "") == args.variant and r["num_images"] == args.num_images]
    rows = list({(r["method"], r["bits"], r["seed"]): r for r in rows}.values())  # last row per setting
    fp = [r for r in rows if r["method"] == "fp"]
    fp_fid = fp[0]["fid_ref"] if fp else None
    order = ["fp", "minmax", "quanto", "uniform", "normal", "gradient_aligned"]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["method"], r["bits"]), []).append(r)
    lines = ["| method | bits | seeds | FID-ref | vs FP | PSNR vs FP (dB) | calibration (s) | sampling / FP | "
             "peak RSS calib. (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    plot_rows = []
    for (method, bits), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] != "fp", kv[0][1], order.index(kv[0][0]))):
        fid_m, fid_s = _stats([r["fid_ref"] for r in rs])
        psnr_m, psnr_s = _stats([r["psnr_db"] for r in rs])
        cal_m, _ = _stats([r["calibration_seconds"] for r in rs])
        ratio_m, _ = _stats([r["sampling_ratio"] for r in rs])
        rss_m, _ = _stats([r.get("peak_rss_calibration_mib") for r in rs])
        pm = lambda m, s, spec=".2f": _fmt(m, spec) + (f" ± {s:{spec}}" if s else "")  # noqa: E731
        rel = f"{100 * (fid_m - fp_fid) / fp_fid:+.1f}%" if fp_fid and method != "fp" else "-"
        lines.append(f"| {method} | {bits} | {len(rs)} | {pm(fid_m, fid_s, '.3f')} | {rel} | {pm(psnr_m, psnr_s)} | "
                     f"{_fmt(cal_m, '.0f')} | {_fmt(ratio_m)} | {_fmt(rss_m, '.0f')} |")
        if method != "fp":
            plot_rows.append({"method": method, "bits": bits, "value": fid_m, "err": fid_s})
    text = "\n".join(lines) + "\n"
    if fp_fid is not None:
        excess = {}
        for (method, bits), rs in groups.items():
            excess[(method, bits)] = _stats([r["fid_ref"] - fp_fid for r in rs])[0]
        extra = []
        for bits in sorted({b for _, b in groups if b != "fp"}):
            u, g = excess.get(("uniform", bits)), excess.get(("gradient_aligned", bits))
            if u is not None and g is not None:
                tu = _stats([r["calibration_seconds"] for r in groups[("uniform", bits)]])[0]
                tg = _stats([r["calibration_seconds"] for r in groups[("gradient_aligned", bits)]])[0]
                # The same ratio inside each gradient-aligned run (same load): all of calibration against
                # all of it but the meta steps, which is what uniform weights cost on that load.
                within = _stats([r["calibration_seconds"] / (r["calibration_seconds"] - r["meta_seconds"])
                                 for r in groups[("gradient_aligned", bits)]])
                ratio = g / u if u > 0 else float("nan")
                seeds = len({r["seed"] for r in groups[("uniform", bits)]} & {r["seed"] for r in
                                                                               groups[("gradient_aligned", bits)]})
                extra.append(f"| {bits} | {seeds} | {u:+.3f} | {g:+.3f} | {ratio:.2f} | {tg / tu:.2f} | "
                             f"{within[0]:.2f} ± {within[1]:.2f} |")
        if extra:
            text += ("\n| bits | seeds | uniform excess FID | gradient-aligned excess FID | excess ratio (target <= 0.6) | "
                     "calibration time ratio across runs | within gradient-aligned runs (target <= 1.3) |\n"
                     "|---|---|---|---|---|---|---|\n" + "\n".join(extra) + "\n")
    # Per seed: the seed-to-seed spread is the noise floor every comparison has to clear.
    seeds = sorted({r["seed"] for r in rows if r["method"] != "fp"})
    per_seed = [f"| bits | method | {' | '.join(f'seed {s}' for s in seeds)} |", "|---|---|" + "---|" * len(seeds)]
    for (method, bits), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        if method == "fp" or len(rs) < 2:
            continue
        by_seed = {r["seed"]: r for r in rs}
        cells = [f"{by_seed[s]['fid_ref']:.2f} / {by_seed[s]['psnr_db']:.2f} dB" if s in by_seed else "-" for s in seeds]
        per_seed.append(f"| {bits} | {method} | {' | '.join(cells)} |")
    if len(per_seed) > 2:
        text += "\nFID-ref / PSNR vs FP per seed:\n\n" + "\n".join(per_seed) + "\n"
    print(text)
    if args.plot and plot_rows:
        from diffusers_gaq.plots import plot_fidelity_bars

        plot_fidelity_bars(plot_rows, args.plot, metric=f"FID-ref (FP {fp_fid:.2f})" if fp_fid else "FID-ref")
        print(f"plot: {args.plot}")


# Student-t 0.975 quantiles for 1..30 degrees of freedom, then the normal's (no scipy in the venv).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042, 1.96)


def paired_interval(diffs) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided 95 % Student-t interval."""
    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = float(T975[min(len(d) - 1, len(T975)) - 1] * d.std(ddof=1) / np.sqrt(len(d)))
    return mean, mean - half, mean + half


def paired(args) -> None:
    """Method B minus method A, seed by seed (the same calibration data per seed), per bit width:
    FID-ref and PSNR differences with 95 % intervals, and B's excess over FP relative to A's."""
    rows = [r for path in args.jsonl.split(",") for r in load_rows(Path(path))]
    rows = [r for r in rows if r["num_images"] == args.num_images and r.get("variant", "") == args.variant]
    fp = next((r["fid_ref"] for r in rows if r["method"] == "fp"), None)
    by = {(r["method"], r["bits"], r["seed"]): r for r in rows}
    print(f"| bits | seeds | {args.b} - {args.a}: FID-ref (95 % CI) | PSNR dB (95 % CI) | excess ratio (mean) | pairs checked by data digest |")
    print("|---|---|---|---|---|---|")
    relative = []
    for bits in sorted({r["bits"] for r in rows if r["method"] == args.a}):
        seeds = sorted(s for (m, b, s) in by if m == args.a and b == bits and (args.b, bits, s) in by)
        if not seeds:
            continue
        a, b = [by[(args.a, bits, s)] for s in seeds], [by[(args.b, bits, s)] for s in seeds]
        for s, x, y in zip(seeds, a, b):  # the pairing itself: both methods of a seed saw the same data
            if x.get("data_digest") and y.get("data_digest") and x["data_digest"] != y["data_digest"]:
                raise SystemExit(f"seed {s} {bits}: {args.a} and {args.b} calibrated on different data "
                                 f"({x['data_digest'][:12]} vs {y['data_digest'][:12]}); the pair is not paired")
        digests = sum(bool(x.get("data_digest") and y.get("data_digest")) for x, y in zip(a, b))
        fid = paired_interval([y["fid_ref"] - x["fid_ref"] for x, y in zip(a, b)])
        psnr = paired_interval([y["psnr_db"] - x["psnr_db"] for x, y in zip(a, b)])
        ratio = (np.mean([y["fid_ref"] - fp for y in b]) / np.mean([x["fid_ref"] - fp for x in a])) if fp else float("nan")
        print(f"| {bits} | {len(seeds)} | {fid[0]:+.2f} ({fid[1]:+.2f}, {fid[2]:+.2f}) | "
              f"{psnr[0]:+.2f} ({psnr[1]:+.2f}, {psnr[2]:+.2f}) | {ratio:.2f} | {digests}/{len(seeds)} |")
        if fp:
            relative += [(y["fid_ref"] - x["fid_ref"]) / (x["fid_ref"] - fp) for x, y in zip(a, b)]
    if len(relative) > 1:
        # Every pair's difference as a fraction of A's excess over FP: comparable across bit widths
        # (a 0.6x excess ratio is -0.4 at every width), so all pairs give one interval.
        rel = paired_interval(relative)
        print(f"\nAll {len(relative)} pairs: ({args.b} - {args.a}) / ({args.a}'s excess over FP) = {rel[0]:+.3f} "
              f"(95 % CI {rel[1]:+.3f}, {rel[2]:+.3f}); an excess ratio of 0.6 is -0.400")


def ablations(args) -> None:
    """One row per ablation variant (and the default gradient-aligned / uniform rows of the same bits
    and seed): FID-ref, its excess over FP against uniform's, PSNR, calibration and meta-step time,
    how far the sample weights moved, the mean held-out loss after reconstruction."""
    rows = [r for path in args.jsonl.split(",") for r in load_rows(Path(path))]
    rows = [r for r in rows if r["num_images"] == args.num_images]
    fp = next((r for r in rows if r["method"] == "fp"), None)
    pick = lambda r: r["bits"] == args.bits and r["seed"] == args.seed  # noqa: E731
    base = {r["method"]: r for r in rows if pick(r) and not r.get("variant") and r["method"] in ("uniform",
                                                                                                 "gradient_aligned")}
    table = [("uniform (= meta_iters 0)", base.get("uniform")), ("gradient-aligned, defaults", base.get("gradient_aligned"))]
    table += [(f"{r['variant'].lstrip('_')} {json.dumps(r['overrides'])}", r) for r in rows if pick(r) and r.get("variant")]
    uni = base.get("uniform")
    lines = [f"| {args.bits}, seed {args.seed} | FID-ref | excess ratio vs uniform | PSNR vs FP (dB) | calibration (s) | "
             "time ratio in the run (calibration / without meta steps) | meta (s) | omega std | held-out loss |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in table:
        if r is None:
            continue
        excess = (r["fid_ref"] - fp["fid_ref"]) / (uni["fid_ref"] - fp["fid_ref"]) if fp and uni else None
        lines.append(f"| {label} | {r['fid_ref']:.2f} | {_fmt(excess)} | {_fmt(r['psnr_db'])} | "
                     f"{r['calibration_seconds']:.0f} | "
                     f"{r['calibration_seconds'] / (r['calibration_seconds'] - r.get('meta_seconds', 0.0)):.2f} | "
                     f"{_fmt(r.get('meta_seconds'), '.0f')} | {_fmt(r.get('omega_std'), '.3f')} | "
                     f"{_fmt(r.get('val_loss_final'), '.4f')} |")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--methods", default="fp,minmax,quanto,uniform")
    r.add_argument("--bits", default="w8a8,w4a8,w4a4")
    r.add_argument("--seeds", default="0")
    r.add_argument("--budget", default="demo", choices=sorted(BUDGETS))
    r.add_argument("--num-images", type=int, default=1000)
    r.add_argument("--num-inference-steps", type=int, default=50)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--timing-images", type=int, default=64, help="images for the back-to-back FP/quantized timing")
    r.add_argument("--jsonl", default=str(ROOT / "runs" / "benchmark.jsonl"))
    r.add_argument("--overrides", help="JSON dict of GradientAlignedQuantizer fields (ablations)")
    r.add_argument("--variant", default="", help="label for an ablation row")
    r.add_argument("--conflict", action="store_true", help="record gradient-conflict matrices")
    rep = sub.add_parser("report")
    rep.add_argument("--jsonl", default=str(ROOT / "runs" / "benchmark.jsonl"), help="comma-separated JSONL files")
    rep.add_argument("--variant", default="")
    rep.add_argument("--num-images", type=int, default=1000)
    rep.add_argument("--plot", help="PNG path for the FID-ref bar chart")
    ab = sub.add_parser("ablations", help="the ablation rows of one setting as a markdown table")
    ab.add_argument("--jsonl", default=str(ROOT / "runs" / "benchmark.jsonl"), help="comma-separated JSONL files")
    ab.add_argument("--bits", default="w4a8")
    ab.add_argument("--seed", type=int, default=0)
    ab.add_argument("--num-images", type=int, default=500)
    pr = sub.add_parser("paired", help="method B minus method A per seed, with 95 % intervals")
    pr.add_argument("--jsonl", default=str(ROOT / "runs" / "benchmark.jsonl"), help="comma-separated JSONL files")
    pr.add_argument("--a", default="uniform")
    pr.add_argument("--b", default="gradient_aligned")
    pr.add_argument("--variant", default="")
    pr.add_argument("--num-images", type=int, default=1000)
    args = p.parse_args()
    {"run": run, "report": report, "ablations": ablations, "paired": paired}[args.cmd](args)


if __name__ == "__main__":
    main()
