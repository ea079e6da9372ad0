"""examples/gpu_check.py (issue 17's GPU check) on the CPU with its tiny preset: every part runs, the
round trip is bit-exact, the JSON holds what the GPU run will record. The GPU run itself needs a GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import gpu_check  # noqa: E402

torch.set_num_threads(1)


def test_gpu_check_tiny_preset_on_cpu(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    trip = result["round_trip"]
    assert trip["ok"] and trip["state_bit_exact"] and trip["images_bit_exact"] and trip["parameters_on_device"]
    rt = result["runtime"]
    assert rt["ok"] and set(rt["rows"]) == {"fp32", "fp16", "bf16", "simulated-w4a8", "runtime-w4a8"}
    assert rt["rows"]["runtime-w4a8"]["weights_vs_fp32"] < 0.5 and rt["rows"]["fp32"]["speed_vs_fp32"] == 1
    rows = result["scale"]["rows"]
    assert [r["model"] for r in rows] == ["tiny-test"] and rows[0]["device"] == "cpu"
    assert rows[0]["timed_units"] and rows[0]["checkpoint_ratio_vs_fp32"] < 0.5
    assert (tmp_path / "benchmark_scale.jsonl").is_file()
    demo = result["cifar_demo"]
    assert demo["ok"] and demo["units"] > 0 and demo["config"]["device"] == "cpu" and demo["wall_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        gpu_check.main(["--device", "cuda", "--out", str(tmp_path)])
    assert err.value.code == 2 and "no CUDA device" in capsys.readouterr().err
