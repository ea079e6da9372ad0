"""How large is the gradient-matching term L_GM against the validation losses in the meta objective?

    python examples/meta_term_scale.py      # ~1 min, 1 thread; output in docs/data/meta_term_scale.log

For two reference units (W4A8, demo budget, seed 0, FP inputs as in ablate_units.py), 8 meta steps
at three virtual-step sizes inner_lr; prints L_GM and L_VAL = L_GM + sum_t L^V_t at the first and last
step. G_t scales with inner_lr, so L_GM scales with inner_lr squared.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate_units as A  # noqa: E402  (the shared set-up: pipeline, config, data, wrapped model)

from diffusers_gaq.calibration.data import assign_splits  # noqa: E402

UNITS = ("down_blocks.1.resnets.1", "up_blocks.3.resnets.0")


def main() -> None:
    torch.set_num_threads(1)
    pipe = A.load_reference_pipeline()
    base = A.GradientAlignedQuantizer(weight_bits=4, act_bits=8, seed=0, **A.BUDGETS["demo"])
    family = A.family_for(pipe.unet)
    data = A.collect_calibration_data(pipe.unet, pipe.scheduler.config, family, base, progress=False)
    model = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
    A.wrap_model(model, base, family)
    A.set_quant_state(model, weight=False, act=False)
    units = dict(A.reconstruction_units(model, family))
    for name in UNITS:
        inputs = A.capture_unit(model, units[name], data, family, 64, "inputs")
        targets = A.capture_unit(model, units[name], data, family, 64, "output")
        for inner_lr in (0.01, 1.0, 100.0):
            config = base.replace(inner_lr=inner_lr)
            _, group, is_val = assign_splits(config, base.num_calibration_timesteps, config.samples_per_timestep)
            train, val = torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
            val_groups = [val[group[val] == g] for g in range(config.num_groups)]
            problem = A.UnitProblem(name, copy.deepcopy(units[name]), inputs, targets, torch.device("cpu"))
            A.init_quantizers(problem, train, config)
            A.start_rounding(problem)
            _, history = A.learn_scores(problem, torch.zeros(len(train)), train, val_groups, config,
                                        torch.Generator().manual_seed(1), progress=False)
            print(f"{name} inner_lr {inner_lr} L_GM first/last {history[0]['l_gm']:.3g} {history[-1]['l_gm']:.3g} "
                  f"L_VAL first/last {history[0]['l_val']:.4g} {history[-1]['l_val']:.4g}", flush=True)


if __name__ == "__main__":
    main()
