"""`import diffusers_gaq` is quiet: nothing on stdout or stderr (issue 16: the transformers warnings
about CLIPImageProcessor / SiglipImageProcessor came from importing StableDiffusionPipeline, which only
a Stable Diffusion user needs), and it registers the loader with diffusers."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


def test_import_writes_nothing():
    r = _run("import diffusers_gaq")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""


def test_quantizing_an_unconditional_pipeline_does_not_import_stable_diffusion():
    # The check of which family a pipeline belongs to used to import every family's pipeline class.
    r = _run("import sys, diffusers_gaq\n"
             "from diffusers_gaq.reference import load_reference_pipeline\n"
             "from diffusers_gaq.models import denoiser_of\n"
             "pipe = load_reference_pipeline(); pipe.set_progress_bar_config(disable=True)\n"
             "denoiser_of(pipe)\n"
             "print(sorted(m for m in sys.modules if m.endswith('pipeline_stable_diffusion')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
    assert "torchvision" not in r.stderr


def test_import_registers_the_quantizer_with_diffusers():
    r = _run("import diffusers_gaq\nfrom diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
             "print('diffusers_gaq' in AUTO_QUANTIZER_MAPPING)")
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
