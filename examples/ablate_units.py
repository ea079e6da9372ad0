"""Ablations of gradient-aligned sample weights, measured where they act: single reconstruction units.

    python examples/ablate_units.py --seed 0 --out docs/data/ablate_units.jsonl      # ~5 min, 1 thread
    python examples/ablate_units.py --report docs/data/ablate_units.jsonl             # markdown table
    python examples/ablate_units.py --variant-set issue13 --seed 0 --out docs/data/variants_units.jsonl
    python examples/ablate_units.py --budget paper --recon-iters 200 --meta-iters 10 --units conv_in \
        --variants uniform,default --out runs/cost_paper.jsonl       # cost per iteration at another preset

For a few units of the reference UNet (W4A8, demo budget unless --budget, seed 0), every variant
calibrates a fresh copy of the unit on the same calibration data: quantizer initialisation, the
variant's meta steps on the sample weights, the budget's reconstruction iterations, hardening.
Variants with carry_scores=True start each unit's meta steps from the scores they learned on the
previous unit in the --units order (as calibrate_model does); the others start from zero. Each result is then scored on TEST
trajectories that no variant saw (other seeds): mean reconstruction loss, and the loss of the worst
calibration timestep (what aligning the timesteps' gradients should protect). Also recorded: the
mean cosine between timestep-group gradients at the start of reconstruction, uniform vs learned
weights, and the time of the meta steps and of reconstruction.

Units are fed the full-precision model's inputs (not those of a partly quantized model), so every
variant of a unit solves the same problem; FID for a few variants is in benchmark_methods.py.
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
from diffusers_gaq.calibration.data import assign_splits, collect_calibration_data  # noqa: E402
from diffusers_gaq.calibration.diagnostics import (  # noqa: E402
    cosine_matrix, group_gradients, mean_off_diagonal, mean_per_step)
from diffusers_gaq.calibration.reconstruction import (  # noqa: E402
    UnitProblem, harden, init_quantizers, reconstruct, start_rounding)
from diffusers_gaq.calibration.weighting import learn_scores, num_scores, weights_of_samples  # noqa: E402
from diffusers_gaq.config import BUDGETS  # noqa: E402
from diffusers_gaq.models import family_for  # noqa: E402
from diffusers_gaq.models.wrap import reconstruction_units, set_quant_state, wrap_model  # noqa: E402
from diffusers_gaq.reference import load_reference_pipeline  # noqa: E402

# Units with a strong timestep conflict in docs/benchmarks.md (min cosine near -1), of each kind (conv_in,
# measured before, is kept in FP on the current base: first_last_precision="fp").
UNITS = ("down_blocks.0.resnets.0", "down_blocks.1.attentions.0", "down_blocks.1.resnets.1", "mid_block.attentions.0",
         "up_blocks.2.resnets.1", "up_blocks.3.resnets.0")

VARIANTS = {
    "uniform": {"weighting": "uniform"},
    "default": {},
    "tau0.5": {"tau": 0.5}, "tau2": {"tau": 2.0},
    "val0.02": {"val_fraction": 0.02}, "val0.10": {"val_fraction": 0.10}, "val0.25": {"val_fraction": 0.25},
    "groups1": {"num_groups": 1},
    "meta2": {"meta_iters": 2}, "meta32": {"meta_iters": 32},
    "meta32_lr0.5": {"meta_iters": 32, "meta_lr": 0.5},
    # The virtual step theta' = theta - inner_lr * grad: with AdaRound's small gradients a step of
    # 1e-2 barely moves theta, so L^V(theta') hardly depends on the weights. Larger steps:
    "inner1": {"inner_lr": 1.0}, "inner100": {"inner_lr": 100.0},
    "meta32_inner100": {"meta_iters": 32, "inner_lr": 100.0},
}

# Issue 13's variants of the meta objective, each against uniform weights and the paper's form ("default").
COSINE_ADAM = {"gradient_matching": "cosine", "inner_step": "adam"}
VARIANTS.update({
    "cosine": {"gradient_matching": "cosine"},
    "adam": {"inner_step": "adam"},
    "relative0.05": {"inner_step": "relative", "inner_lr": 0.05},
    "cosine_adam": COSINE_ADAM,
    "timestep": {"omega_granularity": "timestep"},
    "cosine_adam_timestep": {**COSINE_ADAM, "omega_granularity": "timestep"},
    "carry": {"carry_scores": True},
    "cosine_adam_carry": {**COSINE_ADAM, "carry_scores": True},
    "cosine_adam_meta2": {**COSINE_ADAM, "meta_iters": 2},
    # An Adam-sized virtual step overshoots (docs/data/meta_term_scale_variants.log): smaller relative steps.
    "relative0.01": {"inner_step": "relative", "inner_lr": 0.01},
    "cosine_timestep": {"gradient_matching": "cosine", "omega_granularity": "timestep"},
})
VARIANT_SETS = {
    "all": ",".join(VARIANTS),
    "issue13": "uniform,default,meta2,cosine,cosine_adam,adam,timestep,cosine_adam_timestep,cosine_adam_meta2,carry",
    "issue13_extra": "cosine_timestep,relative0.01",
}


def unit_problem(name, unit, inputs, targets, config, num_steps: int):
    """A copy of ``unit`` ready to calibrate: its UnitProblem with the quantizers initialised on the
    training split and AdaRound started, and the split: (problem, train_idx, val_groups, group, step_index)."""
    step_index, group, is_val = assign_splits(config, num_steps, config.samples_per_timestep)
    train_idx, val_idx = torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
    val_groups = [val_idx[group[val_idx] == g] for g in range(config.num_groups)]
    problem = UnitProblem(name, copy.deepcopy(unit), inputs, targets, torch.device("cpu"))
    init_quantizers(problem, train_idx, config)
    start_rounding(problem)
    return problem, train_idx, val_groups, group, step_index


def calibrate_unit(unit, inputs, targets, data, config, seed, init_scores=None):
    """One unit, one variant: returns the calibrated copy and what happened on the way (with the learned
    scores, which a carry_scores variant hands to its next unit). ``init_scores``: where the meta steps
    start (None: zero scores)."""
    problem, train_idx, val_groups, group, step_index = unit_problem("unit", unit, inputs, targets, config,
                                                                     int(data.step_index.max()) + 1)
    unit = problem.unit
    train_groups = [torch.nonzero(group[train_idx] == g).flatten() for g in range(config.num_groups)]
    theta = [p for ps in problem.trainable_params(config).values() for p in ps]
    num_steps = int(data.step_index.max()) + 1
    score_index = step_index[train_idx] if config.omega_granularity == "timestep" else None
    scores = torch.zeros(num_scores(config, len(train_idx), num_steps)) if init_scores is None else init_scores
    omega, meta_s = torch.ones(len(train_idx)), 0.0
    if config.weighting == "gradient_aligned" and config.meta_iters > 0:
        t0 = time.perf_counter()
        scores, _ = learn_scores(problem, scores, train_idx, val_groups, config,
                                 torch.Generator().manual_seed(seed * 1009 + 1), progress=False, score_index=score_index)
        omega, meta_s = weights_of_samples(scores, config.tau, score_index), time.perf_counter() - t0
    # Conflict measured on the 5 standard groups whatever num_groups the variant learns with.
    std_groups = [train_idx[(data.step_index[train_idx] * 5) // (int(data.step_index.max()) + 1) == g] for g in range(5)]
    pos = {int(i): k for k, i in enumerate(train_idx)}
    cos_uniform = mean_off_diagonal(cosine_matrix(group_gradients(problem, theta, std_groups)))
    cos_learned = mean_off_diagonal(cosine_matrix(group_gradients(
        problem, theta, std_groups, [omega[[pos[int(i)] for i in g]] for g in std_groups])))
    t0 = time.perf_counter()
    reconstruct(problem, train_idx, omega, config, torch.Generator().manual_seed(seed * 1009), progress=False)
    recon_s = time.perf_counter() - t0
    harden(problem)
    set_quant_state(unit, weight=True, act=True)
    info = dict(meta_seconds=meta_s, recon_seconds=recon_s, omega_std=float(omega.std()) if len(omega) > 1 else 0.0,
                mean_cos_uniform=cos_uniform, mean_cos_learned=cos_learned, train_groups=len(train_groups),
                meta_iters=config.meta_iters if config.weighting == "gradient_aligned" else 0,
                recon_iters=config.recon_iters, scores=scores.tolist())
    return unit, info


@torch.no_grad()
def score(unit, inputs, targets, test):
    problem = UnitProblem("unit", unit, inputs, targets, torch.device("cpu"))
    losses = problem.per_sample_losses(torch.arange(len(test)), 64)
    per_step = mean_per_step(losses, test.step_index, int(test.step_index.max()) + 1)
    return float(losses.mean()), float(per_step.max()), per_step.tolist()


def report(paths: str) -> None:
    """Per variant, over units and seeds: test loss and worst-timestep loss relative to uniform weights on
    the same unit and seed (geometric mean; < 1 is better), units improved, conflict change, cost."""
    import numpy as np

    rows = [json.loads(line) for path in paths.split(",") for line in Path(path).read_text().splitlines()
            if line.strip()]
    uniform = {(r["unit"], r["seed"]): r for r in rows if r["variant"] == "uniform"}
    print("| variant | overrides | runs | test loss vs uniform | worst-timestep loss vs uniform | runs better "
          "than uniform | mean cos change (learned - uniform) | omega std | meta time / reconstruction time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant and (r["unit"], r["seed"]) in uniform]
        if not rs:
            continue
        ratio = np.array([r["test_loss"] / uniform[r["unit"], r["seed"]]["test_loss"] for r in rs])
        worst = np.array([r["worst_step_loss"] / uniform[r["unit"], r["seed"]]["worst_step_loss"] for r in rs])
        cos = np.mean([r["mean_cos_learned"] - r["mean_cos_uniform"] for r in rs])
        # Ratio of the summed seconds: the cost of the meta steps against the reconstruction they serve.
        cost = sum(r["meta_seconds"] for r in rs) / max(sum(r["recon_seconds"] for r in rs), 1e-9)
        print(f"| {variant} | `{json.dumps(rs[0]['overrides'])}` | {len(rs)} | {np.exp(np.log(ratio).mean()):.4f} | "
              f"{np.exp(np.log(worst).mean()):.4f} | {int((ratio < 1).sum())} / {len(rs)} | {cos:+.4f} | "
              f"{np.mean([r['omega_std'] for r in rs]):.3f} | {cost:.2f} |")
    _cost_table(rows)


def _cost_table(rows: list[dict]) -> None:
    """Seconds per meta iteration and per reconstruction iteration (rows that record their iteration
    counts), so that the meta / reconstruction ratio can be extrapolated to any preset's counts."""
    rows = [r for r in rows if r.get("meta_iters") and r.get("recon_iters")]
    if not rows:
        return
    print("\n| variant | runs | meta iters | recon iters | s / meta iter | s / recon iter | one meta iter in recon iters "
          "| meta / recon seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        meta = sum(r["meta_seconds"] for r in rs) / sum(r["meta_iters"] for r in rs)
        recon = sum(r["recon_seconds"] for r in rs) / sum(r["recon_iters"] for r in rs)
        ratio = sum(r["meta_seconds"] for r in rs) / sum(r["recon_seconds"] for r in rs)
        print(f"| {variant} | {len(rs)} | {rs[0]['meta_iters']} | {rs[0]['recon_iters']} | {meta:.4f} | {recon:.4f} | "
              f"{meta / recon:.1f} | {ratio:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ablate_units.jsonl")
    p.add_argument("--units", default=",".join(UNITS))
    p.add_argument("--variants", default=None, help="comma-separated names of VARIANTS (default: --variant-set)")
    p.add_argument("--variant-set", choices=sorted(VARIANT_SETS), default="all")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="demo", help="calibration budget preset (config.BUDGETS)")
    p.add_argument("--recon-iters", type=int, help="override the budget's reconstruction iterations")
    p.add_argument("--meta-iters", type=int, help="override the budget's meta iterations")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", help="print the table of finished JSONL files (comma-separated) and exit")
    args = p.parse_args()
    if args.report:
        return report(args.report)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    pipe = load_reference_pipeline()
    budget = dict(BUDGETS[args.budget])
    budget.update({k: v for k, v in (("recon_iters", args.recon_iters), ("meta_iters", args.meta_iters)) if v is not None})
    # The variants are of the meta objective: "default" is the paper's form, "uniform" turns the weights off.
    base = GradientAlignedQuantizer(weight_bits=4, act_bits=8, seed=args.seed, weighting="gradient_aligned", **budget)
    family = family_for(pipe.unet)
    data = collect_calibration_data(pipe.unet, pipe.scheduler.config, family, base, progress=False)
    # Test trajectories: other initial noise (another seed), the same calibration timesteps.
    test = collect_calibration_data(pipe.unet, pipe.scheduler.config, family,
                                    base.replace(seed=args.seed + 1000, samples_per_timestep=8), progress=False)
    model = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
    wrap_model(model, base, family)
    set_quant_state(model, weight=False, act=False)
    units = dict(reconstruction_units(model, family))
    done, carried = set(), {}
    if args.out.exists():
        for r in map(json.loads, args.out.read_text().splitlines()):
            done.add((r["unit"], r["variant"], r["seed"]))
            if r["seed"] == args.seed and "scores" in r:  # rows are written in unit order
                carried[r["variant"]] = torch.tensor(r["scores"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    variants = (args.variants or VARIANT_SETS[args.variant_set]).split(",")
    for name in args.units.split(","):
        unit = units[name]
        inputs = capture_unit(model, unit, data, family, 64, "inputs")
        targets = capture_unit(model, unit, data, family, 64, "output")
        test_in = capture_unit(model, unit, test, family, 64, "inputs")
        test_out = capture_unit(model, unit, test, family, 64, "output")
        for variant in variants:
            if (name, variant, args.seed) in done:
                continue
            config = base.replace(**VARIANTS[variant])
            init = carried.get(variant) if config.carry_scores else None
            calibrated, info = calibrate_unit(unit, inputs, targets, data, config, args.seed, init)
            carried[variant] = torch.tensor(info["scores"])
            test_loss, worst_step, per_step = score(calibrated, test_in, test_out, test)
            row = dict(unit=name, variant=variant, seed=args.seed, budget=args.budget, overrides=VARIANTS[variant],
                       test_loss=test_loss, worst_step_loss=worst_step, test_step_loss=per_step, **info)
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                              if k not in ("test_step_loss", "scores")}), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
