"""Model families at full size (issue #8): random-weight models with the architectures of
google/ddpm-cifar10-32, an LDM-4 latent UNet (CompVis/ldm-celebahq-256), DiT-XL/2, the
Stable Diffusion 1.5 UNet and the Stable Diffusion XL base UNet (issue 17); wrapping time, calibration time per reconstruction unit (measured on a
few iterations, extrapolated to 1k), peak RSS and the W4A8 checkpoint size against FP32.

    OMP_NUM_THREADS=1 nice -n 19 python examples/benchmark_scale.py --out runs/scale.jsonl

Each model runs in its own subprocess (peak RSS is per model). Per model:
  - build the model (random weights: time and memory do not depend on the values), FP32 bytes;
  - wrap every Conv2d / Linear for W4A8 and list the reconstruction units (timed);
  - a synthetic calibration set (random inputs at 2 timesteps, with random class labels / prompt
    embeddings of the right shapes: what calibration computes does not depend on the values),
    ``--batch`` samples per reconstruction minibatch (16 for the cifar model);
  - for the timed units: capture of the unit's inputs inside the model, quantizer
    initialisation, ``--meta-iters`` meta steps (gradient-aligned weights) and ``--iters``
    reconstruction steps, each timed; per unit "s / 1k recon iters" is the measured mean step
    time x 1000; the google/ddpm-cifar10-32 run times every unit, so its paper-budget projection
    (20k reconstruction + 2k meta iterations per unit, 20 x 256 samples, 100-step trajectories)
    sums measured numbers only;
  - the checkpoint: every layer frozen at round-to-nearest (min-max scales), activation ranges
    from one forward pass, ``save_pretrained``; size of the safetensors file against the FP32
    state dict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# LDM-4 CelebA-HQ 256 (CompVis/ldm-celebahq-256): the original latent-diffusion config (model_channels
# 224, channel_mult 1,2,3,4, two res blocks, attention at downsampling 2, 4, 8, 32 channels per head)
# in diffusers' UNet2DModel terms, on 64x64x3 latents of the f=4 VQ autoencoder.
LDM4_CONFIG = dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
                   block_out_channels=(224, 448, 672, 896),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=32, norm_num_groups=32)
# DiT-XL/2 (facebook/DiT-XL-2-256): 28 blocks, hidden 1152, 16 heads, patch 2, 32x32x4 latents, learned sigma.
DIT_XL_2_CONFIG = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                       sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
# Stable Diffusion 1.5's UNet: UNet2DConditionModel's defaults are SD 1.x (320..1280, cross-attention 768).
SD15_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                   block_out_channels=(320, 640, 1280, 1280))
# Stable Diffusion XL base's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): 128x128x4 latents,
# 320/640/1280 channels, 1 / 2 / 10 transformer layers per attention block at 64x64 / 32x32, 64-channel heads,
# cross-attention 2048 (both text encoders' states), text_time added conditioning (pooled 1280 + 6 x 256).
SDXL_CONFIG = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                   block_out_channels=(320, 640, 1280),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816)
SD_TOKENS = 77

# A few-second model with every block type of the cifar architecture, for the CPU test of this script
# (tests/test_gpu_check.py); not among MODELS.
TINY_TEST_CONFIG = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                        norm_num_groups=8, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))

PAPER = dict(recon_iters=20000, meta_iters=2000, samples=20 * 256, trajectory_steps=100, trajectories=256)


def build(name: str):
    import torch
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

    from diffusers_gaq.reference.recipe import DDPM_CIFAR10_32_CONFIG

    torch.manual_seed(0)
    if name == "ddpm-cifar10-32":
        return UNet2DModel(**DDPM_CIFAR10_32_CONFIG)
    if name == "tiny-test":
        return UNet2DModel(**TINY_TEST_CONFIG)
    if name == "ldm4-celebahq-256":
        return UNet2DModel(**LDM4_CONFIG)
    if name == "dit-xl-2":
        return DiTTransformer2DModel(**DIT_XL_2_CONFIG)
    if name == "sd15-unet":
        return UNet2DConditionModel(**SD15_CONFIG)
    if name == "sdxl-unet":
        return UNet2DConditionModel(**SDXL_CONFIG)
    raise ValueError(name)


def synthetic_data(model, family, config, per_step: int):
    """2 timesteps x ``per_step`` samples (2 held out per step), random inputs and conditioning."""
    import torch

    from diffusers_gaq.calibration.data import CalibrationData, assign_splits

    gen = torch.Generator().manual_seed(0)
    c, h, w = family.sample_shape(model)
    steps = 2
    n = steps * per_step
    cond = {}
    if "class_labels" in family.example_conditioning(model, 1):
        cond["class_labels"] = torch.randint(0, 1000, (n,), generator=gen)
    example = family.example_conditioning(model, 1)
    if "encoder_hidden_states" in example:
        cond["encoder_hidden_states"] = torch.randn(n, SD_TOKENS, model.config.cross_attention_dim, generator=gen)
    if "text_embeds" in example:  # SDXL: pooled text embedding and the micro-conditioning time ids
        cond["text_embeds"] = torch.randn(n, example["text_embeds"].shape[1], generator=gen)
        cond["time_ids"] = example["time_ids"].expand(n, 6).clone()
    step_index, group, is_val = assign_splits(config, steps, per_step)
    timesteps = torch.tensor([800, 200]).repeat_interleave(per_step)
    return CalibrationData(torch.randn(n, c, h, w, generator=gen), timesteps, step_index, group, is_val, cond)


def spread_order(n: int) -> list[int]:
    """0..n-1 ordered so that every prefix is spread over the range (0, n/2, n/4, 3n/4, ...): a
    run cut short by its time budget has still sampled the whole network."""
    order, step = [], 1 << max(0, (n - 1).bit_length())
    while step:
        order += [i for i in range(0, n, step) if i not in order]
        step //= 2
    return order


def pick_units(units, family, wanted: int, names: list[str] | None):
    """``names`` when given; every unit (in spread order) when ``wanted`` covers them; else
    ``wanted`` block units spread over the forward order."""
    if names:
        by_name = dict(units)
        return [(n, by_name[n]) for n in names]
    if wanted >= len(units):
        return [units[i] for i in spread_order(len(units))]
    blocks = [(n, u) for n, u in units if isinstance(u, family.unit_types)]
    step = max(1, len(blocks) // wanted)
    return blocks[::step][:wanted]


def sync(device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def capture(model, family, name, unit, data, config) -> dict:
    """What calibrate_model pays per unit before calibrating it: a forward pass up to the unit for its
    inputs (the FP targets of all units come from one shared pass, about one model forward per sample)."""
    import torch

    from diffusers_gaq.calibration.capture import capture_unit
    from diffusers_gaq.calibration.store import CaptureStore
    from diffusers_gaq.models.wrap import set_quant_state

    bs = config.recon_batch_size
    device = next(model.parameters()).device
    row = {"unit": name, "type": type(unit).__name__,
           "params": sum(p.numel() for n, p in unit.named_parameters() if n.endswith("layer.weight"))}
    t = time.perf_counter()
    set_quant_state(model, weight=False, act=False)
    store = CaptureStore(config.capture_memory_bytes)  # as calibrate_model keeps them
    inputs = capture_unit(model, unit, data, family, bs, "inputs", store=store)
    row["capture_s_per_sample"] = (time.perf_counter() - t) / len(data)
    with torch.no_grad():  # targets: the unit itself in FP on those inputs (timing only), kept on CPU as captures are
        targets = torch.cat([unit(*a, **k).cpu() for a, k in (inputs.select(torch.arange(i, min(i + bs, len(data))),
                                                                            device)
                                                              for i in range(0, len(data), bs))])
    return {"row": row, "unit": unit, "inputs": inputs, "targets": targets, "store": store, "device": device}


def calibrate_timed(got: dict, data, config, iters: int, meta_iters: int) -> dict:
    """Quantizer initialisation, ``meta_iters`` meta steps and ``iters`` reconstruction steps of a
    captured unit, each timed."""
    import torch

    from diffusers_gaq.calibration.reconstruction import UnitProblem, harden, init_quantizers, reconstruct, start_rounding
    from diffusers_gaq.calibration.weighting import learn_scores
    from diffusers_gaq.models.wrap import set_quant_state

    row, unit, device = got["row"], got["unit"], got["device"]
    problem = UnitProblem(row["unit"], unit, got["inputs"], got["targets"], device)
    train_idx = data.train_indices
    t = time.perf_counter()
    init_quantizers(problem, train_idx, config)
    sync(device)
    row["init_s"] = time.perf_counter() - t
    row["init_s_per_sample"] = row["init_s"] / len(train_idx)
    start_rounding(problem)
    if meta_iters:
        val_groups = data.val_groups()
        t = time.perf_counter()
        learn_scores(problem, torch.zeros(len(train_idx)), train_idx, val_groups, config.replace(meta_iters=meta_iters),
                     torch.Generator().manual_seed(0), progress=False)
        sync(device)
        row["meta_s_per_iter"] = (time.perf_counter() - t) / meta_iters
    row["peak_rss_bytes_after_meta"] = peak_rss_bytes()
    t = time.perf_counter()
    reconstruct(problem, train_idx, torch.ones(len(train_idx)), config.replace(recon_iters=iters),
                torch.Generator().manual_seed(0), progress=False)
    sync(device)
    row["recon_s_per_iter"] = (time.perf_counter() - t) / iters
    row["recon_s_per_1k"] = 1000 * row["recon_s_per_iter"]
    harden(problem)
    set_quant_state(unit, weight=True, act=True)
    got["store"].close()
    got.clear()
    row["peak_rss_bytes_after"] = peak_rss_bytes()  # the process's peak so far: which unit set it
    return row


def time_unit(model, family, name, unit, data, config, iters: int, meta_iters: int) -> dict:
    return calibrate_timed(capture(model, family, name, unit, data, config), data, config, iters, meta_iters)


def checkpoint_ratio(model, family, config, wrap, fp_bytes: int) -> dict:
    """Freeze every layer at round-to-nearest, observe activation ranges on one pass, save, measure."""
    import torch

    from diffusers_gaq.modeling import QuantizationState, mark_quantized
    from diffusers_gaq.models.wrap import act_quantizers, quant_layers, set_observing, set_quant_state

    t = time.perf_counter()
    with torch.no_grad():
        for _, layer in quant_layers(model):
            wq = layer.weight_quantizer
            if wq.mode != "frozen":
                wq.init_method = "minmax"  # sizes do not depend on the scales; MSE search over 10^9 weights is slow
                wq.calibrate(layer.layer.weight)
                wq.harden(layer.layer.weight)
        set_quant_state(model, weight=False, act=True)
        set_observing(model, True)
        device = next(model.parameters()).device
        x, ts, cond = family.example_input(model, 1)
        family.forward(model, x.to(device), ts.to(device), {k: v.to(device) for k, v in cond.items()})
        set_observing(model, False)
        for q in act_quantizers(model):
            if not bool(q.initialized):
                q.finalize()
    set_quant_state(model, weight=True, act=True)
    mark_quantized(model, QuantizationState(config, wrap))
    with tempfile.TemporaryDirectory() as tmp:
        folder = model.save_pretrained(Path(tmp) / "q", model_card=False)
        size = (folder / "diffusion_pytorch_model.safetensors").stat().st_size
    return {"checkpoint_bytes": size, "checkpoint_ratio_vs_fp32": size / fp_bytes,
            "freeze_and_save_s": time.perf_counter() - t}


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args) -> dict:
    import torch

    from diffusers_gaq.config import GradientAlignedQuantizer
    from diffusers_gaq.models import family_for
    from diffusers_gaq.models.wrap import reconstruction_units, wrap_model

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    row = {"model": args.worker, "device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
           "max_calibration_memory_gib": args.max_memory_gib}
    t = time.perf_counter()
    with device:  # random init on the device itself (minutes on a CPU for SDXL's 2.6B weights, seconds on a GPU)
        model = build(args.worker).eval().requires_grad_(False)
    row["build_s"] = time.perf_counter() - t
    row["params"] = sum(p.numel() for p in model.parameters())
    row["fp32_bytes"] = fp_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    family = family_for(model)
    per_step = args.batch + 2
    config = GradientAlignedQuantizer(weight_bits=4, act_bits=8, recon_batch_size=args.batch,
                                      meta_batch_size=args.batch, calibration_batch_size=args.batch,
                                      num_calibration_timesteps=2, num_groups=2, num_inference_steps=10,
                                      samples_per_timestep=per_step, val_fraction=1.6 / per_step,  # 2 held out
                                      max_calibration_memory_gib=args.max_memory_gib)
    t = time.perf_counter()
    wrap = wrap_model(model, config, family)
    row["wrap_s"] = time.perf_counter() - t
    row["quantized_layers"] = len(wrap.layer_bits)
    t = time.perf_counter()
    units = reconstruction_units(model, family)
    row["units_s"] = time.perf_counter() - t
    row["units"] = len(units)
    data = synthetic_data(model, family, config, per_step)
    # One FP forward per sample: what trajectory sampling costs per model call.
    fwd = args.forward_samples or args.batch
    with torch.no_grad():
        x, ts = data.samples[:fwd].to(device), data.timesteps[:fwd].to(device)
        cond = {k: v[:fwd].to(device) for k, v in data.conditioning.items()}
        sync(device)
        t = time.perf_counter()
        family.forward(model, x, ts, cond)
        sync(device)
        row["forward_s_per_sample"] = (time.perf_counter() - t) / fwd
        row["forward_samples"] = fwd
    chosen = pick_units(units, family, args.units, args.unit_names.split(",") if args.unit_names else None)
    row["timed_units"] = []
    if args.drop_model:
        # Hand the only references over: the unit list holds (nearly) every weight of the model.
        holder = [model]
        del model, units, wrap
        return drop_model_timing(row, args, holder, family, chosen, data, config)
    deadline = time.perf_counter() + args.unit_budget_s
    no_meta = set(filter(None, args.no_meta_units.split(",")))
    for name, unit in chosen:
        if time.perf_counter() > deadline:
            row["units_skipped_for_time"] = row.get("units_skipped_for_time", 0) + 1
            continue
        timed = time_unit(model, family, name, unit, data, config, args.iters, 0 if name in no_meta else args.meta_iters)
        if name in no_meta:
            timed["meta_skipped"] = NO_META_REASON
        row["timed_units"].append(timed)
        print(f"  {args.worker} {name}: {row['timed_units'][-1]['recon_s_per_iter']:.3f} s/iter", file=sys.stderr,
              flush=True)
    row.update(checkpoint_ratio(model, family, config, wrap, fp_bytes))
    row["peak_rss_bytes"] = peak_rss_bytes()
    if device.type == "cuda":
        row["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def drop_model_timing(row, args, holder: list, family, chosen, data, config) -> dict:
    """``--drop-model``: for a model whose FP32 weights alone fill most of the memory (SDXL, 10.3 GB): capture
    every chosen unit's inputs with the whole model, then free the model except those units and calibrate
    them alone; the checkpoint size comes from a fresh build afterwards. The row's ``peak_rss_bytes`` is
    then the larger of "model + captures" and "one unit's calibration", not their sum (a calibration that
    keeps the model resident adds the two; calibrate_model does)."""
    import gc

    import torch

    from diffusers_gaq.models.wrap import wrap_model

    model = holder.pop()
    got = []
    for name, unit in chosen:
        got.append(capture(model, family, name, unit, data, config))
        print(f"  {args.worker} {name}: captured", file=sys.stderr, flush=True)
    row["peak_rss_bytes_model_and_captures"] = peak_rss_bytes()
    del model, chosen[:]  # the captured units stay referenced by ``got``, the rest of the model is freed
    gc.collect()
    row["rss_bytes_units_only"] = current_rss_bytes()
    no_meta = set(filter(None, args.no_meta_units.split(",")))
    for g in got:
        meta = 0 if g["row"]["unit"] in no_meta else args.meta_iters
        if not meta:
            g["row"]["meta_skipped"] = NO_META_REASON
        row["timed_units"].append(calibrate_timed(g, data, config, args.iters, meta))
        print(f"  {args.worker} {row['timed_units'][-1]['unit']}: {row['timed_units'][-1]['recon_s_per_iter']:.3f} "
              "s/iter", file=sys.stderr, flush=True)
    del got
    gc.collect()
    with torch.device(args.device):
        fresh = build(args.worker).eval().requires_grad_(False)
    wrap = wrap_model(fresh, config, family)
    row.update(checkpoint_ratio(fresh, family, config, wrap, row["fp32_bytes"]))
    row["peak_rss_bytes"] = peak_rss_bytes()
    row["drop_model"] = True
    return row


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def project_paper_budget(row: dict) -> dict | None:
    """Wall time of a paper-budget calibration from measured per-unit numbers: the timed units'
    sum, scaled by units / timed units when a time budget cut the timing short (the timed units
    are spread over the network, see spread_order), and minibatch times scaled to 32."""
    timed = row["timed_units"]
    if not timed:
        return None
    scale = row["units"] / len(timed)
    n_train = PAPER["samples"] * (1 - 0.05)
    recon = scale * sum(u["recon_s_per_iter"] for u in timed) * PAPER["recon_iters"] * (32 / row["batch"])
    meta = scale * sum(u.get("meta_s_per_iter", 0.0) for u in timed) * PAPER["meta_iters"] * (32 / row["batch"])
    capture = (scale * sum(u["capture_s_per_sample"] for u in timed) + row["forward_s_per_sample"]) * PAPER["samples"]
    init = scale * sum(u["init_s_per_sample"] for u in timed) * n_train
    data = row["forward_s_per_sample"] * PAPER["trajectories"] * PAPER["trajectory_steps"]
    total = recon + meta + capture + init + data
    return {"units_timed": len(timed), "units": row["units"], "recon_h": recon / 3600, "meta_h": meta / 3600, "capture_h": capture / 3600, "init_h": init / 3600,
            "trajectories_h": data / 3600, "total_h": total / 3600}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<18} {'params':>8} {'wrap s':>7} {'units':>6} {'timed':>6} {'s/1k iters (timed units)':>26} "
          f"{'meta s/it':>10} {'peak RSS GiB':>13} {'ckpt / FP32':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<18} failed: {r['error']}")
            continue
        per_1k = [u["recon_s_per_1k"] for u in r["timed_units"]]
        meta = [u["meta_s_per_iter"] for u in r["timed_units"] if "meta_s_per_iter" in u]
        span = f"{min(per_1k):.0f}-{max(per_1k):.0f} (mean {sum(per_1k) / len(per_1k):.0f})" if per_1k else "-"
        meta_s = f"{sum(meta) / len(meta):.2f}" if meta else "-"
        print(f"{r['model']:<18} {r['params'] / 1e6:7.1f}M {r['wrap_s']:7.2f} {r['units']:6d} {len(per_1k):6d} "
              f"{span:>26} {meta_s:>10} {r['peak_rss_bytes'] / 2**30:13.2f} {r['checkpoint_ratio_vs_fp32']:11.3f}")
    for r in rows:
        for u in r.get("timed_units", []):
            print(f"  {r['model']:<18} {u['unit']:<52} {u['type']:<22} {u['params'] / 1e6:6.2f}M "
                  f"recon {u['recon_s_per_iter']:7.3f} s/it  meta {u.get('meta_s_per_iter', float('nan')):7.3f} s/it")
        if r.get("paper_projection"):
            p = r["paper_projection"]
            print(f"  {r['model']}: paper budget projected on this CPU from {p['units_timed']} of {p['units']} units: "
                  f"{p['total_h']:.1f} h (reconstruction "
                  f"{p['recon_h']:.1f} h, meta {p['meta_h']:.1f} h, capture {p['capture_h']:.2f} h, init "
                  f"{p['init_h']:.2f} h, trajectories {p['trajectories_h']:.2f} h)")


MODELS = ("ddpm-cifar10-32", "ldm4-celebahq-256", "dit-xl-2", "sd15-unet", "sdxl-unet")
# The timed units of the text-conditional UNets: the first (highest-resolution) resnet, the first transformer
# block of each attention resolution down to the largest channel count (their captures need a forward pass
# only down to the unit: later units cost more to reach).
DEFAULT_UNITS = {
    "sd15-unet": "down_blocks.0.resnets.0,down_blocks.1.attentions.0.transformer_blocks.0,"
                 "mid_block.attentions.0.transformer_blocks.0",
    "sdxl-unet": "down_blocks.0.resnets.0,down_blocks.1.attentions.0.transformer_blocks.0,"
                 "down_blocks.2.attentions.0.transformer_blocks.0",
}
# SDXL's 64x64 transformer block (4096 tokens): one reconstruction step takes minutes on one CPU thread and
# a meta step 15-20 of them, so on a CPU its meta step is skipped for time. (Its memory: the meta step runs
# by parts, one sample per chunk for this unit, calibration/meta_gradient.py; not measured at 64x64.)
NO_META_REASON = "meta step not run on a CPU: about an hour per meta step for this unit on one thread"
NO_META_UNITS = {"sdxl-unet": "down_blocks.1.attentions.0.transformer_blocks.0"}
# Models calibrated without the rest of the model resident on a CPU (see drop_model_timing).
DROP_MODEL = ("sdxl-unet",)
# SDXL's forward costs minutes per sample on one CPU thread: its per-sample forward time is measured on one.
FORWARD_SAMPLES = {"sdxl-unet": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default="runs/benchmark_scale.jsonl", help="JSON rows, one per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2, help="reconstruction iterations timed per unit")
    parser.add_argument("--meta-iters", type=int, default=1, help="meta iterations timed per unit")
    parser.add_argument("--batch", type=int, default=8, help="reconstruction minibatch (16 for the cifar model); "
                        "per-iteration times scale about linearly with it, projections to 32 scale them")
    parser.add_argument("--units", type=int, default=3, help="units timed per model (every unit for the cifar model)")
    parser.add_argument("--unit-names", default="", help="comma-separated unit names to time instead")
    parser.add_argument("--unit-budget-s", type=float, default=400, help="stop timing further units after this")
    parser.add_argument("--timeout-s", type=float, default=900, help="per-model subprocess limit")
    parser.add_argument("--max-memory-gib", type=float, default=16.0,
                        help="GradientAlignedQuantizer.max_calibration_memory_gib (attention chunks, capture store)")
    parser.add_argument("--no-meta-units", default="", help="comma-separated timed units whose meta step is not run")
    parser.add_argument("--drop-model", action="store_true", help="capture with the model, then calibrate the timed "
                        "units without it (default for SDXL: its FP32 weights are 10.3 GB)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the GPU check runs it on cuda)")
    parser.add_argument("--forward-samples", type=int, default=0, help="samples of the timed FP forward (0: --batch)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--threads", str(args.threads), "--iters", str(args.iters),
               "--meta-iters", str(args.meta_iters), "--max-memory-gib", str(args.max_memory_gib),
               "--forward-samples", str(args.forward_samples or FORWARD_SAMPLES.get(name, 0)), "--device", args.device]
        no_meta = args.no_meta_units or (NO_META_UNITS.get(name, "") if args.device == "cpu" else "")
        if no_meta:
            cmd += ["--no-meta-units", no_meta]
        if args.drop_model or (name in DROP_MODEL and args.device == "cpu"):
            cmd.append("--drop-model")
        if name == "ddpm-cifar10-32":  # every unit: the projection sums measurements (minibatch 16, scaled to 32)
            cmd += ["--batch", "16", "--units", "1000", "--unit-budget-s", str(2 * args.unit_budget_s)]
        else:
            cmd += ["--batch", str(args.batch), "--units", str(args.units), "--unit-budget-s", str(args.unit_budget_s)]
            if name in DEFAULT_UNITS and not args.unit_names:
                cmd += ["--unit-names", DEFAULT_UNITS[name]]
            elif args.unit_names:
                cmd += ["--unit-names", args.unit_names]
        print(f"{name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("  ")]
                cause = "killed by signal %d (out of memory?)" % -proc.returncode if proc.returncode < 0 else \
                    (lines[-1] if lines else f"exit code {proc.returncode}")
                row = {"model": name, "error": cause, "batch": args.batch}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                # Only the cifar model times (nearly) every unit; 3 units of the others project nothing useful.
                row["paper_projection"] = project_paper_budget(row) if name == "ddpm-cifar10-32" else None
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"timed out after {args.timeout_s:.0f}s"}
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: {row['wall_s']:.0f}s", file=sys.stderr, flush=True)
    print_table(rows)
    print(f"\nrows appended to {out}")


if __name__ == "__main__":
    main()
