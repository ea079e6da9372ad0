"""The embedded reference pipeline: a small DDPM trained on Fashion-MNIST by this project.

It ships inside the package so that the demo, the tests and the benchmarks run offline,
and it loads through diffusers' ordinary ``from_pretrained`` on a packaged folder.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
PIPELINE_DIR = ASSETS / "pipeline"
CLASSIFIER_DIR = ASSETS / "classifier"

RETRAIN_HINT = "retrain it with `make reference` (python -m diffusers_gaq.reference.train all)"


def reference_pipeline_path() -> Path:
    """The packaged DDIMPipeline folder (model_index.json, unet/, scheduler/)."""
    if not (PIPELINE_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the reference pipeline is missing from {PIPELINE_DIR}; {RETRAIN_HINT}")
    return PIPELINE_DIR


def load_reference_pipeline(**kwargs):
    """Return the reference ``diffusers.DDIMPipeline`` (1x32x32 Fashion-MNIST DDPM, EMA weights).

    Loaded with ``DDIMPipeline.from_pretrained`` from the package folder; no network is used,
    so it works with ``HF_HUB_OFFLINE=1``. Keyword arguments go to ``from_pretrained``.
    """
    from diffusers import DDIMPipeline

    kwargs.setdefault("local_files_only", True)
    return DDIMPipeline.from_pretrained(str(reference_pipeline_path()), **kwargs)


@lru_cache(maxsize=1)
def load_reference_classifier():
    """The FID-ref feature network (eval mode, cached)."""
    from .classifier import FashionClassifier

    if not (CLASSIFIER_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the FID-ref classifier is missing from {CLASSIFIER_DIR}; {RETRAIN_HINT}")
    return FashionClassifier.from_pretrained(CLASSIFIER_DIR).requires_grad_(False)


@lru_cache(maxsize=1)
def load_reference_statistics():
    """(mu, sigma) of the classifier features of the real Fashion-MNIST test split (float64 numpy)."""
    from safetensors.numpy import load_file

    stats = load_file(str(CLASSIFIER_DIR / "fid_stats_test.safetensors"))
    return stats["mu"], stats["sigma"]


__all__ = ["load_reference_pipeline", "load_reference_classifier", "load_reference_statistics", "reference_pipeline_path"]
