"""The paired benchmark of issue 13 (examples/benchmark_methods.py): both weightings of one seed
calibrate on the same tensors (the report's data digest says so), and the `paired` report refuses
rows whose digests differ and pools the pairs of every bit width into one relative interval."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffusers_gaq import quantize_pipeline

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_methods", ROOT / "examples" / "benchmark_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_weightings_of_a_seed_see_the_same_calibration_tensors(tiny_pipe, tiny_quantizer):
    digest = {}
    for weighting, seed in (("uniform", 0), ("gradient_aligned", 0), ("gradient_aligned", 1)):
        qpipe = quantize_pipeline(tiny_pipe, tiny_quantizer(weighting=weighting, seed=seed), progress=False)
        digest[weighting, seed] = qpipe.unet.gaq_report.data_digest
    assert digest["uniform", 0] == digest["gradient_aligned", 0]
    assert digest["gradient_aligned", 1] != digest["gradient_aligned", 0]  # another seed, other trajectories


def _row(method, bits, seed, fid, digest, psnr=20.0):
    return {"method": method, "bits": bits, "seed": seed, "budget": "demo", "num_images": 1000, "variant": "",
            "fid_ref": fid, "psnr_db": psnr, "data_digest": digest}


def _paired(module, rows, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module.paired(SimpleNamespace(jsonl=str(path), a="uniform", b="gradient_aligned", variant="", num_images=1000))


def test_paired_report_refuses_unpaired_rows_and_pools_relative_differences(tmp_path, capsys):
    module = _benchmark_module()
    fp = dict(method="fp", bits="fp", seed=0, budget="demo", num_images=1000, variant="", fid_ref=40.0, psnr_db=None)
    rows = [fp]
    # uniform's excess over FP is 10 at w4a8 and 20 at w4a4; gradient-aligned removes 40 % / 30 % / 50 % of it
    for bits, excess, gains in (("w4a8", 10.0, (0.4, 0.3)), ("w4a4", 20.0, (0.5, 0.4))):
        for seed, gain in enumerate(gains):
            rows += [_row("uniform", bits, seed, 40.0 + excess, f"d{bits}{seed}"),
                     _row("gradient_aligned", bits, seed, 40.0 + (1 - gain) * excess, f"d{bits}{seed}")]
    _paired(module, rows, tmp_path)
    out = capsys.readouterr().out
    assert "| w4a8 | 2 | -3.50" in out and "| w4a4 | 2 | -9.00" in out
    assert "All 4 pairs" in out and "= -0.400" in out  # mean of -0.4, -0.3, -0.5, -0.4

    rows[-1]["data_digest"] = "other"  # the last pair calibrated on different data
    with pytest.raises(SystemExit, match="not paired"):
        _paired(module, rows, tmp_path)
