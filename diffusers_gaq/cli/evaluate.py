"""`diffusers-gaq evaluate`: quantized pipelines against their FP pipeline, from the same noise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import common
from .common import REFERENCE, CLIError, _base_id, _check_model_id, _denoiser, check_quantized

logger = logging.getLogger("diffusers_gaq")

def cmd_evaluate(args) -> int:
    """Every quantized folder against one FP pipeline, from the same noise: one table, one grid."""
    from ..evaluation.report import compare_pipelines
    from ..evaluation.sampling import SamplingPlan
    from ..files import check_writable_location
    from ..folders import quantized_model_dir
    from ..modeling import load_quantized_pipeline
    from ..serialization import WEIGHTS_NAME

    directories = [Path(d) for d in args.directory]
    for directory in directories:
        check_quantized(directory)
    if len(directories) > 1 and not args.report:
        raise CLIError(f"{len(directories)} folders give one comparison: pass --report FOLDER for its table and grid")
    if args.baseline:
        _check_model_id(args.baseline)
    report_dir = Path(args.report or directories[0] / "evaluation")
    if report_dir.exists() and not report_dir.is_dir():
        raise CLIError(f"--report {report_dir} is a file; name a folder for the report (new, or one to update)")
    check_writable_location(report_dir)
    quantized, sizes, calibration, bases = {}, {}, {}, {}
    for directory in directories:
        name = directory.name if [d.name for d in directories].count(directory.name) == 1 else str(directory)
        qpipe = quantized[name] = load_quantized_pipeline(str(directory), runtime=args.runtime)
        model_dir = quantized_model_dir(directory)
        sizes[name] = (model_dir / WEIGHTS_NAME).stat().st_size / 2**20
        report = model_dir / "calibration_report.json"
        if report.is_file():
            summary = json.loads(report.read_text())
            calibration[name] = summary.get("calibration_seconds", 0.0) + summary.get("data_seconds", 0.0)
        bases[name] = _base_id(_denoiser(qpipe))
    if not args.baseline and len(set(bases.values())) > 1:
        raise CLIError(f"the folders come from different base models ({', '.join(f'{k}: {v}' for k, v in bases.items())}); "
                       "compare folders of one model, or name the FP pipeline with --baseline")
    base_id = args.baseline or next(iter(bases.values()))
    plan = SamplingPlan(num_images=args.num_images, num_inference_steps=args.num_inference_steps, seed=args.seed,
                        class_labels=args.class_labels or [], prompts=args.prompt or [],
                        guidance_scale=args.guidance_scale)
    result = compare_pipelines(common.load_pipeline(base_id), quantized, plan, baseline=base_id, fid=base_id == REFERENCE,
                               weights_mib=sizes, calibration_seconds=calibration, progress=not args.quiet)
    result.write(report_dir)
    print(result.to_markdown(), end="")
    if args.update_card:
        for directory, row in zip(directories, result.rows):
            # The card describes the saved model: written from its simulated form, which holds the layer table.
            qpipe = load_quantized_pipeline(str(directory), runtime="simulated")
            _denoiser(qpipe).gaq_evaluation = dict(result.card_entry(row), image=True)
            _update_card(qpipe, directory, report_dir / "comparison.png")
    print(f"report: {report_dir} (evaluation.md, evaluation.json, comparison.png: one row per model, FP first)")
    return 0


def _update_card(qpipe, directory: Path, comparison: Path) -> None:
    """Rewrite the model card (and its plots, and the FP vs quantized picture of this evaluation) in
    place, file by file and atomically: saving the whole pipeline again would replace the folder, and
    with it the report just written into it."""
    from ..files import atomic_write_bytes
    from ..folders import quantized_model_dir
    from ..hub import COMPARISON_PNG, copy_card_to_pipeline_top, write_model_card

    denoiser_dir = quantized_model_dir(directory)
    atomic_write_bytes(denoiser_dir / COMPARISON_PNG, comparison.read_bytes())
    card = write_model_card(_denoiser(qpipe), denoiser_dir)
    if denoiser_dir != directory:
        copy_card_to_pipeline_top(denoiser_dir, directory)
    logger.info("updated the model card %s", card)
