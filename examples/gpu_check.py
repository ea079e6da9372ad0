"""The GPU check of issue 17, one command: the CUDA path end to end, the scale benchmark, and a timed
google/ddpm-cifar10-32-architecture calibration at the demo budget. examples/gpu_check.sh runs it on
cuda within 8 minutes; ``--device cpu --preset tiny`` runs the same code in seconds (tests/test_gpu_check.py).

    python examples/gpu_check.py --device cuda --out runs/gpu_check

Writes ``<out>/gpu_check.json`` (and the scale benchmark's rows to ``<out>/benchmark_scale.jsonl``):
  - ``round_trip``: quantize (W4A8) -> sample -> save_pretrained -> from_pretrained on the device ->
    sample; the reloaded state and images must equal the quantized model's bit for bit (the
    reference pipeline with the CLI's tiny budget; the tiny preset uses a tiny random UNet);
  - ``runtime``: the loaded model's runtime (runtime="auto") on the device against the FP pipeline in
    FP32, FP16 and BF16 and the simulated model: seconds per image, weight bytes, PSNR vs simulated;
  - ``scale``: examples/benchmark_scale.py on the device (its models, or the tiny test model);
  - ``cifar_demo``: quantize_pipeline wall time on google/ddpm-cifar10-32's architecture with random
    weights (built from its config, nothing downloaded) at the CLI's demo budget, W4A8.
Every part runs even if an earlier one failed; the exit code is non-zero when any failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))  # benchmark_scale's model configs

logger = logging.getLogger("gpu_check")

# preset -> what each part runs. "full" is the GPU run; "tiny" checks this script on a CPU in seconds.
PRESETS = {
    # The three models and the cifar one; per-model limits keep the scale part under about 5 minutes.
    "full": dict(round_trip_model="reference", round_trip_budget="tiny",
                 scale_models="ddpm-cifar10-32,dit-xl-2,sd15-unet,sdxl-unet",
                 scale_args=["--iters", "5", "--meta-iters", "2", "--batch", "8", "--units", "3", "--unit-budget-s", "20",
                             "--timeout-s", "75"],
                 cifar_budget="demo", cifar_model="ddpm-cifar10-32", runtime_steps=50,
                 runtime_min_psnr=40),
    "tiny": dict(round_trip_model="tiny-test", round_trip_budget="tiny", scale_models="tiny-test",
                 scale_args=["--iters", "1", "--meta-iters", "1", "--batch", "2", "--units", "2", "--timeout-s", "120"],
                 cifar_budget="tiny", cifar_model="tiny-test", runtime_steps=4,
                 runtime_min_psnr=20),  # a random-weight model: float order moves it further
}


def build_unet(name: str):
    import torch
    from diffusers import UNet2DModel

    from benchmark_scale import TINY_TEST_CONFIG
    from diffusers_gaq.reference.recipe import DDPM_CIFAR10_32_CONFIG

    torch.manual_seed(0)
    return UNet2DModel(**(DDPM_CIFAR10_32_CONFIG if name == "ddpm-cifar10-32" else TINY_TEST_CONFIG)).eval()


def ddim_pipeline(model_name: str):
    from diffusers import DDIMPipeline, DDIMScheduler

    if model_name == "reference":
        from diffusers_gaq.reference import load_reference_pipeline

        return load_reference_pipeline()
    from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG

    return DDIMPipeline(unet=build_unet(model_name), scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))


def config_for(budget: str, device: str):
    from diffusers_gaq import GradientAlignedQuantizer
    from diffusers_gaq.config import BUDGETS

    # every stage of calibration, the meta step included (uniform weights, the default, would skip it)
    return GradientAlignedQuantizer(**dict(BUDGETS[budget], weight_bits=4, act_bits=8, weighting="gradient_aligned",
                                           device=device))


def round_trip(preset: dict, device: str) -> dict:
    """quantize -> sample -> save -> reload on ``device`` -> sample: bit-exact."""
    import numpy as np
    import torch

    from diffusers_gaq.serialization import quantized_state_dict

    pipe = ddim_pipeline(preset["round_trip_model"])
    t = time.perf_counter()
    qpipe = quantize_pipeline_quiet(pipe, config_for(preset["round_trip_budget"], device))
    quantize_s = time.perf_counter() - t
    qpipe.to(device)

    def images(p):
        gen = torch.Generator(device=device).manual_seed(0)
        return p(batch_size=4, num_inference_steps=10, generator=gen, output_type="np").images

    before = images(qpipe)
    with tempfile.TemporaryDirectory() as tmp:
        folder = qpipe.unet.save_pretrained(Path(tmp) / "unet", model_card=False)
        loaded = type(qpipe.unet).from_pretrained(folder, runtime="simulated").to(device)
    a, b = quantized_state_dict(qpipe.unet), quantized_state_dict(loaded)
    state_equal = a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
    qpipe.unet = loaded
    after = images(qpipe)
    on_device = all(p.device.type == torch.device(device).type for p in loaded.parameters())
    return {"model": preset["round_trip_model"], "device": device, "quantize_s": quantize_s,
            "parameters_on_device": on_device, "state_bit_exact": state_equal,
            "images_bit_exact": bool(np.array_equal(before, after)), "images_finite": bool(np.isfinite(after).all()),
            "ok": bool(on_device and state_equal and np.array_equal(before, after) and np.isfinite(after).all())}


def runtime(preset: dict, device: str) -> dict:
    """The loaded model's runtime on ``device`` against FP32, FP16 and BF16: seconds per image of a
    ``runtime_steps``-step DDIM batch of 8, weight bytes, and PSNR of its samples against the simulated model's."""
    import numpy as np
    import torch
    from diffusers import DDIMPipeline

    from diffusers_gaq import QuantizedUNet2DModel
    from diffusers_gaq.runtime import runtime_weight_nbytes

    pipe = ddim_pipeline(preset["round_trip_model"])
    qpipe = quantize_pipeline_quiet(pipe, config_for(preset["round_trip_budget"], device))
    steps = preset["runtime_steps"]

    def timed(unet, dtype=torch.float32):
        p = DDIMPipeline(unet=unet, scheduler=pipe.scheduler).to(device, dtype)
        p.set_progress_bar_config(disable=True)
        # output_type="pt": DDIMPipeline's numpy conversion refuses bfloat16
        run = lambda: p(batch_size=8, num_inference_steps=steps, output_type="pt",  # noqa: E731
                        generator=torch.Generator(device=device).manual_seed(0)).images.float().cpu().numpy()
        with torch.no_grad():
            run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            images = run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return (time.perf_counter() - t) / 8, images

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = qpipe.unet.save_pretrained(Path(tmp) / "unet", model_card=False)
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            s_img, _ = timed(pipe.unet, dtype)
            rows[name] = {"s_per_image": s_img, "weight_bytes": runtime_weight_nbytes(pipe.unet)}
            pipe.unet.to(torch.float32)
        simulated = QuantizedUNet2DModel.from_pretrained(folder, runtime="simulated", device=device)
        loaded = QuantizedUNet2DModel.from_pretrained(folder, device=device)
        s_sim, sim_images = timed(simulated)
        s_run, run_images = timed(loaded)
    mse = float(((run_images.astype("float64") - sim_images) ** 2).mean())
    rows["simulated-w4a8"] = {"s_per_image": s_sim, "weight_bytes": runtime_weight_nbytes(simulated)}
    rows["runtime-w4a8"] = {"s_per_image": s_run, "weight_bytes": runtime_weight_nbytes(loaded),
                            "layers": loaded.quantization.runtime.summary(),
                            "psnr_vs_simulated_db": float("inf") if mse == 0 else 10 * math.log10(1 / mse)}
    fp = rows["fp32"]
    for row in rows.values():
        row["speed_vs_fp32"] = fp["s_per_image"] / row["s_per_image"]
        row["weights_vs_fp32"] = row["weight_bytes"] / fp["weight_bytes"]
    return {"model": preset["round_trip_model"], "device": device, "steps": steps, "rows": rows,
            "ok": bool(np.isfinite(run_images).all()) and rows["runtime-w4a8"]["psnr_vs_simulated_db"] >= preset["runtime_min_psnr"]}


def quantize_pipeline_quiet(pipe, config):
    from diffusers_gaq import quantize_pipeline

    return quantize_pipeline(pipe, config, progress=False)


def scale(preset: dict, device: str, out: Path) -> dict:
    rows = out / "benchmark_scale.jsonl"
    rows.unlink(missing_ok=True)  # the script appends: this run's rows only
    cmd = [sys.executable, str(ROOT / "examples" / "benchmark_scale.py"), "--models", preset["scale_models"],
           "--device", device, "--out", str(rows), *preset["scale_args"]]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    got = [json.loads(line) for line in rows.read_text().splitlines()] if rows.is_file() else []
    failed = [r["model"] for r in got if "error" in r]
    return {"command": " ".join(cmd[1:]), "wall_s": time.perf_counter() - t, "returncode": proc.returncode,
            "rows": got, "failed_models": failed, "table": proc.stdout[-4000:],
            "ok": proc.returncode == 0 and bool(got) and not failed}


def cifar_demo(preset: dict, device: str) -> dict:
    """Wall time of a whole calibration (trajectories included) at the preset's budget."""
    pipe = ddim_pipeline(preset["cifar_model"])
    config = config_for(preset["cifar_budget"], device)
    t = time.perf_counter()
    qpipe = quantize_pipeline_quiet(pipe, config)
    wall = time.perf_counter() - t
    report = qpipe.unet.gaq_report
    return {"model": preset["cifar_model"], "budget": preset["cifar_budget"], "config": config.to_dict(),
            "wall_s": wall, "data_s": report.data_seconds, "calibration_s": report.calibration_seconds,
            "units": len(report.units), "ok": len(report.units) > 0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and the scale rows")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    # The scale benchmark last: if the 8-minute limit cuts it, its finished rows are in benchmark_scale.jsonl.
    parser.add_argument("--parts", default="round_trip,runtime,cifar_demo,scale")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but torch sees no CUDA device (torch {torch.__version__}, "
                     f"CUDA build: {torch.version.cuda}); run on a GPU machine, or pass --device cpu")
    # The round trip compares two model instances' outputs bit for bit: cuDNN must pick the same
    # algorithms for both (its autotuner may not).
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = PRESETS[args.preset]
    result = {"device": args.device, "preset": args.preset, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None}
    parts = {"round_trip": lambda: round_trip(preset, args.device), "scale": lambda: scale(preset, args.device, out),
             "runtime": lambda: runtime(preset, args.device),
             "cifar_demo": lambda: cifar_demo(preset, args.device)}
    for name in args.parts.split(","):
        t = time.perf_counter()
        logger.info("%s ...", name)
        try:
            result[name] = parts[name]()
        except Exception as err:  # every part runs; the failure is recorded with its traceback
            result[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        result[name]["part_wall_s"] = time.perf_counter() - t
        logger.info("%s: %s in %.0fs", name, "ok" if result[name]["ok"] else "FAILED", result[name]["part_wall_s"])
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")  # partial results too
    return 0 if all(result[n]["ok"] for n in args.parts.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
