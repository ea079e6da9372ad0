"""`diffusers-gaq quantize`: calibrate a pipeline and save the quantized pipeline."""

from __future__ import annotations

import time
from pathlib import Path

from . import common
from .common import (
    REFERENCE,
    _check_checkpoint_dir,
    _check_model_id,
    _check_output,
    _check_replaceable,
    _check_space_for_model,
    build_config,
    check_not_quantized,
)


def cmd_quantize(args) -> int:
    from ..distributed import is_main_process, wait_for_everyone
    from ..modeling import save_quantized_pipeline
    from ..quantize import quantize_pipeline
    from ..system import resolve_device

    # Everything that can be checked without the model is checked before it is loaded; the rest
    # (pipeline type, disk space for its size, the checkpoint's fingerprint) before any sampling.
    config = build_config(args)
    resolve_device(config.device)
    out = Path(args.output)
    _check_output(out, args.overwrite)
    _check_model_id(args.model)
    check_not_quantized(args.model)
    _check_replaceable(out, args.model)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    _check_checkpoint_dir(checkpoint_dir, out, args.resume, args.model)
    pipe = common.load_pipeline(args.model)
    _check_space_for_model(out, pipe)
    start = time.perf_counter()
    # The pipeline type is checked by quantize_pipeline too, before any sampling.
    qpipe = quantize_pipeline(pipe, config, progress=not args.quiet, checkpoint_dir=checkpoint_dir, resume=args.resume,
                              base_model=None if args.model == REFERENCE else args.model)
    if is_main_process():
        save_quantized_pipeline(qpipe, out, overwrite=args.overwrite)
        print(f"quantized {config.tag} in {time.perf_counter() - start:.0f}s -> {out}")
    wait_for_everyone()
    return 0
