"""`diffusers-gaq info` and `diffusers-gaq push`: what a saved checkpoint holds, and its upload."""

from __future__ import annotations

import json
from pathlib import Path


def cmd_info(args) -> int:
    from ..config import CONFIG_NAME
    from ..folders import quantized_model_dir
    from ..checkpoint_checks import verify_quantization_config
    from ..checkpoint_layout import FORMAT_VERSION
    from ..serialization import WEIGHTS_NAME, CheckpointError, read_json
    from ..weight_bits import checkpoint_weight_bits, format_allocation, precision_groups

    directory = Path(args.directory)
    unet_dir = quantized_model_dir(directory)  # a whole pipeline keeps it in unet/ or transformer/
    qfile = unet_dir / CONFIG_NAME
    if not qfile.is_file():
        raise CheckpointError(f"{qfile} is missing: {directory} is not a diffusers-gaq checkpoint")
    # The structure checks of a load, so that a damaged file is named, not a missing key.
    qcfg = verify_quantization_config(read_json(qfile), qfile, FORMAT_VERSION)
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
    allocation = format_allocation(cfg.get("average_weight_bits"), cfg.get("allocated_layers", []),
                                   cfg.get("layer_precision", {}), storage)
    if allocation:
        print(f"mixed:        {allocation}")
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


def cmd_push(args) -> int:
    from ..hub import push_folder

    url = push_folder(args.directory, args.repo_id, private=args.private or None, token=args.token,
                      revision=args.revision, create_pr=args.create_pr, endpoint=args.endpoint,
                      timeout=args.timeout, dry_run=args.dry_run)
    if args.dry_run:
        for f in url:
            print(f"{f.size:>14,d}  {f.path}")
        print(f"{len(url)} files, {sum(f.size for f in url):,d} bytes would be uploaded to {args.repo_id} "
              "(dry run: nothing was sent)")
        return 0
    print(f"pushed {args.directory} -> {url}")
    return 0
