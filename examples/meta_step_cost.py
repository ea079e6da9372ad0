"""Where the time of one meta iteration goes: seconds per meta iteration (3 iterations) against seconds per
reconstruction iteration (10), for the paper's form, the cosine + Adam-sized variant and one group (no
L_GM), each with the score gradient by parts (calibration/meta_gradient.py, what learn_scores uses) and
by autograd through the single expression weighting.meta_objective (the definition).

    python examples/meta_step_cost.py down_blocks.1.resnets.1     # docs/data/meta_step_cost.log

W4A8, demo budget, seed 0, FP inputs (the set-up of ablate_units.py).
"""
import copy
import itertools
import sys
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import ablate_units as A  # noqa: E402  (the shared set-up: pipeline, config, data, wrapped model)
from diffusers_gaq.calibration import weighting as W
from diffusers_gaq.calibration.meta_gradient import meta_chunk_size, meta_gradient


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
    problem, train, vg, _, _ = A.unit_problem(name, units[name], inputs, targets, base, base.num_calibration_timesteps)
    val = torch.cat(vg).sort().values  # the groups1 row: all validation samples as one group
    theta = problem.named_trainable(base)
    variants = [("paper form", base), ("cosine-adam", base.replace(gradient_matching="cosine", inner_step="adam")),
                ("groups1", base.replace(num_groups=1))]
    for (label, cfg), how in itertools.product(variants, ("by parts", "autograd")):
        g = vg if cfg.num_groups > 1 else [val]
        for p in theta.values():  # reconstruct() below hands them back frozen
            p.requires_grad_(True)
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, len(train), (cfg.meta_batch_size,), generator=gen) for _ in range(3)]
        scores = torch.zeros(len(train))
        with sdpa_kernel(SDPBackend.MATH):
            context = W.make_context(problem, theta, train, g, cfg, batches[0])
            t = time.perf_counter()
            for batch in batches:
                if how == "by parts":
                    meta_gradient(problem, scores, batch, train, g, cfg, theta, context, meta_chunk_size(problem))
                else:
                    s = scores.clone().requires_grad_(True)
                    torch.autograd.grad(W.meta_objective(problem, s, batch, train, g, cfg, theta, context)[0], s)
        m = (time.perf_counter() - t) / 3
        label = f"{label}, {how}"
        t = time.perf_counter()
        A.reconstruct(problem, train, torch.ones(len(train)), base.replace(recon_iters=10), torch.Generator().manual_seed(0), progress=False)
        r = (time.perf_counter() - t) / 10
        print(f"{name} {label}: {m:.3f} s/meta iter, {r:.3f} s/recon iter, ratio {m/r:.1f}", flush=True)


if __name__ == "__main__":
    main()
