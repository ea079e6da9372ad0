"""Does block reconstruction converge within a budget? The block loss against reconstruction
iterations, for a few units of the reference UNet, at several learning-rate settings.

    python examples/recon_curve.py --iters 80,320,1280 --out runs/recon_curve.jsonl
    python examples/recon_curve.py --report runs/recon_curve.jsonl

Every run calibrates a fresh copy of the unit (the engine's defaults, uniform weights, W4A8 unless
--bits says otherwise) on the same calibration data, fed the full-precision model's inputs, and is
scored on test trajectories of another seed: the mean block loss relative to round-to-nearest.
Each iteration count is its own run (the rounding regulariser's schedule spans the whole run).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_gaq import GradientAlignedQuantizer  # noqa: E402
from diffusers_gaq.calibration.capture import capture_unit  # noqa: E402
from diffusers_gaq.calibration.data import collect_calibration_data  # noqa: E402
from diffusers_gaq.calibration.reconstruction import UnitProblem, harden, init_quantizers, reconstruct, start_rounding  # noqa: E402
from diffusers_gaq.config import BUDGETS  # noqa: E402
from diffusers_gaq.models import family_for  # noqa: E402
from diffusers_gaq.models.wrap import reconstruction_units, set_quant_state, wrap_model  # noqa: E402
from diffusers_gaq.reference import load_reference_pipeline  # noqa: E402

UNITS = ("down_blocks.0.resnets.0", "down_blocks.1.attentions.0", "up_blocks.3.resnets.0")
SETTINGS = {
    "default": {},
    "wlr3e-2": {"weight_lr": 3e-2},
    "wlr1e-3": {"weight_lr": 1e-3},
    "alr1e-2": {"act_lr": 1e-2},
    # AdaRound's V must travel to about +-2.4 before h(V) saturates at 0 or 1, and Adam moves it by
    # about weight_lr per step: short runs need a larger rate, or hardening undoes what they learned.
    "wlr1e-1": {"weight_lr": 1e-1},
    "wlr3e-1": {"weight_lr": 3e-1},
    "wlr1e-1_reg0.1": {"weight_lr": 1e-1, "round_reg_weight": 0.1},
    "wlr1e-1_alr3e-3": {"weight_lr": 1e-1, "act_lr": 3e-3},
}


def parse_bits(tag: str):
    w, a = tag.lower().lstrip("w").split("a")
    return int(w), (None if int(a) >= 32 else int(a))


@torch.no_grad()
def test_loss(unit, inputs, targets) -> float:
    problem = UnitProblem("unit", unit, inputs, targets, torch.device("cpu"))
    return float(problem.per_sample_losses(torch.arange(len(targets)), 64).mean())


def run_one(unit, inputs, targets, test_in, test_out, data, config):
    unit = copy.deepcopy(unit)
    problem = UnitProblem("unit", unit, inputs, targets, torch.device("cpu"))
    train_idx = data.train_indices
    init_quantizers(problem, train_idx, config)
    start_rounding(problem)
    t0 = time.perf_counter()
    curve = reconstruct(problem, train_idx, torch.ones(len(train_idx)), config, torch.Generator().manual_seed(0),
                        progress=False)
    seconds = time.perf_counter() - t0
    harden(problem)
    set_quant_state(unit, weight=True, act=bool(config.act_bits))
    return test_loss(unit, test_in, test_out), seconds, curve


def report(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    iters = sorted({r["iters"] for r in rows})
    print("| unit | setting | " + " | ".join(f"{i} it." for i in iters) + " |")
    print("|---|---|" + "---|" * len(iters))
    for unit in dict.fromkeys(r["unit"] for r in rows):
        for setting in dict.fromkeys(r["setting"] for r in rows):
            by = {r["iters"]: r for r in rows if r["unit"] == unit and r["setting"] == setting}
            if by:
                cells = [f"{by[i]['test_loss'] / by[i]['rtn_test_loss']:.3f}" if i in by else "-" for i in iters]
                print(f"| {unit} | {setting} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "recon_curve.jsonl")
    p.add_argument("--units", default=",".join(UNITS))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--iters", default="80,320,1280")
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--overrides", default="{}", help="JSON config fields for every run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", type=Path)
    args = p.parse_args()
    if args.report:
        return report(args.report)
    torch.set_num_threads(args.threads)
    pipe = load_reference_pipeline()
    w, a = parse_bits(args.bits)
    base = GradientAlignedQuantizer(weight_bits=w, act_bits=a, weighting="uniform",
                                    **{**BUDGETS["demo"], **json.loads(args.overrides)})
    family = family_for(pipe.unet)
    data = collect_calibration_data(pipe.unet, pipe.scheduler.config, family, base, progress=False)
    test = collect_calibration_data(pipe.unet, pipe.scheduler.config, family,
                                    base.replace(seed=1000, samples_per_timestep=8), progress=False)
    model = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
    wrap_model(model, base, family)
    set_quant_state(model, weight=False, act=False)
    units = dict(reconstruction_units(model, family))
    done = set()
    if args.out.exists():
        done = {(r["unit"], r["setting"], r["iters"], r["bits"]) for r in map(json.loads, args.out.read_text().splitlines())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.units.split(","):
        unit = units[name]
        inputs, targets = (capture_unit(model, unit, data, family, 64, w) for w in ("inputs", "output"))
        test_in, test_out = (capture_unit(model, unit, test, family, 64, w) for w in ("inputs", "output"))
        rtn, _, _ = run_one(unit, inputs, targets, test_in, test_out, data, base.replace(recon_iters=0))
        for setting in args.settings.split(","):
            for iters in [int(i) for i in args.iters.split(",")]:
                if (name, setting, iters, args.bits) in done:
                    continue
                config = base.replace(recon_iters=iters, **SETTINGS[setting])
                loss, seconds, curve = run_one(unit, inputs, targets, test_in, test_out, data, config)
                row = dict(unit=name, setting=setting, iters=iters, bits=args.bits, test_loss=loss,
                           rtn_test_loss=rtn, seconds=seconds, train_curve=curve[:: max(1, len(curve) // 40)])
                print(json.dumps({k: v for k, v in row.items() if k != "train_curve"}), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
