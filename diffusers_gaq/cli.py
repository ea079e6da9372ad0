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
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("diffusers_gaq")

# Calibration budgets by name: "demo" finishes in minutes on 2 CPU cores, "paper" is Q-Diffusion's scale.
BUDGETS = {
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

REFERENCE = "reference"


class CLIError(Exception):
    """A user-facing error: printed as one line."""


def load_pipeline(model: str):
    """'reference' (the embedded pipeline), a local pipeline folder, or a Hub id."""
    if model == REFERENCE:
        from .reference import load_reference_pipeline

        return load_reference_pipeline()
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model)


def build_config(args):
    from .config import GradientAlignedQuantizer

    base = GradientAlignedQuantizer.from_json_file(args.config).to_dict() if args.config else {}
    base.pop("quant_method", None)
    if args.config:
        _note_budget_overrides(args.config, args.budget)
    base.update(BUDGETS[args.budget])
    overrides = {
        "weight_bits": args.weight_bits, "act_bits": args.act_bits, "weighting": args.weighting,
        "method": args.method, "timestep_schedule": args.timestep_schedule, "seed": args.seed,
        "device": args.device, "recon_iters": args.recon_iters, "meta_iters": args.meta_iters,
        "grad_shards": args.grad_shards, "act_range_init": args.act_range_init,
        "act_timestep_groups": args.act_timestep_groups,
        "class_labels": args.class_labels, "calibration_prompts": args.prompt, "guidance_scale": args.guidance_scale,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    if args.layer_precision:  # flags come after the --config file's patterns: earlier patterns win
        base["layer_precision"] = {**base.get("layer_precision", {}), **_layer_precision(args.layer_precision)}
    if args.first_last_precision is not None:
        base["first_last_precision"] = args.first_last_precision
    if args.timestep_aware:
        base["timestep_aware_acts"] = [] if args.timestep_aware == ["none"] else args.timestep_aware
    if args.act_bits is not None:
        base["act_bits"] = _act_bits(args.act_bits)
    return GradientAlignedQuantizer.from_dict(base)


def _act_bits(value: int) -> int | None:
    """--act-bits as the config field: 0 means weight-only (None); a negative width is a typo."""
    if value < 0:
        raise CLIError(f"--act-bits {value} is invalid: expected 4-16, or 0 for weight-only quantization")
    return value or None


def _note_budget_overrides(config_path: str, budget: str) -> None:
    """--budget wins over the --config file's fields (it is applied after the file); say which of
    the file's own settings it replaces, so that the mix is never silent."""
    from .config import read_config_fields

    fields = read_config_fields(config_path)
    replaced = {k: (fields[k], v) for k, v in BUDGETS[budget].items() if k in fields and fields[k] != v}
    if replaced:
        shown = ", ".join(f"{k} (file {old!r}, budget {new!r})" for k, (old, new) in replaced.items())
        logger.warning("--budget %s overrides these fields of %s: %s; leave out --budget to keep the file's values",
                       budget, config_path, shown)


def _layer_precision(items: list[str]) -> dict[str, str]:
    """--layer-precision PATTERN=TAG flags as a mapping, in the order given (the first match wins)."""
    mapping = {}
    for item in items:
        pattern, sep, tag = item.rpartition("=")
        if not sep or not pattern or not tag:
            raise CLIError(f"--layer-precision {item!r} is not PATTERN=TAG, e.g. --layer-precision 'up_blocks.*=w8a8'")
        mapping[pattern] = tag
    return mapping


def _check_output(path: Path, overwrite: bool) -> None:
    """Where the output goes: a folder (or a new path under a folder) this process can write, with
    room; a non-empty folder only with ``overwrite``. What an overwrite may replace is checked by the
    caller (quantize: _check_replaceable)."""
    import shutil

    from .files import check_writable_location

    if path.exists() and not path.is_dir():
        raise CLIError(f"--output {path} is a file, not a folder; delete it or choose another --output")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise CLIError(f"output folder {path} exists and is not empty; pass --overwrite or choose another folder")
    try:
        probe = check_writable_location(path)
    except (NotADirectoryError, PermissionError) as e:
        raise CLIError(f"--output {path}: {e}") from None
    if shutil.disk_usage(probe).free < 200 * 2**20:
        raise CLIError(f"less than 200 MiB free under {probe}; free some space or choose another folder")


def _check_replaceable(out: Path, model: str) -> None:
    """--overwrite replaces the output folder as a whole: refuse one that holds the input model or
    anything a quantized save did not write (the message lists it); the input is never deleted."""
    from .folders import check_replaceable

    if model != REFERENCE and Path(model).exists():
        source, target = Path(model).resolve(), out.resolve()
        if source == target or target in source.parents:
            raise CLIError(f"--output {out} holds the input model {model}; replacing it would delete the model. "
                           "Choose another --output")
        if source in target.parents:
            raise CLIError(f"--output {out} is inside the input model folder {model}; choose an --output outside it")
    try:
        check_replaceable(out, pipeline=True)
    except FileExistsError as e:
        raise CLIError(str(e)) from None


def _check_model_id(model: str) -> None:
    """'reference' and existing folders load as they are; anything else must be a well-formed Hub id."""
    if model == REFERENCE or Path(model).is_dir():
        return
    if Path(model).exists():  # a file is no Hub id either: say what to pass instead
        raise CLIError(f"{model} is a file; pass the pipeline folder (the one holding model_index.json), "
                       "'reference', or a Hub id")
    from .hub import check_repo_id

    try:
        check_repo_id(model)
    except ValueError as e:
        raise CLIError(f"{model!r} is neither 'reference' nor an existing folder, and not a Hub id either: {e}"
                       ) from None


def _check_checkpoint_dir(checkpoint_dir: Path | None, out: Path, resume: bool) -> None:
    from .checkpointing import check_checkpoint_dir

    # The output folder is replaced as a whole when the result is saved: a checkpoint inside it would go too.
    if checkpoint_dir is not None and (checkpoint_dir.resolve() == out.resolve()
                                       or out.resolve() in checkpoint_dir.resolve().parents):
        raise CLIError(f"--checkpoint-dir {checkpoint_dir} is inside --output {out}; choose a folder outside it")
    check_checkpoint_dir(checkpoint_dir, resume)


def _check_space_for_model(out: Path, pipe) -> None:
    """The saved pipeline is at most its FP size (the denoiser shrinks to packed integers, a text
    encoder or VAE is saved as it is); ask for that much room."""
    import shutil

    from torch import nn

    modules = [m for m in pipe.components.values() if isinstance(m, nn.Module)]
    need = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values()) + 16 * 2**20
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise CLIError(f"the quantized pipeline needs up to {need / 2**20:.0f} MiB under {probe}, only "
                       f"{free / 2**20:.0f} MiB are free; free some space or choose another --output")


def cmd_quantize(args) -> int:
    from .distributed import is_main_process, wait_for_everyone
    from .quantize import check_pipeline, quantize_pipeline
    from .runtime import resolve_device
    from .modeling import save_quantized_pipeline

    # Everything that can be checked without the model is checked before it is loaded; the rest
    # (pipeline type, disk space for its size, the checkpoint's fingerprint) before any sampling.
    config = build_config(args)
    resolve_device(config.device)
    out = Path(args.output)
    _check_output(out, args.overwrite)
    _check_model_id(args.model)
    _check_replaceable(out, args.model)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    _check_checkpoint_dir(checkpoint_dir, out, args.resume)
    pipe = load_pipeline(args.model)
    _, component, _ = check_pipeline(pipe)
    _check_space_for_model(out, pipe)
    start = time.perf_counter()
    qpipe = quantize_pipeline(pipe, config, progress=not args.quiet, checkpoint_dir=checkpoint_dir, resume=args.resume)
    if args.model != REFERENCE:
        getattr(qpipe, component).gaq_base_model = args.model
    if is_main_process():
        save_quantized_pipeline(qpipe, out, overwrite=args.overwrite)
        print(f"quantized {config.tag} in {time.perf_counter() - start:.0f}s -> {out}")
    wait_for_everyone()
    return 0


def _denoiser(pipe):
    from .models import denoiser_of

    return denoiser_of(pipe)[2]


def _load_pair(directory: str, baseline: str | None):
    from .modeling import load_quantized_pipeline

    qpipe = load_quantized_pipeline(directory)
    from .reference import PIPELINE_DIR

    base_id = baseline or getattr(_denoiser(qpipe), "gaq_base_model", None) or REFERENCE
    if Path(base_id).resolve() == PIPELINE_DIR.resolve():
        base_id = REFERENCE
    return qpipe, load_pipeline(base_id), base_id


def _save_png(image, path: Path) -> None:
    from .files import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")  # the temporary name ends in .tmp: name the format


def cmd_evaluate(args) -> int:
    from .evaluation import compare, image_grid
    from .files import atomic_write_text

    directory = Path(args.directory)
    if args.baseline:
        _check_model_id(args.baseline)
    qpipe, fp_pipe, base_id = _load_pair(str(directory), args.baseline)
    result = compare(fp_pipe, qpipe, args.num_images, args.num_inference_steps, args.seed, fid=base_id == REFERENCE)
    images = result.pop("images")
    report_dir = Path(args.report or directory / "evaluation")
    report_dir.mkdir(parents=True, exist_ok=True)
    _save_png(image_grid(images["fp"][:64], nrow=8), report_dir / "samples_fp.png")
    _save_png(image_grid(images["quantized"][:64], nrow=8), report_dir / "samples_quantized.png")
    result["baseline"] = base_id
    atomic_write_text(report_dir / "evaluation.json", json.dumps(result, indent=2) + "\n")
    _print_table([("FP", result.get("fid_ref_fp"), None, result["fp_sampling_seconds"]),
                  (_denoiser(qpipe).gaq_config.tag, result.get("fid_ref_quantized"), result["psnr_db"],
                   result["quantized_sampling_seconds"])])
    if args.update_card:
        _denoiser(qpipe).gaq_evaluation = result
        _update_card(qpipe, directory)
    print(f"report: {report_dir}")
    return 0


def _update_card(qpipe, directory: Path) -> None:
    """Rewrite the model card (and its plots) in place, file by file and atomically: saving the
    whole pipeline again would replace the folder, and with it the report just written into it."""
    from .files import atomic_write_bytes
    from .hub import write_model_card
    from .folders import quantized_model_dir

    denoiser_dir = quantized_model_dir(directory)
    card = write_model_card(_denoiser(qpipe), denoiser_dir)
    if denoiser_dir != directory:  # a pipeline keeps a copy of the card and plots at the top
        for item in denoiser_dir.iterdir():
            if item.suffix in (".md", ".png"):
                atomic_write_bytes(directory / item.name, item.read_bytes())
    logger.info("updated the model card %s", card)


def cmd_push(args) -> int:
    from .hub import push_folder

    url = push_folder(args.directory, args.repo_id, private=args.private or None, token=args.token,
                      revision=args.revision, create_pr=args.create_pr, endpoint=args.endpoint,
                      timeout=args.timeout)
    print(f"pushed {args.directory} -> {url}")
    return 0


def cmd_info(args) -> int:
    from .config import CONFIG_NAME
    from .serialization import WEIGHTS_NAME, CheckpointError
    from .weight_bits import checkpoint_weight_bits, precision_groups
    from .folders import quantized_model_dir

    directory = Path(args.directory)
    unet_dir = quantized_model_dir(directory)  # a whole pipeline keeps it in unet/ or transformer/
    qfile = unet_dir / CONFIG_NAME
    if not qfile.is_file():
        raise CheckpointError(f"{qfile} is missing: {directory} is not a diffusers-gaq checkpoint")
    qcfg = json.loads(qfile.read_text())
    layers = qcfg["layers"]
    bits = {}
    for entry in layers.values():
        key = f"W{entry['weight_bits'] or 32}A{entry['act_bits'] or 32}"
        bits[key] = bits.get(key, 0) + 1
    groups = precision_groups(layers, qcfg.get("kept_fp", []))
    storage = checkpoint_weight_bits(unet_dir)
    cfg = qcfg["config"]
    size = (unet_dir / WEIGHTS_NAME).stat().st_size
    print(f"checkpoint:   {directory}")
    print(f"base model:   {qcfg['base_class']}")
    print(f"method:       {cfg['method']} / weighting {cfg['weighting']}")
    print(f"layers:       {len(layers)} quantized ({', '.join(f'{k}: {v}' for k, v in sorted(bits.items()))}), "
          f"{len(qcfg.get('kept_fp', []))} kept FP, {sum(1 for e in layers.values() if e['split_at'])} split inputs, "
          f"{len(qcfg.get('attention', []))} quantized attention")
    print("precision:")
    for tag, names in groups.items():
        shown = ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])}, ..."
        print(f"  {tag:<10} {len(names):>4} layer{'s' if len(names) != 1 else ' '}  {shown}")
    print(f"bits/weight:  {storage.bits_per_weight:.2f} effective ({storage.quantized_weights} quantized weights in "
          f"{storage.packed_bytes / 2**20:.2f} MiB of packed codes, {storage.fp_weights} weights in full precision)")
    print(f"weights file: {size / 2**20:.2f} MiB")
    print(f"activations:  ranges by {cfg.get('act_range_init', 'ema')}" + (
        f", timestep-aware ({len(qcfg['timestep_groups']['timesteps'])} calibrated timesteps in "
        f"{max(qcfg['timestep_groups']['groups']) + 1} groups) for {', '.join(cfg['timestep_aware_acts'])}"
        if qcfg.get("timestep_groups") else ""))
    print(f"calibration:  {cfg['num_calibration_timesteps']} timesteps x {cfg['samples_per_timestep']} samples "
          f"({cfg['timestep_schedule']}), {cfg['recon_iters']} reconstruction / {cfg['meta_iters']} meta iterations, "
          f"seed {cfg['seed']}")
    report = unet_dir / "calibration_report.json"
    if report.is_file():
        summary = json.loads(report.read_text())
        print(f"time:         {summary['calibration_seconds']:.0f}s calibration, {summary['data_seconds']:.0f}s data")
    if args.json:
        print(json.dumps(qcfg, indent=2))
    return 0


def _print_table(rows) -> None:
    print(f"{'model':<10} {'FID-ref':>9} {'PSNR dB':>9} {'sampling s':>11}")
    for name, fid, psnr, seconds in rows:
        fid_s = f"{fid:9.3f}" if fid is not None else f"{'-':>9}"
        psnr_s = f"{psnr:9.2f}" if psnr is not None else f"{'-':>9}"
        print(f"{name:<10} {fid_s} {psnr_s} {seconds:11.1f}")


def cmd_demo(args) -> int:
    """Quantize the reference pipeline (W4A8, demo budget), compare with FP, write the grids."""
    from PIL import Image

    from .config import GradientAlignedQuantizer
    from .evaluation import compare, image_grid
    from .files import atomic_write_text
    from .quantize import quantize_pipeline
    from .reference import load_reference_pipeline
    from .modeling import save_quantized_pipeline

    out = Path(args.output)
    _check_output(out, overwrite=True)  # its files are replaced; other files in the folder stay
    _check_replaceable(out / "pipeline", REFERENCE)
    config = GradientAlignedQuantizer(weight_bits=args.weight_bits, act_bits=_act_bits(args.act_bits),
                                      **BUDGETS[args.budget])
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_reference_pipeline()
    print(f"reference pipeline: UNet2DModel, {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M parameters")
    start = time.perf_counter()
    qpipe = quantize_pipeline(pipe, config, progress=not args.quiet)
    calib = time.perf_counter() - start
    print(f"calibrated {config.tag} ({config.weighting}) in {calib:.0f}s")
    result = compare(pipe, qpipe, args.num_images, args.num_inference_steps, seed=0)
    images = result.pop("images")
    _print_table([("FP", result["fid_ref_fp"], None, result["fp_sampling_seconds"]),
                  (config.tag, result["fid_ref_quantized"], result["psnr_db"], result["quantized_sampling_seconds"])])
    fp_grid, q_grid = image_grid(images["fp"][:64], 8), image_grid(images["quantized"][:64], 8)
    side = Image.new("L", (fp_grid.width * 2 + 8, fp_grid.height), 255)
    side.paste(fp_grid, (0, 0))
    side.paste(q_grid, (fp_grid.width + 8, 0))
    _save_png(side, out / "fp_vs_quantized.png")
    qpipe.unet.gaq_evaluation = result
    save_quantized_pipeline(qpipe, out / "pipeline", overwrite=True)
    atomic_write_text(out / "demo.json", json.dumps({"calibration_seconds": calib, **result}, indent=2) + "\n")
    print(f"wrote {out / 'fp_vs_quantized.png'} (left FP, right {config.tag}) and the checkpoint {out / 'pipeline'}")
    return 0


def cmd_sensitivity(args) -> int:
    """Per-layer damage of quantizing one layer alone; writes sensitivity.json / .md / .png."""
    from .config import GradientAlignedQuantizer
    from .files import atomic_write_text
    from .sensitivity import analyze_sensitivity

    config = GradientAlignedQuantizer(weight_bits=args.weight_bits, act_bits=_act_bits(args.act_bits), seed=args.seed,
                                      device=args.device, **BUDGETS[args.budget])
    if args.top < 1:
        raise CLIError(f"--top must be >= 1, got {args.top}")
    out = Path(args.output)
    _check_output(out, overwrite=True)  # the three files are replaced; other files in the folder stay
    _check_model_id(args.model)
    pipe = load_pipeline(args.model)
    report = analyze_sensitivity(pipe, config, num_images=args.num_images, num_inference_steps=args.steps,
                                 seed=args.seed, images=not args.no_images, progress=not args.quiet)
    report.to_json(out / "sensitivity.json")
    atomic_write_text(out / "sensitivity.md", f"# Per-layer sensitivity {config.tag}\n\n{report.to_markdown()}")
    report.plot(out / "sensitivity.png", top=args.top)
    print(report.to_markdown(top=args.top), end="")
    print(f"{len(report.rows)} rows in {report.settings['seconds']:.0f}s -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-gaq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

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
    q.add_argument("--act-range-init", choices=["ema", "ema_shuffled", "minmax", "percentile", "mse"],
                   help="how activation ranges are initialised over the calibration inputs")
    q.add_argument("--timestep-aware", action="append", metavar="PATTERN",
                   help="layers (fnmatch on module names) whose input activations get one step size per timestep "
                        "group; repeat for several; 'none' turns it off")
    q.add_argument("--act-timestep-groups", type=int, metavar="N",
                   help="timestep groups of --timestep-aware layers (default: one per calibration timestep)")
    q.add_argument("--budget", choices=sorted(BUDGETS), default="default", help="calibration budget preset")
    q.add_argument("--weighting", choices=["gradient_aligned", "uniform"])
    q.add_argument("--method", choices=["reconstruction", "minmax"])
    q.add_argument("--timestep-schedule", choices=["uniform", "normal"])
    q.add_argument("--recon-iters", type=int)
    q.add_argument("--meta-iters", type=int)
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
    q.add_argument("--seed", type=int)
    q.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    q.add_argument("--overwrite", action="store_true", help="replace an output folder that holds an earlier "
                   "quantized pipeline (and nothing else: a folder with other files or the input model is refused)")
    q.add_argument("--checkpoint-dir", help="save the calibration state here after the data and after every "
                   "unit, so that --resume can continue an interrupted run")
    q.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir (same settings and model; "
                   "the result is bit-identical to an uninterrupted run); starts afresh if it holds no checkpoint")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("evaluate", help="fidelity of a quantized pipeline against its FP baseline")
    e.add_argument("directory")
    e.add_argument("--baseline", help="FP pipeline: 'reference', a folder or a Hub id (default: the base model)")
    e.add_argument("--num-images", type=int, default=256)
    e.add_argument("--num-inference-steps", type=int, default=50)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--report", help="report folder (default DIRECTORY/evaluation)")
    e.add_argument("--update-card", action="store_true", help="write the measured fidelity into the model card")
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("push", help="upload a quantized pipeline folder to the Hub")
    p.add_argument("directory")
    p.add_argument("repo_id")
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
    p.set_defaults(func=cmd_push)

    i = sub.add_parser("info", help="what is inside a quantized checkpoint")
    i.add_argument("directory")
    i.add_argument("--json", action="store_true", help="also print quantization_config.json")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="quantize the embedded reference pipeline and compare with FP")
    d.add_argument("--output", default="out/demo")
    d.add_argument("--weight-bits", type=int, default=4)
    d.add_argument("--act-bits", type=int, default=8)
    d.add_argument("--budget", choices=sorted(BUDGETS), default="demo")
    d.add_argument("--num-images", type=int, default=256)
    d.add_argument("--num-inference-steps", type=int, default=50)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sensitivity", help="per-layer damage when only that layer is quantized")
    s.add_argument("model", help="'reference', a local pipeline folder, or a Hub id")
    s.add_argument("--output", required=True, help="folder for sensitivity.json, sensitivity.md, sensitivity.png")
    s.add_argument("--weight-bits", type=int, default=4, help="2-8 (default 4)")
    s.add_argument("--act-bits", type=int, default=8, help="4-16, or 0 for weight rows only (default 8)")
    s.add_argument("--num-images", type=int, default=16, help="DDIM images per row (default 16)")
    s.add_argument("--steps", type=int, default=10, help="DDIM steps of the images and calibration (default 10)")
    s.add_argument("--no-images", action="store_true", help="noise-prediction error only (much faster)")
    s.add_argument("--top", type=int, default=20, help="layers in the printed table and the plot (default 20)")
    s.add_argument("--budget", choices=["tiny", "demo"], default="tiny", help="calibration data budget")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_sensitivity)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .runtime import setup_logging

    setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users, the traceback with --verbose
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
