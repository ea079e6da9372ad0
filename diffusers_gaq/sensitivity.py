"""Per-layer sensitivity: how much end-to-end damage quantizing ONE layer does, everything else FP.

For every quantized layer of a denoiser, two measurements at the requested bit widths:

- ``weight``: only this layer's weights quantized (round-to-nearest, scales per ``config.weight_init``);
- ``activation``: only this layer's input activations quantized (both halves of a split
  skip-concatenation input); attention cores (q, k, v, softmax probabilities) get an
  activation row too.

Each row holds ``noise_mse`` (the error of the predicted noise on calibration samples, cheap)
and, optionally, ``psnr_db`` / ``mse`` of DDIM images (eta = 0) generated from the same initial
noise as the FP images. No reconstruction: this is a fast diagnostic of which layers to keep in
higher precision (``GradientAlignedQuantizer.keep_fp``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration.data import CalibrationData, collect_calibration_data
from .config import GradientAlignedQuantizer
from .evaluation import as_ddim, generate, sample_psnr
from .files import atomic_write_text
from .models import denoiser_of, rebuild_pipeline
from .models.wrap import attention_cores, quant_layers, set_observing, set_quant_state, wrap_model
from .system import resolve_device

logger = logging.getLogger(__name__)

# Calibration samples the noise error is measured on: enough to rank layers, one batch on the reference.
NOISE_SAMPLES = 64
DEFAULT_TOP = 20
KINDS = ("weight", "activation")


# ---- the report ---------------------------------------------------------------------------------
@dataclass
class SensitivityRow:
    """Damage of quantizing one layer's weights (or its input activations) alone."""

    layer: str
    kind: str  # "weight" | "activation"
    bits: int
    noise_mse: float
    psnr_db: float | None = None  # images against the FP images (capped at evaluation.PSNR_CAP_DB)
    mse: float | None = None  # image MSE against the FP images, values in [0, 1]

    @property
    def damage(self) -> float:
        """What ranks rows: the image MSE when images were measured, else the noise MSE."""
        return self.mse if self.mse is not None else self.noise_mse


@dataclass
class SensitivityReport:
    rows: list[SensitivityRow] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # bits, images, steps, seed, sample counts, seconds

    def ranked(self, kind: str | None = None) -> list[SensitivityRow]:
        """Rows of ``kind`` ("weight", "activation"; None: both), most damaging first."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
        rows = [r for r in self.rows if kind is None or r.kind == kind]
        return sorted(rows, key=lambda r: r.damage, reverse=True)

    def by_layer(self) -> list[tuple[str, dict[str, SensitivityRow]]]:
        """(layer, {kind: row}) with the layer's worst damage first: what to keep in higher precision."""
        layers: dict[str, dict[str, SensitivityRow]] = {}
        for row in self.rows:
            layers.setdefault(row.layer, {})[row.kind] = row
        return sorted(layers.items(), key=lambda item: max(r.damage for r in item[1].values()), reverse=True)

    # ---- files ----
    def to_dict(self) -> dict:
        return {"settings": self.settings, "rows": [asdict(r) for r in self.rows]}

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "SensitivityReport":
        data = json.loads(Path(path).read_text())
        return cls([SensitivityRow(**r) for r in data["rows"]], data.get("settings", {}))

    def to_markdown(self, top: int | None = None) -> str:
        """A table of the ``top`` most sensitive layers (all when None), weight (W) and activation (A)
        side by side, ranked by each layer's worst image MSE (noise MSE without images)."""
        images = any(r.mse is not None for r in self.rows)
        columns = [("noise MSE", "noise_mse", ".3g")]
        if images:
            columns = [("image MSE", "mse", ".3g"), ("PSNR dB", "psnr_db", ".2f")] + columns
        head = ["rank", "layer"] + [f"{k} {label}" for label, _, _ in columns for k in ("W", "A")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for rank, (layer, kinds) in enumerate(self.by_layer()[:top], 1):
            cells = [str(rank), f"`{layer}`"]
            for _, attr, spec in columns:
                for kind in KINDS:
                    cells.append(_fmt(getattr(kinds[kind], attr) if kind in kinds else None, spec))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike, top: int = DEFAULT_TOP) -> Path:
        """Horizontal bars of the ``top`` most sensitive layers: weight and activation damage side
        by side, on a log axis (the damage spans orders of magnitude)."""
        from .plots import _new_figure, _save

        chosen = self.by_layer()[:top]
        if not chosen:
            raise ValueError("the sensitivity report has no rows to plot")
        images = any(r.mse is not None for r in self.rows)
        fig = _new_figure(7.0, 0.28 * len(chosen) + 1.4)
        ax = fig.add_subplot()
        ys = np.arange(len(chosen))
        # A log axis cannot show zero: zero damage is drawn as a stub a decade below the smallest bar.
        positive = [r.damage for _, kinds in chosen for r in kinds.values() if r.damage > 0]
        floor = min(positive) / 10 if positive else 1e-12
        for offset, kind, color, bits in ((-0.2, "weight", "tab:blue", self.settings.get("weight_bits")),
                                          (0.2, "activation", "tab:orange", self.settings.get("act_bits"))):
            # A layer without this kind (attention cores have no weights) gets no bar.
            values = [max(kinds[kind].damage, floor) if kind in kinds else np.nan for _, kinds in chosen]
            label = f"{kind} only" + (f" ({bits}-bit)" if bits else "")
            ax.barh(ys + offset, values, height=0.4, color=color, label=label)
        ax.set_xscale("log")
        ax.set_yticks(ys, [layer for layer, _ in chosen], fontsize=7)
        ax.invert_yaxis()  # most sensitive on top
        ax.set_xlabel("image MSE against FP (log)" if images else "noise-prediction MSE against FP (log)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
        tag = self.settings.get("tag", "")
        ax.set_title(f"Per-layer sensitivity {tag}: one layer quantized, the rest FP", fontsize=9)
        return _save(fig, path)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---- the analysis -------------------------------------------------------------------------------
def analyze_sensitivity(pipe, config: GradientAlignedQuantizer | None = None, *, num_images: int = 16,
                        num_inference_steps: int = 10, seed: int = 0, images: bool = True,
                        calibration_data: CalibrationData | None = None, progress: bool = True) -> SensitivityReport:
    """The damage of quantizing each layer alone (its weights; separately its input activations) at
    ``config.weight_bits`` / ``config.act_bits``, with the rest of the denoiser in full precision.

    The pipeline is not modified: its denoiser is copied and wrapped. Activation ranges come from one
    observing pass over ``calibration_data`` (default: sampled from the FP model along
    ``num_inference_steps``-step DDIM trajectories, ``config.num_calibration_timesteps`` x
    ``config.samples_per_timestep`` samples); weights are rounded to nearest. ``images=True`` also
    generates ``num_images`` DDIM images per row (unconditional pipelines only) and compares them
    with the FP images from the same noise; ``images=False`` measures only the noise error."""
    config = config or GradientAlignedQuantizer()
    config.validate()
    family, component, fp_model = denoiser_of(pipe)
    # Everything that can be refused is refused here, before any copy or sampling.
    _check_arguments(pipe, num_images, num_inference_steps, images)
    device = resolve_device(config.device)
    if calibration_data is not None:
        c, h, w = family.sample_shape(fp_model)
        calibration_data.check(c, (h, w))
    sampling_config = _calibration_config(config, num_inference_steps)
    start = time.perf_counter()

    model = copy.deepcopy(fp_model).to(device).eval().requires_grad_(False)
    if calibration_data is None:
        conditioning = family.calibration_conditioning(pipe, model, sampling_config, device)
        calibration_data = collect_calibration_data(model, pipe.scheduler.config, family, sampling_config, device,
                                                    progress, conditioning=conditioning)
    wrap = wrap_model(model, config, family)
    _harden_weights_to_nearest(model)
    _calibrate_activations(model, family, calibration_data, config.recon_batch_size, device)

    probe = _NoiseProbe(model, family, calibration_data, device)
    sampler = _ImageProbe(pipe, component, model, num_images, num_inference_steps, seed) if images else None
    rows = [_measure(model, name, module, kind, bits, probe, sampler)
            for name, module, kind, bits in tqdm(_targets(model, config), desc=f"sensitivity {config.tag}",
                                                 disable=not progress)]
    settings = {
        "tag": config.tag, "weight_bits": config.weight_bits, "act_bits": config.act_bits,
        "weight_init": config.weight_init, "layers": len(wrap.layer_bits), "attention_cores": len(wrap.attention),
        "calibration_samples": len(calibration_data), "noise_samples": len(probe.indices),
        "images": num_images if images else 0, "num_inference_steps": num_inference_steps, "seed": seed,
        "seconds": round(time.perf_counter() - start, 1),
    }
    logger.info("sensitivity %s: %d rows in %.0fs", config.tag, len(rows), settings["seconds"])
    return SensitivityReport(rows, settings)


def _check_arguments(pipe, num_images: int, num_inference_steps: int, images: bool) -> None:
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if images:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1 with images=True, got {num_images}")
        try:
            as_ddim(pipe)
        except TypeError as e:
            raise TypeError(f"the image metric samples unconditional pipelines only ({e}); "
                            "pass images=False (CLI: --no-images) to measure the noise error alone") from None


def _calibration_config(config: GradientAlignedQuantizer, num_inference_steps: int) -> GradientAlignedQuantizer:
    """The calibration trajectories are as long as the analysis samples, so the noise error is
    measured at the timesteps the images go through (and sampling stays cheap)."""
    steps = min(config.num_calibration_timesteps, num_inference_steps)
    return config.replace(num_inference_steps=num_inference_steps, num_calibration_timesteps=steps,
                          num_groups=min(config.num_groups, steps))  # replace() validates


@torch.no_grad()
def _harden_weights_to_nearest(model: nn.Module) -> None:
    for _, layer in quant_layers(model):
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.calibrate(layer.layer.weight)
            layer.weight_quantizer.harden(layer.layer.weight)


@torch.no_grad()
def _calibrate_activations(model, family, data: CalibrationData, batch_size: int, device) -> None:
    """One observing pass for every activation quantizer at once. Observing quantizers pass their
    input through and weights stay FP, so each layer sees exactly the inputs it has when it alone
    is quantized. The attention cores must be switched on to be called at all."""
    set_quant_state(model, weight=False, act=True)
    set_observing(model, True)
    try:
        for first in range(0, len(data), batch_size):
            idx = torch.arange(first, min(first + batch_size, len(data)))
            family.forward(model, *_batch(data, idx, device))
    finally:
        set_observing(model, False)
        set_quant_state(model, weight=False, act=False)
    for _, module in [*quant_layers(model), *attention_cores(model)]:
        for q in module.act_quantizers():
            q.finalize()


def _batch(data: CalibrationData, idx: torch.Tensor, device):
    cond = {k: v[idx].to(device) for k, v in data.conditioning.items()}
    return data.samples[idx].to(device), data.timesteps[idx].to(device), cond


def _targets(model: nn.Module, config: GradientAlignedQuantizer):
    """(module, kind, bits) of every row: each layer's weights, each layer's inputs, each attention core."""
    targets = [(layer, "weight", config.weight_bits) for _, layer in quant_layers(model)
               if layer.weight_quantizer is not None]
    if config.act_bits:
        targets += [(layer, "activation", config.act_bits) for _, layer in quant_layers(model)
                    if layer.act_quantizer is not None]
        targets += [(core, "activation", config.act_bits) for _, core in attention_cores(model)]
    names = {module: name for name, module in model.named_modules()}
    return [(names[m], m, kind, bits) for m, kind, bits in targets]


def _measure(model, name, module, kind, bits, probe, sampler) -> SensitivityRow:
    """Switch on one quantizer kind of one module, measure, switch it off again."""
    flag = "use_weight_quant" if kind == "weight" else "use_act_quant"
    setattr(module, flag, True)
    try:
        row = SensitivityRow(_row_name(name), kind, bits, probe.noise_mse())
        if sampler is not None:
            row.psnr_db, row.mse = sampler.compare()
    finally:
        setattr(module, flag, False)
    return row


def _row_name(module_name: str) -> str:
    """An attention core is named after its attention module (``...attentions.0``), not the processor path."""
    return module_name.removesuffix(".processor.core")


class _NoiseProbe:
    """The model's noise prediction on a fixed subsample of the calibration data, against FP."""

    def __init__(self, model, family, data: CalibrationData, device):
        self.model, self.family, self.device = model, family, device
        n = len(data)
        # An even spread over the data (ordered by step) covers every calibration timestep.
        self.indices = torch.unique(torch.linspace(0, n - 1, min(NOISE_SAMPLES, n)).round().long())
        self.inputs = _batch(data, self.indices, device)
        self.reference = self._predict()

    @torch.no_grad()
    def _predict(self) -> torch.Tensor:
        return self.family.forward(self.model, *self.inputs).float()

    def noise_mse(self) -> float:
        return float((self._predict() - self.reference).pow(2).mean())


class _ImageProbe:
    """DDIM images of the (partly quantized) model from fixed noise, against the FP images."""

    def __init__(self, pipe, component: str, model, num_images: int, num_inference_steps: int, seed: int):
        self.pipe = rebuild_pipeline(pipe, component, model)
        self.num_images, self.steps, self.seed = num_images, num_inference_steps, seed
        self.reference = self._generate()  # every quantizer is off here: the FP images

    def _generate(self) -> np.ndarray:
        return generate(self.pipe, self.num_images, self.steps, self.seed)[0]

    def compare(self) -> tuple[float, float]:
        images = self._generate()
        mse = float(((images - self.reference) ** 2).mean())
        return sample_psnr(self.reference, images), mse


__all__ = ["SensitivityReport", "SensitivityRow", "analyze_sensitivity"]
