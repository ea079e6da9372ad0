"""What exporting to optimum-quanto buys: checkpoint size, memory and sampling time, against the FP
model and our fake-quant model, on the embedded reference pipeline and on a random-weight UNet with
google/ddpm-cifar10-32's architecture (35.7M parameters).

    python examples/benchmark_export.py                    # both models, 1 thread, markdown table on stdout
    python examples/benchmark_export.py --threads 2 --models cifar10 --batch-size 8 --steps 20

Variants per model:
    fp            the float32 UNet2DModel
    ours-w4a8     our fake-quant model, W4A8 with the default settings (asymmetric activations, split skip
                  inputs, quantized attention), reloaded with QuantizedUNet2DModel.from_pretrained
    quanto-w4     its quanto export with activations=False (4-bit weights only: quanto cannot express
                  those activation quantizers); weights bit-exact, activations in float
    ours-w8a8     our fake-quant model, W8A8 in the form quanto can express (symmetric weights and
                  activations, no split inputs, plain attention)
    quanto-w8a8   its quanto export with activations (computes what ours-w8a8 computes)

Quantization uses method="minmax" on the smallest calibration set: sizes, memory and speed do not
depend on how good the scales are, only on the bit widths and the modules, so calibration quality is
irrelevant here (and the run stays short).

Memory and time are measured in a fresh subprocess per variant, one after another, so that one
variant's allocations do not inflate the next one's RSS; every number and ratio comes from this one
invocation. "state dict" is the bytes of the tensors in ``model.state_dict()`` (quanto's flattened
packed data for quanto modules); "peak RSS" is the process's peak resident memory while sampling
(torch and diffusers themselves included, so it does not shrink in proportion to the weights), "over
start" the same minus the resident memory before the model was loaded, and "mmap threshold pinned" the
same from a second, untimed run with glibc's MALLOC_MMAP_THRESHOLD_=65536 (see RSS_ENV: by default
freed temporaries stay resident and hide what the weights save); "sampling" is the best of
``--repeats`` timed DDIM runs after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline  # noqa: E402
from diffusers_gaq.quanto_export import WEIGHTS_NAME as QUANTO_WEIGHTS  # noqa: E402
from diffusers_gaq.quanto_export import export_to_quanto, save_quanto
from diffusers_gaq.system import PeakRSS  # noqa: E402
from diffusers_gaq.serialization import WEIGHTS_NAME  # noqa: E402

logger = logging.getLogger("benchmark_export")

MODELS = ("reference", "cifar10")
VARIANTS = ("fp", "ours-w4a8", "quanto-w4", "ours-w8a8", "quanto-w8a8")
# The cheapest calibration quantize_pipeline accepts: min-max scales from one timestep of two trajectories.
CHEAP = dict(method="minmax", weighting="uniform", num_inference_steps=2, num_calibration_timesteps=1,
             samples_per_timestep=2, num_groups=1, val_fraction=0.0, calibration_batch_size=2, recon_batch_size=2)
W4A8_DEFAULT = dict(weight_bits=4, act_bits=8)
# glibc raises its mmap threshold each time a large block is freed, after which freed temporaries (quanto's
# per-layer dequantized weights, activations) stay resident in the heap: peak RSS then mostly measures the
# allocator. Pinning the threshold (64 KiB) returns large blocks to the OS on free, so the peak tracks what
# is live. Used for a second, untimed pass only, because it changes the timing.
RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
W8A8_EXPRESSIBLE = dict(weight_bits=8, act_bits=8, weight_symmetric=True, act_symmetric=True,
                        split_shortcut=False, quantize_attention=False)


# ----------------------------------------------------------------------------- preparation (parent)


def fp_pipeline(name: str):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    if name == "reference":
        from diffusers_gaq.reference import load_reference_pipeline

        pipe = load_reference_pipeline()
        return DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    from diffusers_gaq.reference.recipe import DDPM_CIFAR10_32_CONFIG, REFERENCE_SCHEDULER_CONFIG

    torch.manual_seed(0)  # random weights: this measures size and speed, not image quality
    return DDIMPipeline(unet=UNet2DModel(**DDPM_CIFAR10_32_CONFIG).eval(),
                        scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))


def prepare(name: str, folder: Path) -> dict:
    """Write every variant of one model to ``folder``; return file sizes and quantization times."""
    pipe = fp_pipeline(name)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    pipe.unet.save_pretrained(folder / "fp")
    info = {"params": sum(p.numel() for p in pipe.unet.parameters())}
    x = torch.randn(2, pipe.unet.config.in_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    for tag, settings, export_activations in (("w4a8", W4A8_DEFAULT, False), ("w8a8", W8A8_EXPRESSIBLE, True)):
        t0 = time.perf_counter()
        qpipe = quantize_pipeline(pipe, GradientAlignedQuantizer(**CHEAP, **settings), progress=False)
        info[f"quantize_s_{tag}"] = time.perf_counter() - t0
        qpipe.unet.save_pretrained(folder / f"ours-{tag}", model_card=False)
        exported = export_to_quanto(qpipe.unet, activations=export_activations)
        quanto_tag = "quanto-w8a8" if export_activations else "quanto-w4"
        save_quanto(exported, folder / quanto_tag)
        with torch.no_grad():  # a sanity check that the measured quanto model is the right one
            ours, theirs = qpipe.unet(x, t).sample, exported(x, t).sample
        info[f"export_rel_diff_{quanto_tag}"] = ((ours - theirs).abs().max() / ours.abs().max()).item()
        del qpipe, exported
    return info


def weights_file(folder: Path, variant: str) -> Path:
    return folder / variant / (QUANTO_WEIGHTS if variant.startswith("quanto") else WEIGHTS_NAME)


# ----------------------------------------------------------------------------- measurement (child)


def load_variant(folder: Path, variant: str):
    if variant == "fp":
        from diffusers import UNet2DModel

        return UNet2DModel.from_pretrained(folder / "fp").eval()
    if variant.startswith("ours"):
        from diffusers_gaq import QuantizedUNet2DModel

        return QuantizedUNet2DModel.from_pretrained(folder / variant).eval()
    from diffusers_gaq.quanto_export import load_quanto

    return load_quanto(folder / variant)


def state_dict_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def measure(folder: Path, variant: str, batch_size: int, steps: int, repeats: int) -> dict:
    from diffusers import DDIMPipeline, DDIMScheduler

    rss_start = PeakRSS.current()
    unet = load_variant(folder, variant)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    # Warm-up: lazy initialisation (quanto loads its C++ unpack extension on the first 4-bit forward).
    pipe(batch_size=batch_size, num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0))
    times = []
    with PeakRSS() as rss:
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipe(batch_size=batch_size, num_inference_steps=steps, output_type="np",
                 generator=torch.Generator().manual_seed(0))
            times.append(time.perf_counter() - t0)
    return {"state_dict_bytes": state_dict_bytes(unet), "peak_rss": rss.peak, "rss_start": rss_start,
            "sampling_s": min(times), "times": times}


def run_child(args, folder: Path, variant: str, fixed_mmap_threshold: bool = False) -> dict:
    """Measure one variant in a fresh process. ``fixed_mmap_threshold``: one untimed sampling run with glibc's
    mmap threshold pinned (see RSS_ENV) instead of the timed runs."""
    repeats = 1 if fixed_mmap_threshold else args.repeats
    cmd = [sys.executable, __file__, "--worker", variant, "--folder", str(folder), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--repeats", str(repeats)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if fixed_mmap_threshold:
        env.update(RSS_ENV)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {variant} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ----------------------------------------------------------------------------- report


def mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def table(results: dict) -> str:
    head = ("| model | variant | weights file MB | x FP | state dict MB | x FP | peak RSS MB | x FP "
            "| peak RSS over start MB | x FP | same, mmap threshold pinned | x FP | sampling s | x FP |")
    lines = [head, "|" + "---|" * 14]
    for name, res in results.items():
        fp = res["fp"]
        for variant in VARIANTS:
            r = res[variant]
            cells = [name, variant]
            for key in ("file_bytes", "state_dict_bytes", "peak_rss", "rss_growth", "rss_growth_pinned"):
                cells += [mb(r[key]), f"{r[key] / fp[key]:.3f}"]
            cells += [f"{r['sampling_s']:.2f}", f"{r['sampling_s'] / fp['sampling_s']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per sampling run (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per sampling run (default 10)")
    parser.add_argument("--repeats", type=int, default=2, help="timed sampling runs per variant; the best counts")
    parser.add_argument("--output", type=Path, help="also write the table and raw numbers here (a .md and a .json)")
    parser.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.worker:
        result = measure(args.folder, args.worker, args.batch_size, args.steps, args.repeats)
        print("RESULT " + json.dumps(result), flush=True)
        return

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers_gaq.calibration", "diffusers_gaq.pipeline", "diffusers_gaq.quanto_export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # per-unit lines; the summary below is enough
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {MODELS}")
    started = time.perf_counter()
    load_before = os.getloadavg()
    results, infos = {}, {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name in models:
            folder = Path(tmp) / name
            logger.info("%s: quantizing (min-max) and writing checkpoints", name)
            infos[name] = prepare(name, folder)
            logger.info("%s: %s", name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in infos[name].items()})
            results[name] = {}
            for variant in VARIANTS:
                r = run_child(args, folder, variant)
                r["file_bytes"] = weights_file(folder, variant).stat().st_size
                r["rss_growth"] = r["peak_rss"] - r["rss_start"]
                pinned = run_child(args, folder, variant, fixed_mmap_threshold=True)
                r["rss_growth_pinned"] = pinned["peak_rss"] - pinned["rss_start"]
                r["folder_bytes"] = sum(p.stat().st_size for p in (folder / variant).rglob("*") if p.is_file())
                results[name][variant] = r
                logger.info("%s %s: sampling %.2fs (runs %s), peak RSS %s MB (over start %s, pinned %s)", name, variant,
                            r["sampling_s"], [round(x, 2) for x in r["times"]], mb(r["peak_rss"]), mb(r["rss_growth"]),
                            mb(r["rss_growth_pinned"]))
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - started

    md = table(results)
    setup = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{args.threads} thread(s); DDIM {args.steps} steps, batch {args.batch_size}, best of {args.repeats}; "
             f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; {elapsed / 60:.1f} min in all")
    print(md)
    print()
    print(setup)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(md + "\n\n" + setup + "\n", encoding="utf-8")
        args.output.with_suffix(".json").write_text(json.dumps({"results": results, "prepare": infos, "setup": setup},
                                                               indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
