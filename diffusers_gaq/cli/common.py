"""What the commands share: loading a pipeline by name, the config from the flags, and the checks that
refuse bad input before any long work (each raises CLIError, printed as one line)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import BUDGETS

logger = logging.getLogger("diffusers_gaq")

REFERENCE = "reference"

class CLIError(Exception):
    """A user-facing error: printed as one line."""


def load_pipeline(model: str):
    """'reference' (the embedded pipeline), a local pipeline folder, or a Hub id."""
    if model == REFERENCE:
        from ..reference import load_reference_pipeline

        return load_reference_pipeline()
    if Path(model).is_dir():  # also finds diffusers_gaq's own pipeline classes (ClassConditionalDDIMPipeline)
        from ..modeling import load_quantized_pipeline

        return load_quantized_pipeline(model)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model)


def build_config(args):
    from ..config import GradientAlignedQuantizer

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
        "average_weight_bits": args.average_weight_bits,
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
    from ..config import read_config_fields

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
    from ..files import check_room
    from ..folders import check_new_or_empty

    if path.exists() and not path.is_dir():
        raise CLIError(f"--output {path} is a file, not a folder; delete it or choose another --output")
    try:
        if not overwrite:
            check_new_or_empty(path, "--overwrite")
        check_room(path, 200 * 2**20, f"--output {path}")
    except (FileExistsError, NotADirectoryError, PermissionError, OSError) as e:
        raise CLIError(str(e) if isinstance(e, FileExistsError) else f"--output {path}: {e}") from None


def _check_replaceable(out: Path, model: str) -> None:
    """--overwrite replaces the output folder as a whole: refuse one that holds the input model or
    anything a quantized save did not write (the message lists it); the input is never deleted."""
    from ..folders import check_replaceable

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
    from ..hub import check_repo_id

    try:
        check_repo_id(model)
    except ValueError as e:
        raise CLIError(f"{model!r} is neither 'reference' nor an existing folder, and not a Hub id either: {e}"
                       ) from None
    # "out/w4a8x" is a well-formed Hub id, but when out/ is a local folder it is a mistyped path.
    parent = Path(model).parent
    if str(parent) not in ("", ".") and parent.is_dir():
        near = sorted(p.name for p in parent.iterdir() if p.is_dir())[:8]
        raise CLIError(f"no folder {model} ({parent}/ holds: {', '.join(near) or 'no folders'}); for the Hub repo "
                       f"of that name, run from a directory without a local {parent}/ folder")


def check_not_quantized(model: str) -> None:
    """The input of `quantize` must be an FP pipeline, not one diffusers-gaq saved."""
    from ..checkpoint_source import saved_quantized_components

    if model != REFERENCE and saved_quantized_components(Path(model)):
        raise CLIError(f"{model} is a quantized pipeline already (saved by diffusers-gaq); quantize the FP pipeline "
                       "it came from (`diffusers-gaq info` names its base model)")


def check_quantized(folder: Path) -> None:
    """The input of `evaluate` must be a pipeline diffusers-gaq saved."""
    from ..checkpoint_source import saved_quantized_components

    if not folder.is_dir():
        raise CLIError(f"no folder {folder}")
    if not saved_quantized_components(folder):
        raise CLIError(f"{folder} is not a quantized pipeline (no model_index.json naming a diffusers-gaq component); "
                       "quantize it first: diffusers-gaq quantize MODEL --output FOLDER, then evaluate FOLDER")


def _check_checkpoint_dir(checkpoint_dir: Path | None, out: Path, resume: bool, model: str | None = None) -> None:
    """The checkpoint folder must stay apart from the output (replaced as a whole when the result is
    saved) and from the input model (the docs say to delete the checkpoint folder after the save)."""
    from ..checkpointing import check_checkpoint_dir
    from ..distributed import is_main_process

    if checkpoint_dir is not None:
        _check_apart(checkpoint_dir, out, f"--output {out}")
        if model is not None and model != REFERENCE and Path(model).exists():
            _check_apart(checkpoint_dir, Path(model), f"the input model folder {model}")
    # Only the main process of a multi-process run takes the lock: the others would see it as busy.
    check_checkpoint_dir(checkpoint_dir, resume, check_lock=is_main_process())


def _check_apart(checkpoint_dir: Path, other: Path, what: str) -> None:
    """Refuse a checkpoint folder that is ``other``, holds it or lies inside it."""
    ckpt, other_abs = checkpoint_dir.resolve(), other.resolve()
    if ckpt == other_abs:
        raise CLIError(f"--checkpoint-dir {checkpoint_dir} is {what}; choose a folder of its own")
    if other_abs in ckpt.parents:
        raise CLIError(f"--checkpoint-dir {checkpoint_dir} is inside {what}; choose a folder outside it")
    if ckpt in other_abs.parents:
        raise CLIError(f"--checkpoint-dir {checkpoint_dir} holds {what}; choose a folder that does not hold it")


def _check_space_for_model(out: Path, pipe) -> None:
    """The saved pipeline is at most its FP size (the denoiser shrinks to packed integers, a text
    encoder or VAE is saved as it is); ask for that much room."""
    from torch import nn

    from ..files import check_room

    modules = [m for m in pipe.components.values() if isinstance(m, nn.Module)]
    need = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values()) + 16 * 2**20
    try:
        check_room(out, need, "the quantized pipeline")
    except OSError as e:
        raise CLIError(f"{e} (--output)") from None


def _denoiser(pipe):
    from ..models import denoiser_of

    return denoiser_of(pipe)[2]


def _base_id(model) -> str:
    """The FP pipeline a quantized denoiser was made from, as load_pipeline takes it."""
    from ..reference import PIPELINE_DIR

    base_id = getattr(model, "gaq_base_model", None) or REFERENCE
    return REFERENCE if Path(base_id).resolve() == PIPELINE_DIR.resolve() else base_id


def _save_png(image, path: Path) -> None:
    from ..files import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")  # the temporary name ends in .tmp: name the format
