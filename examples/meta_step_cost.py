"""Where the time of one meta iteration goes: seconds per meta iteration (3 iterations) against seconds per
reconstruction iteration (10), for the paper's form with batched or looped surrogate gradients, the
cosine + Adam-sized variant, and one group (no L_GM, so no surrogate gradients).

    python examples/meta_step_cost.py down_blocks.1.resnets.1     # docs/data/meta_step_cost.log

W4A8, demo budget, seed 0, FP inputs (the set-up of ablate_units.py).
"""
import copy
import sys
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch

import ablate_units as A  # noqa: E402  (the shared set-up: pipeline, config, data, wrapped model)
from diffusers_gaq.calibration import weighting as W
from diffusers_gaq.calibration.data import assign_splits


def main() -> None:
    torch.set_num_threads(1)
    pipe = A.load_reference_pipeline()
    base = A.GradientAlignedQuantizer(weight_bits=4, act_bits=8, seed=0, **A.BUDGETS["demo"])
    family = A.family_for(pipe.unet)
    data = A.collect_calibration_data(pipe.unet, pipe.scheduler.config, family, base, progress=False)
    model = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
    A.wrap_model(model, base, family); A.set_quant_state(model, weight=False, act=False)
    units = dict(A.reconstruction_units(model, family))
    name = sys.argv[1]
    inputs = A.capture_unit(model, units[name], data, family, 64, "inputs")
    targets = A.capture_unit(model, units[name], data, family, 64, "output")
    _, group, is_val = assign_splits(base, base.num_calibration_timesteps, base.samples_per_timestep)
    train, val = torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
    vg = [val[group[val] == g] for g in range(base.num_groups)]
    problem = A.UnitProblem(name, copy.deepcopy(units[name]), inputs, targets, torch.device("cpu"))
    A.init_quantizers(problem, train, base); A.start_rounding(problem)
    for label, batched, cfg in [("batched", True, base), ("loop", False, base), ("batched-cos-adam", True, base.replace(gradient_matching="cosine", inner_step="adam")), ("groups1", True, base.replace(num_groups=1))]:
        W._BATCHED_GRADS["ok"] = batched  # force the per-group loop for the "loop" row
        g = vg if cfg.num_groups > 1 else [val]
        t = time.perf_counter()
        W.learn_scores(problem, torch.zeros(len(train)), train, g, cfg.replace(meta_iters=3), torch.Generator().manual_seed(1), progress=False)
        m = (time.perf_counter() - t) / 3
        t = time.perf_counter()
        A.reconstruct(problem, train, torch.ones(len(train)), base.replace(recon_iters=10), torch.Generator().manual_seed(0), progress=False)
        r = (time.perf_counter() - t) / 10
        print(f"{name} {label}: {m:.3f} s/meta iter, {r:.3f} s/recon iter, ratio {m/r:.1f}", flush=True)


if __name__ == "__main__":
    main()
