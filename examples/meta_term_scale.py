"""How large is the gradient-matching term L_GM against the validation losses in the meta objective?

    python examples/meta_term_scale.py      # ~1 min, 1 thread; output in docs/data/meta_term_scale.log
    python examples/meta_term_scale.py --variants   # docs/data/meta_term_scale_variants.log

For two reference units (W4A8, demo budget, seed 0, FP inputs as in ablate_units.py), 8 meta steps
at three virtual-step sizes inner_lr; prints L_GM and L_VAL = L_GM + sum_t L^V_t at the first and last
step. G_t scales with inner_lr, so L_GM scales with inner_lr squared.

With --variants: for the paper's form and issue 13's variants (cosine gradient matching, Adam-sized
inner steps), the share of the gradient-matching term in the score gradient at equal weights,
|d L_GM / d s| / |d (validation term) / d s|, on the first meta minibatch.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate_units as A  # noqa: E402  (the shared set-up: pipeline, config, data, wrapped model)

from diffusers_gaq.calibration.weighting import meta_terms  # noqa: E402

UNITS = ("down_blocks.1.resnets.1", "up_blocks.3.resnets.0")


VARIANTS = {
    "paper inner_lr=0.01": {}, "paper inner_lr=1": {"inner_lr": 1.0},
    "cosine": {"gradient_matching": "cosine"}, "adam": {"inner_step": "adam"},
    "cosine_adam": {"gradient_matching": "cosine", "inner_step": "adam"},
}


def gradient_shares(problem, train, val_groups, config, generator):
    """|d L_GM / d s| and |d validation term / d s| at zero scores, first meta minibatch."""
    theta = problem.named_trainable(config)
    for p in theta.values():
        p.requires_grad_(True)
    scores = torch.zeros(len(train), requires_grad=True)
    batch = torch.randint(0, len(train), (min(config.meta_batch_size, len(train)),), generator=generator)
    with sdpa_kernel(SDPBackend.MATH):
        l_gm, l_v = meta_terms(problem, scores, batch, train, val_groups, config, theta)
        (g_gm,) = torch.autograd.grad(l_gm, scores, retain_graph=True)
        (g_v,) = torch.autograd.grad(l_v, scores)
    return l_gm.item(), l_v.item(), g_gm.norm().item(), g_v.norm().item()


def main() -> None:
    torch.set_num_threads(1)
    with_variants = "--variants" in sys.argv[1:]
    pipe = A.load_reference_pipeline()
    # 8 meta steps: the demo preset's when docs/data/meta_term_scale.log was written (now 2)
    base = A.GradientAlignedQuantizer(weight_bits=4, act_bits=8, seed=0, **{**A.BUDGETS["demo"], "meta_iters": 8})
    family = A.family_for(pipe.unet)
    data = A.collect_calibration_data(pipe.unet, pipe.scheduler.config, family, base, progress=False)
    model = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
    A.wrap_model(model, base, family)
    A.set_quant_state(model, weight=False, act=False)
    units = dict(A.reconstruction_units(model, family))
    for name in UNITS:
        inputs = A.capture_unit(model, units[name], data, family, 64, "inputs")
        targets = A.capture_unit(model, units[name], data, family, 64, "output")
        if with_variants:
            problem, train, val_groups, _, _ = A.unit_problem(name, units[name], inputs, targets, base,
                                                              base.num_calibration_timesteps)
            for label, overrides in VARIANTS.items():
                l_gm, l_v, g_gm, g_v = gradient_shares(problem, train, val_groups, base.replace(**overrides),
                                                       torch.Generator().manual_seed(1))
                print(f"{name} {label}: L_GM {l_gm:.3g}, validation term {l_v:.4g}, |dL_GM/ds| {g_gm:.3g}, "
                      f"|dval/ds| {g_v:.3g}, share {g_gm / max(g_v, 1e-30):.3g}", flush=True)
            continue
        for inner_lr in (0.01, 1.0, 100.0):
            config = base.replace(inner_lr=inner_lr)
            problem, train, val_groups, _, _ = A.unit_problem(name, units[name], inputs, targets, config,
                                                              base.num_calibration_timesteps)
            _, history = A.learn_scores(problem, torch.zeros(len(train)), train, val_groups, config,
                                        torch.Generator().manual_seed(1), progress=False)
            print(f"{name} inner_lr {inner_lr} L_GM first/last {history[0]['l_gm']:.3g} {history[-1]['l_gm']:.3g} "
                  f"L_VAL first/last {history[0]['l_val']:.4g} {history[-1]['l_val']:.4g}", flush=True)


if __name__ == "__main__":
    main()
