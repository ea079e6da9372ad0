"""Calibration wall time: one process with N threads against N processes with one thread each.

    python examples/benchmark_distributed.py --budget tiny --pipeline random
    python examples/benchmark_distributed.py --budget demo --pipeline reference   # minutes

The script launches itself: once as a plain process (OMP_NUM_THREADS=N), once under
``accelerate launch --multi_gpu --num_processes N`` (OMP_NUM_THREADS=1; diffusers-gaq joins the
processes with gloo on CPU). Each run quantizes the same pipeline (W4A8, gradient-aligned weights)
and its main process writes its timings to a JSON file; the driver prints a table.

Only the reconstruction minibatches and the calibration trajectories are split between
processes; capturing unit inputs, initialising quantizers and the meta steps on the sample
weights run in full on every process. Expect a speed-up only when reconstruction dominates
(large recon_iters), and none on the tiny budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("benchmark_distributed")

def budgets() -> dict:
    from diffusers_gaq.config import BUDGETS

    return {
        # The test budget of tests/test_distributed.py: seconds, dominated by per-unit overhead (odd
        # sizes give uneven shards).
        "tiny": dict(num_inference_steps=10, num_calibration_timesteps=5, samples_per_timestep=7, recon_iters=6,
                     recon_batch_size=5, meta_iters=2, meta_batch_size=6, val_fraction=0.2),
        # diffusers-gaq's demo budget: minutes, dominated by reconstruction.
        "demo": BUDGETS["demo"],
    }


def build_pipeline(kind: str):
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    if kind == "reference":
        from diffusers_gaq.reference import load_reference_pipeline

        return load_reference_pipeline()
    from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG, REFERENCE_UNET_CONFIG

    torch.manual_seed(0)  # the same random weights in every process
    return DDIMPipeline(UNet2DModel(**REFERENCE_UNET_CONFIG), DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))


def worker(args) -> int:
    """One calibration run (every process of a launch runs this); the main process writes the timings."""
    import torch

    from diffusers_gaq import GradientAlignedQuantizer, quantize_pipeline
    from diffusers_gaq.distributed import detect, wait_for_everyone

    dist = detect()
    logging.basicConfig(level=logging.WARNING)
    pipe = build_pipeline(args.pipeline)
    config = GradientAlignedQuantizer(weight_bits=4, act_bits=8, weighting="gradient_aligned", device="cpu",
                                      grad_shards=args.grad_shards, **budgets()[args.budget])
    t0 = time.perf_counter()
    qpipe = quantize_pipeline(pipe, config, progress=False)
    seconds = time.perf_counter() - t0
    report = qpipe.unet.gaq_report
    if dist is None or dist.is_main:
        losses = [u.loss_final for u in report.units]
        result = {"processes": 1 if dist is None else dist.world_size, "threads": torch.get_num_threads(),
                  "data_seconds": report.data_seconds, "calibration_seconds": report.calibration_seconds,
                  "quantize_seconds": seconds, "mean_final_loss": sum(losses) / len(losses),
                  "recon_seconds": sum(u.recon_seconds for u in report.units),
                  "meta_seconds": sum(u.meta_seconds for u in report.units)}
        torch.save({n: m.weight_quantizer.codes for n, m in qpipe.unet.named_modules()
                    if getattr(m, "weight_quantizer", None) is not None}, str(args.worker) + ".codes.pt")
        Path(args.worker).write_text(json.dumps(result) + "\n")
    wait_for_everyone()
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], threads: int, result: Path, timeout: float, wait_policy: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy.upper()
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    # A session of its own, so that a timeout ends the launcher's worker processes too.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"timed_out": True, "wall_seconds": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["wall_seconds"] = wall  # including interpreter start, imports and the launcher
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=["demo", "tiny"], default="tiny")
    parser.add_argument("--pipeline", choices=("reference", "random"), default="reference",
                        help="the trained embedded pipeline, or the same architecture with random weights")
    parser.add_argument("--processes", type=int, default=2, help="N: processes of the launch, threads of the baseline")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run; a run past it is reported, not waited for")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active"), default=None,
                        help="OMP_WAIT_POLICY for every run. On a machine whose cores are busy with other work, "
                             "OpenMP's default spin-waiting makes each multi-threaded op wait for a descheduled "
                             "thread (measured here: 16 ms per small op with 2 threads instead of 0.04 ms); "
                             "'passive' avoids that")
    parser.add_argument("--with-single-thread", action="store_true", help="also time 1 process x 1 thread")
    parser.add_argument("--grad-shards", type=int, default=None,
                        help="GradientAlignedQuantizer.grad_shards for every run (bit-identical runs at equal threads)")
    parser.add_argument("--output", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: result path of one run
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import tempfile

    n, me = args.processes, str(Path(__file__).resolve())
    common = ["--budget", args.budget, "--pipeline", args.pipeline]
    if args.grad_shards:
        common += ["--grad-shards", str(args.grad_shards)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            (f"1 process x {n} threads", n, [sys.executable, me]),
            (f"{n} processes x 1 thread", 1,
             [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), me]),
        ]
        if args.with_single_thread:
            runs.insert(1, ("1 process x 1 thread", 1, [sys.executable, me]))
        for i, (label, threads, cmd) in enumerate(runs):
            result = Path(tmp) / f"run{i}.json"
            logger.info("running %s ...", label)
            rows.append({"setup": label, **launch(cmd + common + ["--worker", str(result)], threads, result,
                                                  args.timeout, args.omp_wait_policy)})
            if not rows[-1].get("timed_out"):
                import torch

                rows[-1]["codes"] = torch.load(str(result) + ".codes.pt")
            logger.info("  %s", {k: v for k, v in rows[-1].items() if k != "codes"})  # kept if a later run fails
    logger.info("\nbudget %s, %s pipeline, OMP_WAIT_POLICY %s, grad_shards %s", args.budget, args.pipeline,
                args.omp_wait_policy or "unset", args.grad_shards)
    header = (f"{'setup':26s} {'data s':>8s} {'recon s':>8s} {'meta s':>8s} {'calib s':>8s} {'wall s':>8s} "
              f"{'speed-up':>9s} {'recon x':>8s} {'codes differ':>13s}")
    base = rows[0]
    # Codes are compared with the single process that uses one thread, like each launched process.
    same_threads = next((r for r in rows if r["setup"] == "1 process x 1 thread"), base)
    base_codes = same_threads.get("codes")
    logger.info("(speed-ups against the first row; differing codes against %s)", same_threads["setup"])
    logger.info(header)
    logger.info("-" * len(header))
    for r in rows:
        if r.get("timed_out"):
            logger.info(f"{r['setup']:26s} {'timed out after':>17s} {r['wall_seconds']:8.1f}")
            continue
        codes = r.pop("codes")
        if base_codes is not None:
            differ = sum(int((codes[k] != base_codes[k]).sum()) for k in codes)
            r["codes_differing"] = differ / sum(v.numel() for v in codes.values())
            speedup = f"{base['calibration_seconds'] / r['calibration_seconds']:8.2f}x"
            recon_x = f"{base['recon_seconds'] / r['recon_seconds']:7.2f}x"
        else:
            speedup, recon_x = f"{'-':>9s}", f"{'-':>8s}"
        logger.info(f"{r['setup']:26s} {r['data_seconds']:8.1f} {r['recon_seconds']:8.1f} {r['meta_seconds']:8.1f} "
                    f"{r['calibration_seconds']:8.1f} {r['wall_seconds']:8.1f} {speedup} {recon_x} "
                    f"{100 * r.get('codes_differing', float('nan')):12.3f}%")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
