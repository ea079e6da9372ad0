"""Calibration budgets by name: the fields a preset sets on GradientAlignedQuantizer
(``GradientAlignedQuantizer.from_budget(name, ...)``, the CLI's ``--budget``)."""

# Calibration budgets by name (GradientAlignedQuantizer.from_budget, the CLI's --budget): "tiny" for tests,
# "demo" finishes in minutes on 2 CPU cores, "default" is the dataclass defaults, "paper" is Q-Diffusion's scale.
BUDGETS = {
    # `make demo` (diffusers-gaq demo): every stage of the method at a fraction of the `demo` budget:
    # 20-step trajectories instead of 50, 8 calibration timesteps x 16 trajectories instead of 10 x 24,
    # 48 reconstruction iterations per block instead of 160 (AdaRound rate 0.1 as for `demo`), 1 meta
    # iteration instead of 2. Reconstruction is most of the time (about 60 %), the meta step ~15 %;
    # measured in docs/benchmarks.md ("make demo in three minutes"), with a larger candidate.
    "quick": dict(num_inference_steps=20, num_calibration_timesteps=8, samples_per_timestep=16, recon_iters=48,
                  recon_batch_size=32, meta_iters=1, meta_batch_size=32, weight_lr=0.1),
    "tiny": dict(num_inference_steps=10, num_calibration_timesteps=5, samples_per_timestep=8, recon_iters=5,
                 recon_batch_size=8, meta_iters=1, meta_batch_size=8, val_fraction=0.2),
    # meta_iters: one meta iteration costs 11-17 reconstruction iterations (docs/benchmarks.md, "Gradient-aligned
    # variants (issue 13)"), so meta_iters <= 0.3 * recon_iters / 17 keeps the meta steps within 0.3x of the
    # reconstruction they serve; 2 meta steps learned weights as good as 8 per unit. At the paper's scale (260
    # validation samples per meta step) one costs 40-110 reconstruction iterations: 50 of them, not the paper's
    # 2000 (4-11x the reconstruction). tiny is a smoke test: its single meta step costs ~18 of its 5
    # reconstruction iterations.
    "demo": dict(num_inference_steps=50, num_calibration_timesteps=10, samples_per_timestep=24, recon_iters=160,
                 recon_batch_size=32, meta_iters=2, meta_batch_size=32, weight_lr=0.1),
    "default": {},
    # Q-Diffusion's scale and AdaRound learning rate (docs/benchmarks.md: reconstruction curve).
    "paper": dict(num_inference_steps=100, num_calibration_timesteps=20, samples_per_timestep=256, recon_iters=20000,
                  recon_batch_size=32, meta_iters=50, weight_lr=1e-3),
}
