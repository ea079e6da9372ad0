"""What the integer runtime buys: 50-step DDIM sampling time, load-to-first-image time, peak memory and
weight bytes of the runtime against FP32 (eager and torch.compile) and the simulated (fake-quant)
model, and how exactly the runtime reproduces the simulated model's samples.

    python examples/benchmark_runtime.py --output docs/data/benchmark_runtime.jsonl     # everything
    python examples/benchmark_runtime.py --models reference --threads 1 --batch-sizes 8  # a subset
    python examples/benchmark_runtime.py --report docs/data/benchmark_runtime.jsonl       # table from rows

Models: the embedded reference pipeline (its real weights, calibrated with the ``quick`` budget so
that the exactness rows are about a realistic model) and a random-weight UNet with google/ddpm-cifar10-32's
architecture (35.7M parameters; min-max calibration: speed and memory do not depend on the scales).

Variants: ``fp-eager``; ``fp-compiled`` (torch.compile, inductor, default mode); ``sim-w8a8`` (the
simulated model, loaded with runtime="simulated"); ``int-w8a8`` and ``int-w4a8`` (loaded the default way,
``QuantizedUNet2DModel.from_pretrained(folder)``: the integer runtime).

Each (model, threads, batch) cell measures every variant in a fresh process, in the order given by
``--order`` (alternating between repeats), so ratios come from one run on one machine state. Rows go to
the JSONL file as they finish; a rerun skips the rows already there, so a run can be split. The
exactness rows (``kind: exactness``) compare int-w8a8 / int-w4a8 with their simulated model: PSNR of
50-step DDIM samples (8 images, [0, 1] range) from the same noise against the simulated model computed
in float32 and in float64, the float32 simulation against the float64 one, and the largest relative
difference of one UNet forward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("reference", "cifar10")
VARIANTS = ("fp-eager", "fp-compiled", "sim-w8a8", "int-w8a8", "int-w4a8")
CHEAP = dict(method="minmax", weighting="uniform", num_inference_steps=2, num_calibration_timesteps=1,
             samples_per_timestep=2, num_groups=1, val_fraction=0.0, calibration_batch_size=2, recon_batch_size=2)
STEPS = 50


def fp_pipeline(name: str):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    if name == "reference":
        from diffusers_gaq.reference import load_reference_pipeline

        pipe = load_reference_pipeline()
        return DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    from diffusers_gaq.reference.recipe import DDPM_CIFAR10_32_CONFIG, REFERENCE_SCHEDULER_CONFIG

    torch.manual_seed(0)
    return DDIMPipeline(unet=UNet2DModel(**DDPM_CIFAR10_32_CONFIG).eval(),
                        scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))


def prepare(name: str, folder: Path) -> None:
    """Write the FP model and the W8A8 / W4A8 checkpoints of one model (once; reused by later runs)."""
    from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline

    if (folder / "done").exists():
        return
    pipe = fp_pipeline(name)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    pipe.unet.save_pretrained(folder / "fp")
    for bits in (8, 4):
        config = (GradientAlignedQuantizer.from_budget("quick", weight_bits=bits, act_bits=8, weighting="uniform")
                  if name == "reference" else GradientAlignedQuantizer(weight_bits=bits, act_bits=8, **CHEAP))
        qpipe = quantize_pipeline(pipe, config, progress=False)
        qpipe.unet.save_pretrained(folder / f"w{bits}a8", model_card=False)
    (folder / "done").write_text("ok\n")


def load_variant(folder: Path, variant: str):
    if variant.startswith("fp"):
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(folder / "fp").eval()
        return torch.compile(unet) if variant == "fp-compiled" else unet
    from diffusers_gaq import QuantizedUNet2DModel

    tag = variant.split("-")[1]
    runtime = "simulated" if variant.startswith("sim") else "auto"
    return QuantizedUNet2DModel.from_pretrained(folder / tag, runtime=runtime).eval()


def weight_bytes(unet) -> int:
    from diffusers_gaq.runtime import runtime_weight_nbytes

    unet = getattr(unet, "_orig_mod", unet)
    return runtime_weight_nbytes(unet)


def sample(pipe, batch: int, seed: int = 0):
    return pipe(batch_size=batch, num_inference_steps=STEPS, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def measure(folder: Path, variant: str, batch: int, repeats: int) -> dict:
    from diffusers import DDIMPipeline, DDIMScheduler

    from diffusers_gaq.system import PeakRSS

    t0 = time.perf_counter()
    unet = load_variant(folder, variant)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        sample(pipe, batch)
        first_image = time.perf_counter() - t0
        times = []
        with PeakRSS() as rss:
            for _ in range(repeats):
                t1 = time.perf_counter()
                sample(pipe, batch)
                times.append(time.perf_counter() - t1)
    return {"s_per_image": min(times) / batch, "times": times, "first_image_s": first_image, "peak_rss": rss.peak,
            "weight_bytes": weight_bytes(unet)}


def ddim_images(unet, scheduler, dtype, steps: int = STEPS, n: int = 8, seed: int = 1) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from fixed noise, computed in ``dtype``, as images in [0, 1] (float64)."""
    from diffusers import DDIMScheduler

    cfg = unet.config
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size,
                    generator=torch.Generator().manual_seed(seed)).to(dtype)
    scheduler = DDIMScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return (x.double() / 2 + 0.5).clamp(0, 1)


def exactness(folder: Path, tag: str) -> dict:
    """PSNR of the runtime's 50-step samples against the simulated model's, computed in float32 (as it
    runs) and in float64 (its arithmetic without float32 rounding; the runtime's integer sums are exact),
    and of the float32 simulation against the float64 one: how far float32 rounding alone moves it."""
    import copy

    from diffusers import DDIMScheduler

    from diffusers_gaq import QuantizedUNet2DModel

    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    simulated = QuantizedUNet2DModel.from_pretrained(folder / tag, runtime="simulated").eval()
    runtime = QuantizedUNet2DModel.from_pretrained(folder / tag).eval()
    sim32 = ddim_images(simulated, scheduler, torch.float32)
    sim64 = ddim_images(copy.deepcopy(simulated).double(), scheduler, torch.float64)
    run = ddim_images(runtime, scheduler, torch.float32)

    def psnr(a, b):
        mse = (a - b).pow(2).mean().item()
        return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)

    cfg = runtime.config
    x = torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999, 500, 100, 1])
    with torch.no_grad():
        a, b = simulated(x, t).sample, runtime(x, t).sample
    return {"psnr_db": psnr(run, sim32), "psnr_vs_float64_db": psnr(run, sim64),
            "float32_vs_float64_db": psnr(sim32, sim64),
            "forward_rel_diff": ((a - b).abs().max() / a.abs().max()).item(),
            "runtime": runtime.quantization.runtime.summary()}


def run_child(args, folder: Path, job: list[str], threads: int) -> dict:
    cmd = [sys.executable, __file__, "--folder", str(folder), "--threads", str(threads), "--repeats", str(args.repeats),
           "--worker", *job]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def done_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def row_key(r: dict) -> tuple:
    return (r["kind"], r["model"], r.get("variant"), r.get("threads"), r.get("batch"))


def report(rows: list[dict]) -> str:
    lines = ["| model | threads | batch | variant | s/image | x FP eager | x FP compiled | first image s | peak RSS MiB "
             "| weights MiB | x FP |", "|" + "---|" * 11]
    cells = {}
    for r in rows:
        if r["kind"] == "speed":
            cells.setdefault((r["model"], r["threads"], r["batch"]), {})[r["variant"]] = r
    for (model, threads, batch), by in sorted(cells.items()):
        fp, fpc = by.get("fp-eager"), by.get("fp-compiled")
        for variant in VARIANTS:
            r = by.get(variant)
            if r is None:
                continue
            speed = f"{fp['s_per_image'] / r['s_per_image']:.2f}x" if fp else "-"
            speed_c = f"{fpc['s_per_image'] / r['s_per_image']:.2f}x" if fpc else "-"
            wx = f"{r['weight_bytes'] / fp['weight_bytes']:.3f}" if fp else "-"
            lines.append(f"| {model} | {threads} | {batch} | {variant} | {r['s_per_image']:.4f} | {speed} | {speed_c} "
                         f"| {r['first_image_s']:.1f} | {r['peak_rss'] / 2**20:.0f} | {r['weight_bytes'] / 2**20:.2f} "
                         f"| {wx} |")
    exact = [r for r in rows if r["kind"] == "exactness"]
    if exact:
        lines += ["", "| model | checkpoint | runtime vs simulated (float32) | runtime vs simulated in float64 "
                  "| simulated float32 vs float64 | one forward, max rel. diff | layers |", "|---|---|---|---|---|---|---|"]
        for r in exact:
            cells = [f"{r[k]:.1f} dB" if k in r else "-" for k in ("psnr_db", "psnr_vs_float64_db", "float32_vs_float64_db")]
            lines.append(f"| {r['model']} | {r['variant']} | {' | '.join(cells)} | {r['forward_rel_diff']:.2e} "
                         f"| {r['runtime']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="measured in this order, reversed every repeat")
    parser.add_argument("--threads-list", default="1,2")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=2, help="timed 50-step runs per variant after the first image")
    parser.add_argument("--workdir", type=Path, default=Path("out/benchmark_runtime"))
    parser.add_argument("--output", type=Path, default=Path("out/benchmark_runtime/rows.jsonl"))
    parser.add_argument("--report", type=Path, help="print the table of a rows file and stop")
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.report:
        print(report(done_rows(args.report)))
        return
    if args.worker:
        torch.set_num_threads(args.threads)
        kind, *rest = args.worker
        result = (measure(args.folder, rest[0], int(rest[1]), args.repeats) if kind == "speed"
                  else exactness(args.folder, rest[0]))
        print("RESULT " + json.dumps(result), flush=True)
        return

    rows = done_rows(args.output)
    have = {row_key(r) for r in rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict) -> None:
        rows.append(row)
        with args.output.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    variants = args.variants.split(",")
    for model in args.models.split(","):
        folder = args.workdir / model
        prepare(model, folder)
        for tag in ("w8a8", "w4a8"):
            key = ("exactness", model, f"int-{tag}", None, None)
            if key not in have:
                emit({"kind": "exactness", "model": model, "variant": f"int-{tag}", "machine": machine,
                      **run_child(args, folder, ["exactness", tag], 1)})
        for threads in map(int, args.threads_list.split(",")):
            for batch in map(int, args.batch_sizes.split(",")):
                for i, variant in enumerate(variants if (threads + batch) % 2 else variants[::-1]):
                    key = ("speed", model, variant, threads, batch)
                    if key in have:
                        continue
                    load = os.getloadavg()[0]
                    r = run_child(args, folder, ["speed", variant, str(batch)], threads)
                    emit({"kind": "speed", "model": model, "variant": variant, "threads": threads, "batch": batch,
                          "steps": STEPS, "load_before": load, "machine": machine,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), **r})
    print(report(rows))


if __name__ == "__main__":
    main()
