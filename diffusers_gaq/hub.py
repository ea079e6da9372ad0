"""Model cards and Hub uploads for quantized checkpoints.

The card is a ``huggingface_hub.ModelCard`` rendered from this module's own template; it is
written as README.md (with its plots) into the checkpoint folder, and a staging copy of the folder
(links, plus the card and configs rewritten for the target repo, with no local path) goes to the
Hub with ``HfApi.upload_folder``, each request under a timeout (docs/reliability.md, issue 14). ``ModelCard.push_to_hub`` is not used: it validates the card
against a hard-coded huggingface.co address, which fails behind mirrors, on private endpoints
and offline (DESIGN.md section 8).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import tempfile
from pathlib import Path

from .config import CONFIG_NAME
from .utils import atomic_write_text

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
SAMPLE_WEIGHTS_PNG = "sample_weights.png"
CONFLICT_PNG = "gradient_conflict.png"
PAPER_ARXIV = "2602.01289"
DEFAULT_COMMIT_MESSAGE = "Upload diffusers-gaq quantized model"
# Stands for the repo id in a card written before the repo is known (a plain save_pretrained);
# push_folder puts the real id into the card it uploads.
REPO_ID_PLACEHOLDER = "your-username/your-quantized-model"
_EXAMPLE_REPO_ID = "my-username/ddpm-cifar10-w4a8"
# huggingface_hub's shared client has no timeout: a server that accepts the connection and never
# answers would hold a push forever. Seconds per request (connect, each read, each write).
DEFAULT_PUSH_TIMEOUT = 60.0
PUSH_TIMEOUT_ENV = "DIFFUSERS_GAQ_PUSH_TIMEOUT"
# What the embedded reference pipeline is recorded as (the CLI's name for it), not its install path.
REFERENCE_BASE_MODEL = "reference"


class HubPushError(RuntimeError):
    """An upload to the Hub failed; the local checkpoint folder is untouched.

    ``status_code`` is the HTTP status when the server answered, else None."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


# ---- repo ids ---------------------------------------------------------------------------------
def check_repo_id(repo_id) -> str:
    """Return ``repo_id`` if huggingface_hub accepts it as "name" or "namespace/name", else
    raise ValueError saying what is wrong and showing a valid id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected a non-empty string such as {_EXAMPLE_REPO_ID!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).replace(" Use `repo_type` argument if needed.", "")  # not an option here
        raise ValueError(f"invalid Hub repo id {repo_id!r}: {reason} A valid id looks like {_EXAMPLE_REPO_ID!r} "
                         "(namespace/name, letters, digits, '-', '_' and '.').") from None
    return repo_id


def _is_repo_id(value: str | None) -> bool:
    try:
        return bool(value) and check_repo_id(value) == value and not Path(value).exists()
    except ValueError:
        return False


def _is_hub_id(value: str | None) -> bool:
    """A base model the card may link to and name in its metadata: "namespace/name" only, since a
    local folder's recorded name ("my-model") looks like a namespace-less Hub id."""
    return bool(value) and "/" in value and _is_repo_id(value)


# A file of the huggingface_hub cache: .../models--namespace--name/snapshots/<sha>/...
_HF_CACHE_SNAPSHOT = re.compile(r"(?:^|[\\/])models--(?P<repo>[^\\/]+)[\\/]snapshots(?:[\\/]|$)")


def _is_reference_pipeline(path: Path) -> bool:
    from .reference import PIPELINE_DIR

    try:
        return path.resolve() == PIPELINE_DIR.resolve()
    except OSError:
        return False


def public_base_model(name_or_path) -> str | None:
    """What may be published about where a base model came from: the Hub id when it came from the
    Hub (also when it was read from the huggingface_hub cache), ``"reference"`` for the embedded
    reference pipeline, else only the folder's name.

    The model card and quantization_config.json are uploaded by a push; an absolute path there
    would publish the user's directory layout (user name, project names)."""
    if not name_or_path:
        return None
    text = str(name_or_path).strip()
    cached = _HF_CACHE_SNAPSHOT.search(text)
    if cached:
        return cached.group("repo").replace("--", "/")  # repo ids never contain "--"
    local = Path(text).expanduser()
    if _is_reference_pipeline(local):
        return REFERENCE_BASE_MODEL
    if local.exists():
        return local.resolve().name or text
    if _is_repo_id(text):
        return text
    # A path that no longer exists (an older checkpoint): its last part, on any OS's separators.
    return re.split(r"[\\/]", text.rstrip("\\/"))[-1] or None


# ---- what the card says -----------------------------------------------------------------------
def _quant_class_import(class_name: str = "QuantizedUNet2DModel") -> str:
    # The short import needs the package to re-export the class; fall back to its home module.
    import diffusers_gaq

    if hasattr(diffusers_gaq, class_name):
        return f"from diffusers_gaq import {class_name}"
    return f"from diffusers_gaq.models.quantized import {class_name}"


def _model_kind(model) -> tuple[str, str]:
    """(what the card calls the model, the pipeline component that holds it)."""
    from .models import family_for

    component = family_for(model).component
    return ("UNet" if component == "unet" else "transformer"), component


def _bits_rows(model) -> list[dict]:
    """One row per precision tag (w4a8, w8, a8, fp, ...), the largest group first: layer count (with
    the names when few), and the weights' stored size against fp32."""
    from .config import parse_precision
    from .serialization import layer_table, precision_groups

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
    from .serialization import format_precision_groups, layer_table, precision_groups

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
    has_weights = bool(report is not None and report.train_timesteps is not None
                       and any(u.omega is not None for u in report.units))
    has_conflict = bool(report is not None and any(u.conflict_before is not None or u.conflict_after is not None
                                                   for u in report.units))
    return {SAMPLE_WEIGHTS_PNG: has_weights, CONFLICT_PNG: has_conflict}


# The card body. Jinja; the values are prepared in build_model_card so the template stays prose.
_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ intro }}

## Method

The {{ model_kind }} was quantized after training, without fine-tuning.
{%- if reconstruction %} The recipe follows Q-Diffusion: calibration inputs are
taken from the full-precision model's own DDIM sampling trajectory, and the network is rebuilt
block by block so that each quantized block reproduces the output of its full-precision
counterpart. Weight rounding is learned with AdaRound (a per-weight choice between rounding down
and up)
{%- if act_bits %}; activation ranges start from an exponential moving average of the observed
minima and maxima and their step sizes are then learned (LSQ){% endif %}.
{% else %} Weights are rounded to the nearest level of {{ granularity }} ranges (MSE or
min-max search){% if act_bits %} and activation ranges come from an exponential moving average of the
minima and maxima observed on calibration inputs from the model's own DDIM trajectory{% endif %};
nothing is reconstructed (the naive post-training baseline).
{% endif %}
{% if gradient_aligned %}
On top of this recipe, **gradient-aligned calibration** ([arXiv:{{ arxiv }}](https://arxiv.org/abs/{{ arxiv }}))
weights every calibration sample. Samples from different timesteps pull the reconstruction in
different, sometimes opposite directions; the weights are meta-learned so that one step on the
weighted loss also lowers the loss of held-out samples from every group of timesteps, which turns
those conflicting gradients into aligned ones.
{% elif reconstruction %}
Calibration samples were weighted uniformly for this checkpoint (plain Q-Diffusion, no
gradient-aligned weighting).
{% endif %}
## Bit widths

| precision | weights | activations | layers | stored weights | fp32 weights |
|---|---|---|---|---|---|
{% for r in bits_rows -%}
| {{ r.precision }} | {{ r.weights }} | {{ r.acts }} | {{ r.layers }}{% if r.names %} ({{ r.names }}){% endif %} | {{ "%.2f"|format(r.packed_mb) }} MB | {{ "%.2f"|format(r.fp32_mb) }} MB |
{% endfor %}
Layers by precision: {{ precision_summary }}.
Effective bits per weight: **{{ "%.2f"|format(weight_bits.bits_per_weight) }}** over every Conv2d / Linear weight
({{ weight_bits.quantized_weights }} quantized weights in {{ "%.3f"|format(weight_bits.packed_bytes / 1e6) }} MB of packed codes,
{{ weight_bits.fp_weights }} full-precision weights counted at their dtype's width).

{% if attention %}Attention matmuls (queries, keys, values and softmax probabilities) are quantized in {{ attention|length }} attention block(s).
{% endif -%}
{% if split_layers %}Inputs that concatenate a skip connection have separate quantizers for each half ({{ split_layers }} layers).
{% endif -%}
{% if kept_fp %}Kept in full precision: {% for name in kept_fp %}`{{ name }}`{{ ", " if not loop.last }}{% endfor %}.
{% else %}No layer was kept in full precision.
{% endif %}
Weights are stored as densely packed integer codes (two codes per byte at 4 bits) with their
scales and zero points; the forward pass dequantizes them ("fake" quantization), so the model
computes in floating point and is smaller on disk, not faster.

## Calibration

| setting | value |
|---|---|
{% for k, v in calibration_rows -%}
| {{ k }} | {{ v }} |
{% endfor %}
{% if summary %}
{{ summary.units }} units were calibrated in {{ "%.0f"|format(summary.seconds) }} s
{%- if summary.median_loss_ratio is not none %}; the median unit's reconstruction loss went to {{ "%.0f"|format(100 * summary.median_loss_ratio) }} % of its round-to-nearest value{% endif %}.
{% endif %}
{% if fallback_units %}Reconstruction diverged for {{ fallback_units|length }} unit(s), which kept round-to-nearest weights: {% for u in fallback_units %}`{{ u.name }}` ({{ u.fallback }}){{ ", " if not loop.last }}{% endfor %}.
{% endif %}
## Fidelity

{% if evaluation_rows -%}
Measured against the full-precision model under the same seeds{% if evaluation_how %} ({{ evaluation_how }}){% endif %}:

| metric | value |
|---|---|
{% for k, v in evaluation_rows -%}
| {{ k }} | {{ v }} |
{% endfor %}
{% else -%}
No fidelity evaluation was run for this checkpoint. To measure it against the full-precision
model, run `diffusers-gaq evaluate DIR --baseline MODEL`, where DIR is this checkpoint folder and
MODEL the full-precision pipeline (for example `{{ baseline_example }}`).
{% endif %}
{% if sample_weights_png %}
## Calibration sample weights

![Calibration sample weight by timestep]({{ sample_weights_png }})

Mean weight of the calibration samples at each timestep (band: smallest to largest), per block;
the dashed line is uniform weighting{% if not gradient_aligned %}, which this checkpoint used
throughout{% endif %}.
{% endif %}
{% if conflict_png %}
## Gradient conflict across timesteps

![Cosine similarity of timestep-group gradients]({{ conflict_png }})

Cosine similarity between the reconstruction gradients of timestep groups, with uniform and with
learned weights; negative (blue) cells are groups that pull in opposite directions.
{% endif %}
## Usage

Install `diffusers-gaq`, then load the quantized {{ model_kind }} and plug it into a pipeline:
{% if ddim_usage %}
```python
import torch
from diffusers import DDIMPipeline, DDIMScheduler
{{ import_line }}

unet = QuantizedUNet2DModel.from_pretrained("{{ repo_id }}")  # this repo's id, or a local copy of it
{{ scheduler_line }}
pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
images = pipe(batch_size=4, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images
```
{% else %}
```python
from diffusers import DiffusionPipeline
{{ import_line }}

{{ component }} = {{ quant_class }}.from_pretrained("{{ repo_id }}")  # this repo's id, or a local copy of it
pipe = DiffusionPipeline.from_pretrained("{{ base_pipeline }}", {{ component }}={{ component }})
```
{% endif %}
A whole pipeline saved with `qpipe.save_pretrained(path)` loads through diffusers' own loader: its
`model_index.json` names `diffusers_gaq.models.quantized.{{ quant_class }}`. Diffusers does not
import modules a repository names, so import `diffusers_gaq` first:

```python
import diffusers
import diffusers_gaq  # noqa: F401 - makes {{ quant_class }} known to diffusers' loader

pipe = diffusers.DiffusionPipeline.from_pretrained("path/to/saved-pipeline")
```

## Files

- `config.json`: the base {{ model_kind }}'s diffusers config
- `quantization_config.json`: quantization settings and per-layer bit widths
- `diffusion_pytorch_model.safetensors`: packed integer weights, scales, zero points, activation step sizes
- `calibration_report.safetensors` / `.json`: learned sample weights and per-block losses

## References

- Gradient-aligned calibration: Hoang et al., [arXiv:{{ arxiv }}](https://arxiv.org/abs/{{ arxiv }}).
- Q-Diffusion: Li et al., [arXiv:2302.04304](https://arxiv.org/abs/2302.04304).
"""


def _intro(config, base_model: str | None, act_bits_text: str) -> str:
    base = f"[`{base_model}`](https://huggingface.co/{base_model})" if _is_hub_id(base_model) else (
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
    from huggingface_hub import ModelCard, ModelCardData

    from .serialization import model_weight_bits

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
    card_data = ModelCardData(base_model=base_model if _is_hub_id(base_model) else None, library_name="diffusers",
                              tags=tags, license=license, pipeline_tag=pipeline_tag)
    wrap = model.gaq_wrap
    plots = _plots_for(model.gaq_report)
    evaluation = getattr(model, "gaq_evaluation", None) or None
    act_bits_text = f"{config.act_bits}-bit activations" if config.act_bits else "full-precision activations"
    if _is_hub_id(base_model):
        scheduler_line = f'scheduler = DDIMScheduler.from_pretrained("{base_model}", subfolder="scheduler")'
    else:
        scheduler_line = ("scheduler = DDIMScheduler()  # 1000 linear-beta steps; "
                          "use your base model's scheduler config if it differs")
    quant_class = type(model).__name__ if type(model).__name__.startswith("Quantized") else "QuantizedUNet2DModel"
    # The DDIM snippet fits unconditional UNet2DModels; other models plug into their own pipeline.
    ddim_usage = model_kind == "UNet" and not conditional and not hasattr(model.config, "cross_attention_dim")
    card = ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        title=f"{base_model.rstrip('/').split('/')[-1] if base_model else model_kind} quantized to {config.tag.upper()} "
              f"with diffusers-gaq",
        intro=_intro(config, base_model, act_bits_text),
        gradient_aligned=gradient_aligned,
        reconstruction=config.method == "reconstruction",
        act_bits=config.act_bits,
        granularity=config.weight_granularity.replace("_", "-"),
        arxiv=PAPER_ARXIV,
        bits_rows=_bits_rows(model),
        precision_summary=_precision_summary(model),
        weight_bits=model_weight_bits(model),
        attention=list(wrap.attention) if wrap and config.quantize_attention else [],
        split_layers=len(wrap.split_layers) if wrap else 0,
        kept_fp=list(wrap.kept_fp) if wrap else [],
        calibration_rows=_calibration_rows(config),
        summary=_report_summary(model.gaq_report, config),
        fallback_units=[u for u in model.gaq_report.units if u.fallback] if model.gaq_report else [],
        evaluation_rows=_evaluation_rows(evaluation),
        evaluation_how=(evaluation or {}).get("how"),
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
    from . import plots

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


# ---- checks before a push ----------------------------------------------------------------------
def _check_checkpoint_folder(folder: Path) -> None:
    from .serialization import CheckpointError, quantized_model_dir

    # A whole saved pipeline (model_index.json, unet/ or transformer/...) is a checkpoint too: its
    # quantized denoiser holds the config.
    qcfg = quantized_model_dir(folder) / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass a diffusers-gaq checkpoint folder "
                              f"(made by save_pretrained, holding {CONFIG_NAME})")
    if not qcfg.is_file():
        raise CheckpointError(f"{qcfg} is missing: {folder} is not a diffusers-gaq checkpoint, refusing to push it")
    try:
        method = json.loads(qcfg.read_text(encoding="utf-8")).get("quant_method")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{qcfg} is not valid JSON ({e}); refusing to push a corrupt checkpoint") from None
    if method != "gaq":
        raise CheckpointError(f"{qcfg}: quant_method is {method!r}, not 'gaq'; not a diffusers-gaq checkpoint")


# ---- what is uploaded ------------------------------------------------------------------------
# The usage snippet's repo id: `...from_pretrained("ID")  # this repo's id, ...` (see _TEMPLATE).
_USAGE_REPO_ID = re.compile(r'(\.from_pretrained\(")[^"\n]*("\)  # this repo\'s id)')


def card_for_repo(text: str, repo_id: str) -> str:
    """The card ``text`` with ``repo_id`` in its usage snippet: the placeholder of a card written
    before the repo was known, and the id of an earlier push to another repo, are both replaced."""
    text = text.replace(f'"{REPO_ID_PLACEHOLDER}"', f'"{repo_id}"')
    return _USAGE_REPO_ID.sub(lambda m: m.group(1) + repo_id + m.group(2), text)


# Fields that may hold a local path, by file: diffusers' configs (every file), our quantization
# config, and the report of `diffusers-gaq evaluate` (its default folder is inside the checkpoint).
_PATH_KEYS = {CONFIG_NAME: ["base_model"], "evaluation.json": ["baseline"]}


def _public_json(path: Path) -> tuple[str | None, dict[str, str]]:
    """(the JSON file's text with its base model / ``_name_or_path`` made public, or None when it
    needs no change; {recorded value: public value} for each value replaced)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, {}  # not ours to judge here; uploaded as it is
    if not isinstance(data, dict):
        return None, {}
    keys = ["_name_or_path"] + _PATH_KEYS.get(path.name, [])
    replaced = {}
    for key in keys:
        value = data.get(key)
        public = public_base_model(value) if isinstance(value, str) else value
        if public != value:
            replaced[value] = public
            data[key] = public
    if not replaced:
        return None, {}
    # Key order as saved (quantization_config.json's layer order matters to readers).
    return json.dumps(data, indent=2) + "\n", replaced


def _staged_texts(folder: Path, repo_id: str) -> dict[str, str]:
    """{path relative to folder: text to upload instead of the file} for the files a push rewrites:
    JSON configs that record a local path, and README.md (repo id, and those paths made public).
    Older checkpoints recorded absolute paths; the upload must not publish them."""
    texts, replaced = {}, {}
    for path in sorted(folder.rglob("*.json")):
        if path.is_file() and path.stat().st_size < 1_000_000:  # configs are small; skip data files
            text, found = _public_json(path)
            if text is not None:
                texts[path.relative_to(folder).as_posix()] = text
                replaced.update(found)
    card = folder / CARD_NAME
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        for recorded, public in sorted(replaced.items(), key=lambda kv: -len(kv[0])):  # longest first
            if re.search(r"[\\/]", recorded):  # a path; a bare name like "." must not be replaced everywhere
                text = text.replace(recorded, public or "")
        texts[CARD_NAME] = card_for_repo(text, repo_id)
    return texts


def _stage_for_upload(folder: Path, staging: Path, texts: dict[str, str]) -> None:
    """Mirror ``folder`` into ``staging``: links to the files as they are, fresh files for ``texts``.
    The upload reads the staging area, so the user's folder is never written to by a push."""
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel in texts:
            target.write_text(texts[rel], encoding="utf-8")  # scratch copy, removed after the push
            continue
        try:
            os.symlink(path.resolve(), target)  # no copy of the (large) weights
        except OSError:  # symlinks not allowed (Windows without the privilege)
            shutil.copy2(path, target)


def _keep_uploaded_card(folder: Path, card_text: str | None) -> None:
    """After a successful push, the local card becomes the one uploaded (it names the repo), so
    the folder and the repo agree; nothing else in the folder is changed."""
    card = folder / CARD_NAME
    if card_text is None or not card.is_file():
        return
    try:
        if card.read_text(encoding="utf-8") != card_text:
            atomic_write_text(card, card_text)
            logger.info("updated %s to the card uploaded", card)
    except OSError as err:  # the push itself succeeded; a read-only folder must not turn it into a failure
        logger.warning("pushed, but could not update the local card %s: %s", card, err)


# ---- timeouts ---------------------------------------------------------------------------------
def push_timeout(timeout: float | None = None) -> float:
    """Seconds per Hub request: ``timeout`` if given, else $DIFFUSERS_GAQ_PUSH_TIMEOUT, else 60."""
    source = "timeout="
    if timeout is None:
        raw = os.environ.get(PUSH_TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_PUSH_TIMEOUT
        source = f"${PUSH_TIMEOUT_ENV}"
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{source} is {raw!r}, not a number of seconds; set it to e.g. 60 or unset it") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"{source} {timeout!r} is not a positive number of seconds; pass e.g. 60")
    return float(timeout)


@contextlib.contextmanager
def hub_client_timeout(seconds: float):
    """Make huggingface_hub's shared HTTP client time out after ``seconds`` per request, for the
    duration of the block, through its own hook (``set_client_factory``).

    The user's factory (proxies, certificates, hooks) is kept: its client is only given a timeout,
    and the factory is put back afterwards. huggingface_hub retries timeouts, network errors and
    HTTP 429/5xx itself, at most 5 times per request with waits of 1, 2, 4, 8, 8 s (except
    create_repo and the commit, which it does not retry), so each request ends within
    6 * ``seconds`` + 23 s. Other threads' Hub requests during the block get the timeout too."""
    import httpx2
    from huggingface_hub.utils import _http as hf_http
    from huggingface_hub.utils import set_client_factory

    # No public getter exists; fall back to the library default if the private name moves.
    previous = getattr(hf_http, "_GLOBAL_CLIENT_FACTORY", hf_http.default_client_factory)

    def client_with_timeout():
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        return client

    set_client_factory(client_with_timeout)  # also closes the current shared client
    try:
        yield
    finally:
        set_client_factory(previous)


# ---- uploads ----------------------------------------------------------------------------------
def _failed_request(err: Exception) -> str:
    try:
        request = err.request  # httpx errors raise RuntimeError when they carry none
    except (AttributeError, RuntimeError):
        return ""
    return f" ({request.method} {str(request.url).split('?')[0]})"


def _push_error(err: Exception, stage: str, folder: Path, repo_id: str, endpoint: str,
                timeout: float | None = None) -> HubPushError:
    import httpx2

    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None) if response is not None else None
    hint = ""
    if isinstance(err, httpx2.TimeoutException):
        waited = "connect" if isinstance(err, httpx2.ConnectTimeout) else "answer"
        what = f"the server did not {waited} within {timeout:g} s ({type(err).__name__}){_failed_request(err)}"
        hint = (" Check the address (HF_ENDPOINT / --endpoint), the network and any proxy; on a slow link allow "
                f"more time per request with timeout= (CLI --timeout, or ${PUSH_TIMEOUT_ENV}).")
        if "/commit/" in _failed_request(err):
            hint += (" The commit was cut off while waiting and may still have been made: look at the repo "
                     "before retrying.")
        detail = ""
    else:
        what = f"HTTP {status}" if status else f"connection failed ({type(err).__name__})"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if status in (401, 403):
        hint = " The server refused the credentials: set HF_TOKEN (or pass token=) to a token with write access."
    message = (f"pushing {folder} to {repo_id!r} at {endpoint} failed during {stage}: {what}"
               f"{': ' + detail if detail else ''}.{hint} The local folder {folder} is intact; retry with "
               f"`diffusers-gaq push {folder} {repo_id}`, or set HF_TOKEN / HF_ENDPOINT if the token or server "
               "address is wrong.")
    return HubPushError(message, status_code=status)


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
                endpoint: str | None = None, timeout: float | None = None):
    """Create ``repo_id`` if needed and upload a checkpoint folder; return the CommitInfo
    (``.commit_url``, ``.oid``, ``.pr_url`` when ``create_pr``).

    The repo id, the folder and ``timeout`` are checked before any request. What is uploaded is
    a staging copy: the card names ``repo_id`` and no file records a local absolute path (see
    public_base_model). Each request times out after ``timeout`` seconds (default
    $DIFFUSERS_GAQ_PUSH_TIMEOUT or 60; hub_client_timeout). Network, HTTP and timeout failures
    raise HubPushError and leave the folder byte-identical; after a successful push its README.md
    is replaced by the card uploaded."""
    import httpx2
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    folder = Path(folder)
    _check_checkpoint_folder(folder)
    seconds = push_timeout(timeout)
    texts = _staged_texts(folder, repo_id)
    # endpoint=None lets huggingface_hub resolve HF_ENDPOINT (or huggingface.co) itself.
    api = HfApi(endpoint=endpoint or None, token=token)
    network_errors = (httpx2.HTTPError, ConnectionError, TimeoutError)
    with tempfile.TemporaryDirectory(prefix="diffusers-gaq-push-") as tmp:
        staging = Path(tmp) / folder.resolve().name
        _stage_for_upload(folder, staging, texts)
        stage = "create_repo"
        try:
            with hub_client_timeout(seconds):
                api.create_repo(repo_id, private=private, exist_ok=True)
                stage = "upload_folder"
                info = api.upload_folder(folder_path=staging, repo_id=repo_id, revision=revision,
                                         create_pr=create_pr, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                                         ignore_patterns=["**/.*.tmp", ".*.tmp"])
        except network_errors as err:
            raise _push_error(err, stage, folder, repo_id, api.endpoint, seconds) from err
    _keep_uploaded_card(folder, texts.get(CARD_NAME))
    logger.info("pushed %s to %s (%s)", folder, repo_id, getattr(info, "commit_url", info))
    return info


def push_quantized(model, repo_id: str, *, private: bool | None = None, token: str | None = None,
                   revision: str | None = None, create_pr: bool = False, commit_message: str | None = None,
                   endpoint: str | None = None, save_directory: str | os.PathLike | None = None,
                   base_model: str | None = None, license: str | None = None, timeout: float | None = None):
    """Save ``model`` (with a model card naming ``repo_id``) and push it with push_folder
    (``timeout``: seconds per request, see push_folder).

    With ``save_directory`` the checkpoint stays there (also when the push fails); without it
    a temporary folder is used and removed afterwards."""
    check_repo_id(repo_id)  # fail before spending time on the save
    push_timeout(timeout)

    def save_and_push(folder: Path):
        # The card is written after the save so that it can name the repo the files go to.
        model.save_pretrained(folder, model_card=False)
        write_model_card(model, folder, repo_id=repo_id, base_model=base_model, license=license)
        return push_folder(folder, repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
                           commit_message=commit_message, endpoint=endpoint, timeout=timeout)

    if save_directory is not None:
        return save_and_push(Path(save_directory))
    with tempfile.TemporaryDirectory(prefix="diffusers-gaq-push-") as tmp:
        return save_and_push(Path(tmp) / "checkpoint")


__all__ = ["HubPushError", "check_repo_id", "build_model_card", "write_model_card", "push_folder", "push_quantized",
           "public_base_model", "card_for_repo", "push_timeout", "hub_client_timeout", "REPO_ID_PLACEHOLDER",
           "DEFAULT_PUSH_TIMEOUT", "PUSH_TIMEOUT_ENV"]
