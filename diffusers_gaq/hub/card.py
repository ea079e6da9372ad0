"""The model card of a quantized checkpoint: a ``huggingface_hub.ModelCard`` rendered from the
package's template (templates/model_card.md, Jinja; the values are prepared here so that the
template stays prose), written as README.md with its plots into the checkpoint folder."""

from __future__ import annotations

import logging
import os
import re
import statistics
from importlib.resources import files
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .. import plots
from ..config import parse_precision
from ..files import atomic_write_bytes, atomic_write_text
from ..models import family_for
from ..serialization import layer_table
from ..weight_bits import format_allocation, format_precision_groups, model_weight_bits, precision_groups
from .repo import is_hub_id, public_base_model

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
SAMPLE_WEIGHTS_PNG = "sample_weights.png"
COMPARISON_PNG = "fp_vs_quantized.png"  # written beside the card by `diffusers-gaq evaluate --update-card`
CONFLICT_PNG = "gradient_conflict.png"
PAPER_ARXIV = "2602.01289"
# Stands for the repo id in a card written before the repo is known (a plain save_pretrained);
# push_folder puts the real id into the card it uploads.
REPO_ID_PLACEHOLDER = "your-username/your-quantized-model"


def _template() -> str:
    return files("diffusers_gaq").joinpath("templates", "model_card.md").read_text(encoding="utf-8")


def _quant_class_import(class_name: str = "QuantizedUNet2DModel") -> str:
    # Every Quantized* class is re-exported by the package (tests/test_families.py checks it).
    return f"from diffusers_gaq import {class_name}"


def _model_kind(model) -> tuple[str, str]:
    """(what the card calls the model, the pipeline component that holds it)."""
    component = family_for(model).component
    return ("UNet" if component == "unet" else "transformer"), component


def _bits_rows(model) -> list[dict]:
    """One row per precision tag (w4a8, w8, a8, fp, ...), the largest group first: layer count (with
    the names when few), and the weights' stored size against fp32."""
    kept = list(model.gaq_wrap.kept_fp) if model.gaq_wrap else []
    rows = []
    for tag, names in precision_groups(layer_table(model), kept).items():
        w, a = parse_precision(tag)
        weights = [model.get_submodule(n).weight for n in names]
        numel = sum(t.numel() for t in weights)
        stored_bits = sum(t.numel() * (w or t.element_size() * 8) for t in weights)
        rows.append({"precision": tag, "weights": f"{w}-bit" if w else "FP",
                     "acts": f"{a}-bit" if a else ("FP (weight-only)" if w else "FP"), "layers": len(names),
                     "names": ", ".join(f"`{n}`" for n in names) if len(names) <= 4 else "",
                     "packed_mb": stored_bits / 8 / 1e6, "fp32_mb": numel * 4 / 1e6})
    return rows


def _precision_summary(model) -> str:
    kept = list(model.gaq_wrap.kept_fp) if model.gaq_wrap else []
    return format_precision_groups(precision_groups(layer_table(model), kept))


def _calibration_rows(config) -> list[tuple[str, str]]:
    method = {"reconstruction": "AdaRound + block reconstruction (Q-Diffusion)",
              "minmax": "round-to-nearest, min-max/MSE ranges (no reconstruction)"}[config.method]
    weighting = {"gradient_aligned": "gradient-aligned (meta-learned)", "uniform": "uniform"}[config.weighting]
    weight_symmetry = "symmetric" if config.weight_symmetric else "asymmetric"
    rows = [
        ("method", method),
        ("sample weighting", weighting),
        ("calibration timesteps", f"{config.num_calibration_timesteps} of {config.num_inference_steps} DDIM steps"),
        ("samples per timestep", str(config.samples_per_timestep)),
        ("timestep schedule", config.timestep_schedule),
        ("held-out validation fraction", f"{config.val_fraction:g} per timestep"),
        ("weight quantizer", f"{config.weight_granularity}, {weight_symmetry}, {config.weight_init} init"),
    ]
    if config.quantizes_activations:  # globally or by a per-layer tag
        init = {"ema": f"EMA of min/max in timestep order (momentum {config.act_ema_momentum})",
                "ema_shuffled": f"EMA of min/max over shuffled batches (momentum {config.act_ema_momentum})",
                "minmax": "min/max over the calibration set", "percentile": "0.01 / 99.99 percentiles",
                "mse": "MSE-searched clipping range"}[config.act_range_init]
        act = (f"{'symmetric' if config.act_symmetric else 'asymmetric'}, range init: {init}"
               + (", learned step (LSQ)" if config.learn_act_scale else ""))
        rows.append(("activation quantizer", act))
        if config.timestep_aware_acts:
            rows.append(("timestep-aware activations", f"{config.num_act_timestep_groups} step sizes (timestep "
                         f"groups) for layers matching {', '.join(f'`{p}`' for p in config.timestep_aware_acts)}"))
    if config.method == "reconstruction":
        rows.append(("reconstruction iterations", f"{config.recon_iters} per block (batch {config.recon_batch_size})"))
    if config.method == "reconstruction" and config.weighting == "gradient_aligned":
        rows += [
            ("meta iterations", f"{config.meta_iters} per block (batch {config.meta_batch_size})"),
            ("timestep groups T", str(config.num_groups)),
            ("softmax temperature tau", f"{config.tau:g}"),
        ]
    rows.append(("seed", str(config.seed)))
    return rows


_EVAL_LABELS = {
    "fid_ref_fp": "FID-ref, full-precision model",
    "fid_ref_quantized": "FID-ref, quantized model",
    "psnr_db": "PSNR vs full-precision samples (dB)",
    "mse": "MSE vs full-precision samples",
    "ssim": "SSIM vs full-precision samples",
    "seconds_per_image_fp": "seconds per image, full-precision model",
    "seconds_per_image_quantized": "seconds per image, quantized model",
    "num_images": "images",
    "num_inference_steps": "DDIM steps",
}


def _evaluation_rows(evaluation: dict | None) -> list[tuple[str, str]]:
    if not evaluation:
        return []
    rows = []
    for key, value in evaluation.items():
        if key == "how" or isinstance(value, (dict, list)):
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        if key == "baseline":  # `evaluate --baseline` may have been given a local path
            text = public_base_model(value) or text
        rows.append((_EVAL_LABELS.get(key, key), text))
    return rows


def _report_summary(report, config) -> dict | None:
    if report is None or not report.units:
        return None
    ratios = []
    if config.method == "reconstruction":  # round-to-nearest has nothing to compare with
        ratios = [u.loss_final / u.loss_init for u in report.units if u.loss_init and u.loss_init > 0]
    return {
        "units": len(report.units),
        "median_loss_ratio": statistics.median(ratios) if ratios else None,
        "seconds": report.calibration_seconds + report.data_seconds,
    }


def _plots_for(report) -> dict[str, bool]:
    """Which plots a report supports; the card and write_model_card use the same rule."""
    # Uniform weights draw as flat lines: a picture of nothing, so the card shows none.
    has_weights = bool(report is not None and report.train_timesteps is not None
                       and any(u.omega is not None and bool((u.omega != u.omega.reshape(-1)[0]).any())
                               for u in report.units))
    has_conflict = bool(report is not None and any(u.conflict_before is not None or u.conflict_after is not None
                                                   for u in report.units))
    return {SAMPLE_WEIGHTS_PNG: has_weights, CONFLICT_PNG: has_conflict}




# How activation ranges are initialised, as the card's prose says it (config.act_range_init).
_ACT_RANGE_PROSE = {
    "ema": "an exponential moving average (in timestep order) of the minima and maxima",
    "ema_shuffled": "an exponential moving average (over shuffled batches) of the minima and maxima",
    "minmax": "the minima and maxima", "percentile": "the 0.01 / 99.99 percentiles",
    "mse": "the clipping range with the least squared quantization error",
}


def _intro(config, base_model: str | None, act_bits_text: str) -> str:
    base = f"[`{base_model}`](https://huggingface.co/{base_model})" if is_hub_id(base_model) else (
        f"`{base_model}`" if base_model else "a diffusers UNet")
    return (f"{config.tag.upper()} post-training quantization of {base}: {config.weight_bits}-bit weights and "
            f"{act_bits_text}, made with diffusers-gaq using "
            f"{'gradient-aligned' if config.weighting == 'gradient_aligned' else 'uniformly weighted'} calibration.")


def build_model_card(model, base_model: str | None = None, license: str | None = None, *,
                     repo_id: str | None = None):
    """The model card of a quantized model as a ``huggingface_hub.ModelCard``.

    ``base_model`` defaults to ``model.gaq_base_model``; the card names it as public_base_model
    gives it (a Hub id, or only a local folder's name, never its path) and puts it into the
    metadata only when it is a "namespace/name" Hub id. ``repo_id`` is used in the usage snippet;
    without it a placeholder stands there, which push_folder replaces."""
    config = model.gaq_config
    if config is None:
        raise ValueError("the model carries no gaq_config; build cards for models from quantize_pipeline() "
                         "or QuantizedUNet2DModel.from_pretrained()")
    base_model = public_base_model(base_model or getattr(model, "gaq_base_model", None))
    gradient_aligned = config.method == "reconstruction" and config.weighting == "gradient_aligned"
    tags = ["quantization", "diffusers-gaq", config.tag, "diffusers"]
    if gradient_aligned:
        tags.append("gradient-aligned-calibration")
    model_kind, component = _model_kind(model)
    conditional = component == "transformer" or bool(getattr(model.config, "num_class_embeds", None)) \
        or getattr(model.config, "class_embed_type", None) is not None
    pipeline_tag = ("text-to-image" if hasattr(model.config, "cross_attention_dim") else
                    None if conditional else "unconditional-image-generation")
    card_data = ModelCardData(base_model=base_model if is_hub_id(base_model) else None, library_name="diffusers",
                              tags=tags, license=license, pipeline_tag=pipeline_tag)
    wrap = model.gaq_wrap
    plots = _plots_for(model.gaq_report)
    evaluation = getattr(model, "gaq_evaluation", None) or None
    act_bits_text = f"{config.act_bits}-bit activations" if config.act_bits else "full-precision activations"
    if is_hub_id(base_model):
        scheduler_line = f'scheduler = DDIMScheduler.from_pretrained("{base_model}", subfolder="scheduler")'
    else:
        scheduler_line = ("scheduler = DDIMScheduler()  # 1000 linear-beta steps; "
                          "use your base model's scheduler config if it differs")
    quant_class = type(model).__name__ if type(model).__name__.startswith("Quantized") else "QuantizedUNet2DModel"
    # The DDIM snippet fits unconditional UNet2DModels; other models plug into their own pipeline.
    ddim_usage = model_kind == "UNet" and not conditional and not hasattr(model.config, "cross_attention_dim")
    card = ModelCard.from_template(
        card_data,
        template_str=_template(),
        title=f"{base_model.rstrip('/').split('/')[-1] if base_model else model_kind} quantized to {config.tag.upper()} "
              f"with diffusers-gaq",
        intro=_intro(config, base_model, act_bits_text),
        gradient_aligned=gradient_aligned,
        reconstruction=config.method == "reconstruction",
        act_bits=config.act_bits,
        act_range_prose=_ACT_RANGE_PROSE[config.act_range_init],
        learn_act_scale=config.learn_act_scale,
        granularity=config.weight_granularity.replace("_", "-"),
        arxiv=PAPER_ARXIV,
        bits_rows=_bits_rows(model),
        precision_summary=_precision_summary(model),
        weight_bits=model_weight_bits(model),
        allocation=format_allocation(config.average_weight_bits, config.allocated_layers, config.layer_precision,
                                     model_weight_bits(model)),
        weight_bits_default=config.weight_bits,
        attention=list(wrap.attention) if wrap and config.quantize_attention else [],
        split_layers=len(wrap.split_layers) if wrap else 0,
        kept_fp=list(wrap.kept_fp) if wrap else [],
        calibration_rows=_calibration_rows(config),
        summary=_report_summary(model.gaq_report, config),
        fallback_units=[u for u in model.gaq_report.units if u.fallback] if model.gaq_report else [],
        evaluation_rows=_evaluation_rows(evaluation),
        evaluation_how=(evaluation or {}).get("how"),
        comparison_png=COMPARISON_PNG if (evaluation or {}).get("image") else None,
        baseline_example=base_model or "google/ddpm-cifar10-32",
        sample_weights_png=SAMPLE_WEIGHTS_PNG if plots[SAMPLE_WEIGHTS_PNG] else None,
        conflict_png=CONFLICT_PNG if plots[CONFLICT_PNG] else None,
        import_line=_quant_class_import(quant_class),
        quant_class=quant_class,
        model_kind=model_kind,
        component=component,
        ddim_usage=ddim_usage,
        base_pipeline=base_model or "path/to/the-base-pipeline",
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        scheduler_line=scheduler_line,
    )
    # Optional template sections leave runs of blank lines behind; markdown needs at most one.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))


def write_model_card(model, folder: str | os.PathLike, *, repo_id: str | None = None, base_model: str | None = None,
                     license: str | None = None) -> Path:
    """Write README.md, and the plots its report supports, into ``folder``; return README's path.

    A plot that fails to render is logged and left out of the card rather than failing the save:
    the checkpoint matters more than its pictures."""
    folder = Path(folder)
    report = model.gaq_report
    wanted = _plots_for(report)
    drawers = {SAMPLE_WEIGHTS_PNG: plots.plot_sample_weights, CONFLICT_PNG: plots.plot_conflict}
    failed = []
    for name, draw in drawers.items():
        if wanted[name]:
            try:
                draw(report, folder / name)
            except Exception:  # noqa: BLE001 - any plotting failure must not lose the checkpoint
                logger.warning("could not draw %s; the model card goes without it", name, exc_info=True)
                failed.append(name)
    card = build_model_card(model, base_model=base_model, license=license, repo_id=repo_id)
    text = str(card)
    for name in failed:  # drop the image links of plots that failed
        text = "\n".join(line for line in text.splitlines() if f"]({name})" not in line) + "\n"
    path = folder / CARD_NAME
    atomic_write_text(path, text)
    return path


# A pipeline's card sits at its top too, where the pipeline snippet names the pipeline itself: the
# placeholder push fills with the repo id.
PIPELINE_PLACEHOLDER_LINE = '.from_pretrained("path/to/saved-pipeline")  # a saved pipeline\'s folder or repo id'
PIPELINE_REPO_LINE = f'.from_pretrained("{REPO_ID_PLACEHOLDER}")  # this repo\'s id, or a local copy of it'


def card_for_pipeline_top(text: str) -> str:
    return text.replace(PIPELINE_PLACEHOLDER_LINE, PIPELINE_REPO_LINE)


def copy_card_to_pipeline_top(component_dir: Path, top: Path) -> None:
    """A saved pipeline keeps a copy of its quantized component's card and plots at its top, file by
    file and atomically (a save does it in its temporary folder, a card update in place)."""
    for item in component_dir.iterdir():
        if item.suffix == ".png":
            atomic_write_bytes(top / item.name, item.read_bytes())
    text = (component_dir / CARD_NAME).read_text(encoding="utf-8")
    atomic_write_text(top / CARD_NAME, card_for_pipeline_top(text))


# The usage snippet's repo id: `...from_pretrained("ID")  # this repo's id, ...` (see templates/model_card.md).
_USAGE_REPO_ID = re.compile(r'(\.from_pretrained\(")[^"\n]*("\)  # this repo\'s id)')


def card_for_repo(text: str, repo_id: str) -> str:
    """The card ``text`` with ``repo_id`` in its usage snippet: the placeholder of a card written
    before the repo was known, and the id of an earlier push to another repo, are both replaced."""
    text = text.replace(f'"{REPO_ID_PLACEHOLDER}"', f'"{repo_id}"')
    return _USAGE_REPO_ID.sub(lambda m: m.group(1) + repo_id + m.group(2), text)
