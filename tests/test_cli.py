"""The diffusers-gaq command line, run as users run it (real subprocesses, the embedded reference)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "diffusers_gaq", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "w4a8"
    r = cli("quantize", "reference", "--weight-bits", "4", "--act-bits", "8", "--budget", "tiny", "--quiet",
            "--output", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_help_lists_every_command():
    r = cli("--help")
    assert r.returncode == 0
    for command in ("quantize", "evaluate", "push", "info", "demo"):
        assert command in r.stdout
    r = cli("quantize", "--help")
    for flag in ("--weight-bits", "--act-bits", "--config", "--output", "--overwrite", "--budget"):
        assert flag in r.stdout


def test_quantize_writes_a_pipeline_folder(quantized):
    for name in ("model_index.json", "README.md", "unet/quantization_config.json",
                 "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (quantized / name).is_file(), name


def test_info_describes_the_checkpoint(quantized):
    r = cli("info", str(quantized))
    assert r.returncode == 0, r.stderr
    assert "UNet2DModel" in r.stdout and "W4A8" in r.stdout and "quantized" in r.stdout


def test_evaluate_writes_a_report(quantized, tmp_path):
    r = cli("evaluate", str(quantized), "--num-images", "8", "--num-inference-steps", "5", "--report", str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["baseline"] == "reference"
    row = report["models"][0]
    assert row["name"] == quantized.name and row["psnr_db"] > 5 and 0 < row["ssim"] <= 1
    assert row["fid_ref"] > 0 and report["fp"]["fid_ref"] > 0  # the reference pipeline defines FID-ref
    assert (tmp_path / "comparison.png").is_file() and "| FP |" in r.stdout


def test_non_empty_output_is_refused_before_any_work(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = cli("quantize", "reference", "--budget", "tiny", "--output", str(tmp_path))
    assert r.returncode != 0
    assert "not empty" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_bad_bits_give_one_line_error(tmp_path):
    r = cli("quantize", "reference", "--weight-bits", "9", "--output", str(tmp_path / "x"))
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and "weight_bits" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("--verbose", "quantize", "reference", "--weight-bits", "9", "--output", str(tmp_path / "x"))
    assert "Traceback" in r.stderr


def test_info_on_a_non_checkpoint_fails_cleanly(tmp_path):
    r = cli("info", str(tmp_path))
    assert r.returncode == 1 and "not a diffusers-gaq checkpoint" in r.stderr


def test_push_refuses_a_bad_repo_id(quantized):
    r = cli("push", str(quantized), "not a repo id!!")
    assert r.returncode == 1 and "error:" in r.stderr


def test_readme_quickstart_runs():
    env = dict(ENV, GAQ_BUDGET="tiny")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                       env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bit-identical: True" in r.stdout
