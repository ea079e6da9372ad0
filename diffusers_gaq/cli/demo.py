"""`diffusers-gaq demo` and `diffusers-gaq sensitivity`: the offline demo on the reference pipeline, and
the per-layer sensitivity analysis."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import BUDGETS
from . import common
from .common import REFERENCE, CLIError, _act_bits, _check_model_id, _check_output, _check_replaceable


def cmd_demo(args) -> int:
    """Quantize the reference pipeline (W4A8, gradient-aligned weights unless --weighting uniform), compare
    with FP, write the picture and table."""
    from ..config import GradientAlignedQuantizer
    from ..demo import LONGER_RUN, budget_for, run_demo

    out = Path(args.output)
    _check_output(out, overwrite=True)  # its files are replaced; other files in the folder stay
    _check_replaceable(out / "pipeline", REFERENCE)
    config = GradientAlignedQuantizer(weight_bits=args.weight_bits, act_bits=_act_bits(args.act_bits),
                                      weighting=args.weighting, **budget_for(args.budget))
    if not args.verbose:  # the demo prints its steps and progress bars; per-unit log lines would bury them
        logging.getLogger("diffusers_gaq").setLevel(logging.WARNING)
    result = run_demo(out, config, budget_name=args.budget, num_images=args.num_images,
                      num_inference_steps=args.num_inference_steps, progress=not args.quiet, say=print)
    print()
    print(result.comparison.to_markdown(), end="")
    if args.num_images < 1000:
        print(f"FID-ref over {args.num_images} images and {args.num_inference_steps} steps: compare the two rows with "
              "each other, not with the 1000-image, 50-step numbers of docs/benchmarks.md.")
    if args.budget == "quick":
        print(f"This was the 'quick' budget; {LONGER_RUN}.")
    print(f"wrote {out / 'fp_vs_quantized.png'} (left FP, right {config.tag.upper()}, the same noise in the same cell), "
          f"{out / 'evaluation.md'} and the checkpoint {out / 'pipeline'}; demo took {result.total_seconds:.0f} s")
    return 0


def cmd_sensitivity(args) -> int:
    """Per-layer damage of quantizing one layer alone; writes sensitivity.json / .md / .png."""
    from ..config import GradientAlignedQuantizer
    from ..files import atomic_write_text
    from ..sensitivity import analyze_sensitivity

    config = GradientAlignedQuantizer(weight_bits=args.weight_bits, act_bits=_act_bits(args.act_bits), seed=args.seed,
                                      device=args.device, **BUDGETS[args.budget])
    if args.top < 1:
        raise CLIError(f"--top must be >= 1, got {args.top}")
    out = Path(args.output)
    _check_output(out, overwrite=True)  # the three files are replaced; other files in the folder stay
    _check_model_id(args.model)
    pipe = common.load_pipeline(args.model)
    report = analyze_sensitivity(pipe, config, num_images=args.num_images, num_inference_steps=args.steps,
                                 seed=args.seed, images=not args.no_images, progress=not args.quiet)
    report.to_json(out / "sensitivity.json")
    atomic_write_text(out / "sensitivity.md", f"# Per-layer sensitivity {config.tag}\n\n{report.to_markdown()}")
    report.plot(out / "sensitivity.png", top=args.top)
    print(report.to_markdown(top=args.top), end="")
    print(f"{len(report.rows)} rows in {report.settings['seconds']:.0f}s -> {out}")
    return 0
