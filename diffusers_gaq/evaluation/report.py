"""One comparison of several quantized pipelines against their FP pipeline: a table and a grid.

Every row is sampled with the same SamplingPlan as the FP pipeline (the same noise and conditioning),
so PSNR and SSIM are per-image fidelity to FP; FID-ref (a distribution metric) is added where the FP
model is the embedded reference pipeline, whose classifier defines it. Sizes are the denoiser's
weights: the quantized checkpoint's file against the FP model's float tensors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import fid_reference, image_grid, sample_psnr
from .sampling import SamplingPlan, paired_samples, pipeline_kind
from .ssim import sample_ssim

logger = logging.getLogger(__name__)

MIB = 2**20


@dataclass
class Row:
    name: str
    seconds_per_image: float
    weights_mib: float
    psnr_db: float | None = None
    ssim: float | None = None
    fid_ref: float | None = None
    size_vs_fp: float | None = None
    calibration_seconds: float | None = None


@dataclass
class Comparison:
    baseline: str
    how: str
    fp: Row
    rows: list[Row] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "how": self.how, "fp": asdict(self.fp),
                "models": [asdict(r) for r in self.rows]}

    def card_entry(self, row: Row) -> dict:
        """The flat numbers a model card shows for one quantized row (hub._evaluation_rows)."""
        entry = {"baseline": self.baseline, "psnr_db": row.psnr_db, "ssim": row.ssim,
                 "fid_ref_fp": self.fp.fid_ref, "fid_ref_quantized": row.fid_ref,
                 "seconds_per_image_fp": self.fp.seconds_per_image, "seconds_per_image_quantized": row.seconds_per_image,
                 "how": self.how}
        return {k: v for k, v in entry.items() if v is not None}

    def to_markdown(self) -> str:
        fid = self.fp.fid_ref is not None
        calib = any(r.calibration_seconds is not None for r in self.rows)
        head = ["model", "PSNR vs FP (dB)", "SSIM vs FP"] + (["FID-ref"] if fid else []) + \
               ["s / image", "weights (MiB)", "size vs FP"] + (["calibration (s)"] if calib else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in [self.fp, *self.rows]:
            cells = [r.name, _fmt(r.psnr_db, ".2f"), _fmt(r.ssim, ".4f")] + ([_fmt(r.fid_ref, ".2f")] if fid else []) + \
                    [_fmt(r.seconds_per_image, ".3f"), _fmt(r.weights_mib, ".3f"),
                     "1.00x" if r is self.fp else _fmt(r.size_vs_fp, ".2f", "x")] + \
                    ([_fmt(r.calibration_seconds, ".0f")] if calib else [])
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + f"\n\n{self.how}.\n"

    def grid(self, per_row: int = 8):
        """One row of images per model (FP first), the same noise down each column."""
        from PIL import Image

        strips = [image_grid(self.images[name][:per_row], nrow=per_row) for name in [self.fp.name, *(r.name for r in self.rows)]]
        width = max(s.width for s in strips)
        out = Image.new(strips[0].mode, (width, sum(s.height for s in strips)), 255 if strips[0].mode == "L" else (255,) * 3)
        y = 0
        for strip in strips:
            out.paste(strip, (0, y))
            y += strip.height
        return out

    def write(self, folder: Path) -> None:
        from ..files import atomic_path, atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "evaluation.json", json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write_text(folder / "evaluation.md", self.to_markdown())
        with atomic_path(folder / "comparison.png") as tmp:
            self.grid().save(tmp, format="PNG")


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def fp_weights_mib(model) -> float:
    """The FP denoiser's tensors as they would be saved (float32 / float16 as they are)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / MIB


def compare_pipelines(fp_pipe, quantized: dict, plan: SamplingPlan, *, baseline: str, fid: bool,
                      weights_mib: dict[str, float], calibration_seconds: dict[str, float | None] | None = None,
                      progress: bool = False) -> Comparison:
    """``quantized``: name -> quantized pipeline of fp_pipe's model; ``weights_mib``: name -> size of
    its saved denoiser weights. FID-ref only with ``fid`` (the reference pipeline's 32x32 images)."""
    from ..models import denoiser_of

    kind = pipeline_kind(fp_pipe)
    for name, qpipe in quantized.items():
        if pipeline_kind(qpipe) != kind:
            raise ValueError(f"{name} is a {pipeline_kind(qpipe)} pipeline but the baseline {baseline} is {kind}; "
                             "compare a quantized pipeline with the FP pipeline it was made from (--baseline)")
    logger.info("sampling the FP pipeline: %s", plan.describe(kind))
    fp_images, fp_seconds = paired_samples(fp_pipe, plan, progress)
    fp_mib = fp_weights_mib(denoiser_of(fp_pipe)[2])
    fp_row = Row("FP", fp_seconds / plan.num_images, fp_mib, fid_ref=fid_reference(fp_images) if fid else None)
    result = Comparison(baseline, plan.describe(kind), fp_row, images={"FP": fp_images})
    for name, qpipe in quantized.items():
        logger.info("sampling %s", name)
        images, seconds = paired_samples(qpipe, plan, progress)
        if images.shape != fp_images.shape:
            raise ValueError(f"{name} samples images of shape {images.shape[1:]}, the baseline {baseline} "
                             f"{fp_images.shape[1:]}: they are not the same model")
        result.rows.append(Row(name, seconds / plan.num_images, weights_mib[name], psnr_db=sample_psnr(fp_images, images),
                               ssim=sample_ssim(fp_images, images), fid_ref=fid_reference(images) if fid else None,
                               size_vs_fp=weights_mib[name] / fp_mib,
                               calibration_seconds=(calibration_seconds or {}).get(name)))
        result.images[name] = images
    return result


__all__ = ["Comparison", "Row", "compare_pipelines", "fp_weights_mib"]
