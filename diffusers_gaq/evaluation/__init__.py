"""Fidelity metrics: FID-ref (distribution) and PSNR against FP samples (per sample).

Both take images as diffusers pipelines return them: a list of PIL images or a numpy
array [N, H, W, C] (or [N, H, W]) with values in [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

# Identical images have infinite PSNR; cap each image's value so means stay finite.
PSNR_CAP_DB = 100.0


def images_to_array(images) -> np.ndarray:
    """PIL list / numpy / torch -> float64 numpy [N, H, W, C] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        arr = images.astype(np.float64)
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4:
            raise ValueError(f"expected images of shape [N, H, W, C] or [N, H, W], got {images.shape}")
        if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
            raise ValueError(
                f"image values must lie in [0, 1] (got {arr.min():.3g}..{arr.max():.3g}); "
                "pass pipeline output (output_type='np' or 'pil'), not model-range tensors"
            )
        return arr
    if isinstance(images, Sequence) and len(images) and hasattr(images[0], "mode"):
        arrs = [np.asarray(im, dtype=np.float64) / 255.0 for im in images]
        return np.stack([a[..., None] if a.ndim == 2 else a for a in arrs])
    raise TypeError(f"expected a list of PIL images or an array in [0, 1], got {type(images).__name__}")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), computed through symmetric
    eigen-decompositions (Tr (S1 S2)^1/2 = sum sqrt eig(S1^1/2 S2 S1^1/2)), which stays
    real and stable for nearly singular covariances."""
    evals, evecs = np.linalg.eigh(sigma1)
    sqrt_s1 = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    cross = np.linalg.eigvalsh(sqrt_s1 @ sigma2 @ sqrt_s1)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


@torch.no_grad()
def reference_features(images, batch_size: int = 500) -> np.ndarray:
    """Penultimate-layer features of the reference classifier, [N, 128]."""
    from ..reference import load_reference_classifier

    arr = images_to_array(images)
    if arr.shape[-1] != 1:  # the classifier sees grayscale
        arr = arr.mean(-1, keepdims=True)
    if arr.shape[1:3] != (32, 32):
        raise ValueError(f"FID-ref expects 32x32 images (the reference pipeline's size), got {arr.shape[1:3]}")
    x = torch.from_numpy(arr.transpose(0, 3, 1, 2)).float() * 2 - 1
    model = load_reference_classifier()
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def fid_reference(images) -> float:
    """FID-ref: Fréchet distance between the reference classifier's features of ``images``
    and the shipped statistics of the real Fashion-MNIST test split (10k images)."""
    from ..reference import load_reference_statistics

    feats = reference_features(images)
    if len(feats) < 2:
        raise ValueError("FID-ref needs at least 2 images")
    mu_ref, sigma_ref = load_reference_statistics()
    return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_ref, sigma_ref)


def sample_psnr(reference_images, images, per_image: bool = False):
    """Mean PSNR (dB, peak 1.0) between paired images, each image capped at PSNR_CAP_DB."""
    ref, img = images_to_array(reference_images), images_to_array(images)
    if ref.shape != img.shape:
        raise ValueError(f"paired images must have the same shape: {ref.shape} vs {img.shape}")
    mse = ((ref - img) ** 2).reshape(len(ref), -1).mean(1)
    with np.errstate(divide="ignore"):
        psnr = np.minimum(10 * np.log10(1.0 / mse), PSNR_CAP_DB)
    return psnr if per_image else float(psnr.mean())


def image_grid(images, nrow: int | None = None):
    """A PIL grid of images (2-pixel gaps), for docs and demos."""
    from PIL import Image

    arr = images_to_array(images)
    n, h, w, c = arr.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.ones((ncol * (h + 2) + 2, nrow * (w + 2) + 2, c))
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = arr[i]
    grid = (grid * 255).round().astype(np.uint8)
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def as_ddim(pipe):
    """The same models under a deterministic DDIM scheduler (eta = 0), for paired comparisons.
    Unconditional pipelines only (DDIM, DDPM, LDM): they all sample with ``pipe(batch_size=...)``."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, LDMPipeline

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if isinstance(pipe, LDMPipeline):
        return LDMPipeline(vqvae=pipe.vqvae, unet=pipe.unet, scheduler=scheduler)
    if isinstance(pipe, (DDIMPipeline, DDPMPipeline)):
        return DDIMPipeline(unet=pipe.unet, scheduler=scheduler)
    raise TypeError(f"fidelity evaluation samples unconditional pipelines (DDIMPipeline, DDPMPipeline, LDMPipeline), "
                    f"not {type(pipe).__name__}; sample the FP and the quantized pipeline with the same generator "
                    "and compare them with diffusers_gaq.evaluation.sample_psnr")


@torch.no_grad()
def generate(pipe, num_images: int, num_inference_steps: int = 50, seed: int = 0, batch_size: int = 250,
             progress: bool = False) -> tuple[np.ndarray, float]:
    """``num_images`` DDIM samples (eta = 0) as numpy [N, H, W, C]; batch b uses seed + b, so two
    pipelines given the same arguments start from the same noise. Returns (images, seconds)."""
    import time

    pipe = as_ddim(pipe)
    pipe.set_progress_bar_config(disable=not progress)
    out, start = [], time.perf_counter()
    for b, first in enumerate(range(0, num_images, batch_size)):
        n = min(batch_size, num_images - first)
        gen = torch.Generator().manual_seed(seed + b)
        out.append(pipe(batch_size=n, num_inference_steps=num_inference_steps, generator=gen, eta=0.0,
                        output_type="np").images)
    return np.concatenate(out), time.perf_counter() - start


def compare(fp_pipe, q_pipe, num_images: int = 256, num_inference_steps: int = 50, seed: int = 0,
            fid: bool = True, batch_size: int = 250) -> dict:
    """FP against quantized from the same noise: PSNR, FID-ref of both (reference pipeline only),
    sampling times. Returns a dict of numbers plus the two image arrays under "images"."""
    fp_images, fp_seconds = generate(fp_pipe, num_images, num_inference_steps, seed, batch_size)
    q_images, q_seconds = generate(q_pipe, num_images, num_inference_steps, seed, batch_size)
    result = {
        "num_images": num_images,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "psnr_db": sample_psnr(fp_images, q_images),
        "fp_sampling_seconds": fp_seconds,
        "quantized_sampling_seconds": q_seconds,
        "how": f"{num_images} images, DDIM eta=0, {num_inference_steps} steps, same initial noise (seed {seed})",
    }
    if fid:
        result["fid_ref_fp"] = fid_reference(fp_images)
        result["fid_ref_quantized"] = fid_reference(q_images)
    result["images"] = {"fp": fp_images, "quantized": q_images}
    return result
