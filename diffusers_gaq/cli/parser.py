"""``diffusers-gaq``: quantize, evaluate, push, inspect, and the offline demo.

    diffusers-gaq quantize reference --weight-bits 4 --act-bits 8 --output out/w4a8
    diffusers-gaq evaluate out/w4a8 --baseline reference --num-images 256
    diffusers-gaq push out/w4a8 me/ddpm-w4a8 --private
    diffusers-gaq info out/w4a8
    diffusers-gaq demo --output out/demo
    diffusers-gaq sensitivity reference --weight-bits 4 --act-bits 8 --output out/sens

Errors end with a one-line message and a non-zero exit code (add --verbose for the traceback).
"""

from __future__ import annotations

import argparse

from .._version import __version__
from ..config import BUDGETS
from ..runtime.convert import RUNTIMES
from .demo import cmd_demo, cmd_sensitivity
from .evaluate import cmd_evaluate
from .info import cmd_info, cmd_push
from .quantize import cmd_quantize


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default unless its help already says it (or there is none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def positive_int(text: str) -> int:
    """argparse type of counts (images, steps, layers): a whole number >= 1, refused before any work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from ..demo import QUICK_NUM_IMAGES, QUICK_STEPS
    parser = argparse.ArgumentParser(prog="diffusers-gaq", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # --verbose after the command too; SUPPRESS keeps the top-level value when it is not given there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser
    # Every command gets --verbose and shows its defaults.
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[common], formatter_class=_HelpFormatter, **k)

    q = sub.add_parser("quantize", help="calibrate and save a quantized pipeline")
    q.add_argument("model", help="'reference' (embedded Fashion-MNIST DDPM), a local pipeline folder, or a Hub id")
    q.add_argument("--output", required=True, help="folder for the quantized pipeline (must be empty or new)")
    q.add_argument("--weight-bits", type=int, help="2-8 (default 4)")
    q.add_argument("--act-bits", type=int, help="4-16, or 0 for weight-only (default 8)")
    q.add_argument("--config", help="a GradientAlignedQuantizer JSON file; flags override it, and so does "
                   "--budget (a warning lists the file's fields it replaces)")
    q.add_argument("--layer-precision", action="append", metavar="PATTERN=TAG",
                   help="precision of the layers whose module name matches the fnmatch PATTERN: TAG is w<W>a<A> "
                        "(e.g. w8a8), w<W> (activation FP), a<A> (weight FP) or fp; repeat for several, the first "
                        "matching pattern wins")
    q.add_argument("--first-last-precision", metavar="TAG",
                   help="precision of the first and last layers (UNets: conv_in, conv_out; DiT: patch embedding, "
                        "output projection): a tag as above, default fp; 'same' treats them like the others")
    q.add_argument("--average-weight-bits", type=float, metavar="BITS",
                   help="budget of average bits per quantized weight, between --weight-bits and 8: a weight-only "
                        "sensitivity analysis on the calibration data picks the layers raised to 8 bits (explicit "
                        "--layer-precision entries win and count toward it)")
    q.add_argument("--act-range-init", choices=["ema", "ema_shuffled", "minmax", "percentile", "mse"],
                   help="how activation ranges are initialised over the calibration inputs")
    q.add_argument("--timestep-aware", action="append", metavar="PATTERN",
                   help="layers (fnmatch on module names) whose input activations get one step size per timestep "
                        "group; repeat for several; 'none' turns it off")
    q.add_argument("--act-timestep-groups", type=int, metavar="N",
                   help="timestep groups of --timestep-aware layers (default: one per calibration timestep)")
    q.add_argument("--budget", choices=sorted(BUDGETS), default="default", help="calibration budget preset")
    q.add_argument("--weighting", choices=["gradient_aligned", "uniform"],
                   help="sample weights (default uniform; gradient_aligned learns them, the paper's method)")
    q.add_argument("--method", choices=["reconstruction", "minmax"])
    q.add_argument("--timestep-schedule", choices=["uniform", "normal"])
    q.add_argument("--recon-iters", type=int, help="reconstruction iterations per block (overrides the budget's)")
    q.add_argument("--meta-iters", type=int, help="meta steps of the sample weights (overrides the budget's)")
    q.add_argument("--grad-shards", type=int,
                   help="split every reconstruction minibatch into this many gradient shards, summed in a fixed "
                        "order: results are then bit-identical for 1..N processes (default: one per process)")
    q.add_argument("--class-labels", type=int, nargs="+", metavar="LABEL",
                   help="class-conditional models (DiT, class-conditional UNet2DModel): labels of the calibration "
                        "trajectories (default: spread evenly over every class)")
    q.add_argument("--prompt", action="append", metavar="TEXT",
                   help="Stable Diffusion-style models: a calibration prompt; repeat for several (default: a small "
                        "built-in list)")
    q.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance of the calibration trajectories (default: the pipeline's own, "
                        "4.0 DiT / 7.5 SD; 1 turns it off)")
    q.add_argument("--seed", type=int, help="seed of the calibration trajectories and minibatches (default 0)")
    q.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    q.add_argument("--overwrite", action="store_true", help="replace an output folder that holds an earlier "
                   "quantized pipeline (and nothing else: a folder with other files or the input model is refused)")
    q.add_argument("--checkpoint-dir", help="save the calibration state here after the data and after every "
                   "unit, so that --resume can continue an interrupted run")
    q.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir (same settings and model; "
                   "the result is bit-identical to an uninterrupted run); starts afresh if it holds no checkpoint")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("evaluate", help="fidelity of quantized pipelines against their FP baseline (any supported "
                       "pipeline: PSNR, SSIM, FID-ref for the reference, seconds per image, size)")
    e.add_argument("directory", nargs="+", help="one or more quantized pipeline folders of the same base model")
    e.add_argument("--baseline", help="FP pipeline: 'reference', a folder or a Hub id (default: the base model)")
    e.add_argument("--num-images", type=positive_int, default=256, help="images per model")
    e.add_argument("--num-inference-steps", type=positive_int, default=50, help="DDIM steps per image")
    e.add_argument("--seed", type=int, default=0, help="seed of the initial noise, the same for every model")
    e.add_argument("--class-labels", type=int, nargs="+", metavar="LABEL",
                   help="class-conditional and DiT pipelines: labels to sample, cycled (default: spread over every class)")
    e.add_argument("--prompt", action="append", metavar="TEXT",
                   help="Stable Diffusion: a prompt to sample, repeat for several, cycled (default: a built-in "
                        "held-out list)")
    e.add_argument("--guidance-scale", type=float, help="DiT / Stable Diffusion (default: the pipeline's own)")
    e.add_argument("--report", help="report folder (default DIRECTORY/evaluation; required for several folders)")
    e.add_argument("--update-card", action="store_true", help="write the measured fidelity into each model card")
    e.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="how the quantized denoisers run: 'auto' (default) the integer runtime users load, "
                        "'simulated' the fake-quant model calibration used")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("push", help="upload a quantized pipeline folder to the Hub")
    p.add_argument("directory", help="a folder saved by diffusers-gaq (pipeline or model)")
    p.add_argument("repo_id", help="namespace/name on the Hub")
    p.add_argument("--private", action="store_true",
                   help="create the repo as private (an existing repo keeps its visibility)")
    p.add_argument("--token", help="a Hub token with write access; prefer the HF_TOKEN environment variable or "
                   "`huggingface-cli login`: a token on the command line shows in the process list and shell history")
    p.add_argument("--revision", help="branch to push to (default: main)")
    p.add_argument("--create-pr", action="store_true",
                   help="open a pull request with the files instead of committing to the branch")
    p.add_argument("--endpoint", help="Hub address (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for each Hub request before giving up "
                        "(default: $DIFFUSERS_GAQ_PUSH_TIMEOUT or 60)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the files (with sizes) that would be uploaded, and send nothing")
    p.set_defaults(func=cmd_push)

    i = sub.add_parser("info", help="what is inside a quantized checkpoint")
    i.add_argument("directory", help="a folder saved by diffusers-gaq (pipeline or model)")
    i.add_argument("--json", action="store_true", help="also print quantization_config.json")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="quantize the embedded reference pipeline and compare with FP")
    d.add_argument("--output", default="out/demo", help="folder for the picture, the table and the checkpoint")
    d.add_argument("--weight-bits", type=int, default=4, help="2-8")
    d.add_argument("--act-bits", type=int, default=8, help="4-16, or 0 for weight-only")
    d.add_argument("--budget", choices=sorted(BUDGETS), default="quick",
                   help="quick (default: about 3 minutes on 2 CPU cores) or a calibration preset; demo is the "
                        "documented budget of docs/benchmarks.md")
    d.add_argument("--weighting", choices=["gradient_aligned", "uniform"], default="gradient_aligned",
                   help="sample weights (default gradient_aligned: the demo shows the paper's learned weights; "
                        "the library's default is uniform, docs/benchmarks.md 'Verdict (issue 13)')")
    d.add_argument("--num-images", type=positive_int, default=QUICK_NUM_IMAGES,
                   help=f"FP and quantized images each (default {QUICK_NUM_IMAGES})")
    d.add_argument("--num-inference-steps", type=positive_int, default=QUICK_STEPS,
                   help=f"DDIM steps per image (default {QUICK_STEPS})")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sensitivity", help="per-layer damage when only that layer is quantized")
    s.add_argument("model", help="'reference', a local pipeline folder, or a Hub id")
    s.add_argument("--output", required=True, help="folder for sensitivity.json, sensitivity.md, sensitivity.png")
    s.add_argument("--weight-bits", type=int, default=4, help="2-8 (default 4)")
    s.add_argument("--act-bits", type=int, default=8, help="4-16, or 0 for weight rows only (default 8)")
    s.add_argument("--num-images", type=positive_int, default=16, help="DDIM images per row (default 16)")
    s.add_argument("--steps", type=positive_int, default=10, help="DDIM steps of the images and calibration (default 10)")
    s.add_argument("--no-images", action="store_true", help="noise-prediction error only (much faster)")
    s.add_argument("--top", type=positive_int, default=20, help="layers in the printed table and the plot (default 20)")
    s.add_argument("--budget", choices=["tiny", "demo"], default="tiny", help="calibration data budget")
    s.add_argument("--seed", type=int, default=0, help="seed of the calibration data and images")
    s.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_sensitivity)
    return parser
