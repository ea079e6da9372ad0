"""Reliability: early validation, determinism, bad input, divergence.

Every fault here is one a user can meet: a config or calibration set that cannot work, a
non-empty output folder, too little disk space, a tampered saved model, a unit whose
reconstruction diverges. Each must end in a clear error before any work is spent, or in the
documented recovery, and never damage a file that already exists. docs/reliability.md lists them;
the checkpoint faults (resume, damaged or mismatched checkpoint folders) are in test_checkpointing.py.

Most tests quantize conftest's tiny_pipe, a very small random-weight UNet (about 2 s per run at one
thread).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from helpers import checkpoint_manifest, reliability_config, snapshot
from hypothesis import HealthCheck, given, settings
from test_config import one_invalid  # the config strategies, shared

from diffusers_gaq import GradientAlignedQuantizer, cli, quantize_pipeline
from diffusers_gaq.calibration import calibrate as calibrate_module
from diffusers_gaq.calibration.data import CalibrationData
from diffusers_gaq.calibration.store import CAPTURE_PREFIX, remove_stale_captures
from diffusers_gaq.checkpointing import DATA_NAME, STATE_NAME
from diffusers_gaq.files import atomic_directory
from diffusers_gaq.hub import build_model_card
from diffusers_gaq.modeling import save_quantized_pipeline
from diffusers_gaq.quant.layers import QuantLayer
from diffusers_gaq.serialization import CheckpointError

torch.set_num_threads(1)


# ---- determinism -------------------------------------------------------------------------------
def test_two_identical_runs_write_byte_identical_files(tiny_pipe, tiny_qpipe, tmp_path):
    again = quantize_pipeline(tiny_pipe, reliability_config(), progress=False)
    tiny_qpipe.unet.save_pretrained(tmp_path / "a", model_card=False)
    again.unet.save_pretrained(tmp_path / "b", model_card=False)
    # The report holds timings; everything else must match byte for byte.
    for name in ("diffusion_pytorch_model.safetensors", "quantization_config.json", "config.json",
                 "calibration_report.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ---- saved models ---------------------------------------------------------------------------
def test_pipeline_save_refuses_a_non_empty_folder_and_keeps_it(tiny_qpipe, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="not empty"):
        save_quantized_pipeline(tiny_qpipe, tmp_path)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("edit", ["weight_shape", "config"])
def test_tampered_checkpoint_shapes_are_refused_on_load(tiny_qpipe, tmp_path, edit):
    """quantization_config.json records every layer's weight shape; a file edited to disagree with
    config.json (or config.json edited to build another model) is refused, naming the layer."""
    from diffusers_gaq.modeling import load_quantized

    folder = tiny_qpipe.unet.save_pretrained(tmp_path / "saved", model_card=False)
    if edit == "weight_shape":
        qcfg = json.loads((folder / "quantization_config.json").read_text())
        qcfg["layers"]["conv_in"]["weight_shape"] = [9, 1, 3, 3]
        (folder / "quantization_config.json").write_text(json.dumps(qcfg))
    else:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["block_out_channels"] = [16, 16]
        (folder / "config.json").write_text(json.dumps(cfg))
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=r"layer conv_in is recorded with weight shape .* the two files disagree"):
        load_quantized(folder)
    assert snapshot(folder) == before


# ---- early validation --------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=one_invalid())
def test_invalid_config_is_refused_before_any_work(tiny_pipe, no_sampling, tmp_path, case):
    """A config made valid, then edited into an invalid one (validation on construction is passed by):
    quantize_pipeline refuses it naming the field, before sampling and before writing a checkpoint."""
    name, kw = case
    config = GradientAlignedQuantizer()
    for field, value in kw.items():
        setattr(config, field, value)
    directory = tmp_path / f"ckpt-{time.perf_counter_ns()}"
    with pytest.raises(ValueError) as e:
        quantize_pipeline(tiny_pipe, config, progress=False, checkpoint_dir=directory)
    assert name in str(e.value)
    assert not directory.exists()


def test_nan_calibration_data_is_refused_before_any_work(tiny_pipe, no_sampling, tmp_path):
    good = CalibrationData(torch.randn(4, 1, 16, 16), torch.tensor([999, 999, 500, 500]), torch.tensor([0, 0, 1, 1]),
                           torch.tensor([0, 0, 1, 1]), torch.tensor([False, True, False, True]))
    bad = CalibrationData(**{**good.__dict__, "samples": good.samples.clone()})
    bad.samples[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf in 1 of 4 samples"):
        quantize_pipeline(tiny_pipe, reliability_config(), calibration_data=bad, progress=False,
                          checkpoint_dir=tmp_path / "c")
    wrong = CalibrationData(**{**good.__dict__, "samples": torch.randn(4, 3, 16, 16)})
    with pytest.raises(ValueError, match="3 channels; the model expects 1"):
        quantize_pipeline(tiny_pipe, reliability_config(), calibration_data=wrong, progress=False,
                          checkpoint_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_unsupported_pipeline_and_device_are_refused_before_any_work(tiny_pipe, no_sampling):
    with pytest.raises(TypeError, match="supported pipelines"):
        quantize_pipeline(object(), reliability_config())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            quantize_pipeline(tiny_pipe, reliability_config(device="cuda"))


def _cli(args, capsys) -> tuple[int, str]:
    """The command line in-process (fast: every case here stops before loading the model)."""
    code = cli.main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("make_args, expected", [
    (lambda d: ["--output", str(d / "out"), "--resume"], "needs checkpoint_dir"),
    (lambda d: ["--output", str(d / "out"), "--checkpoint-dir", str(d / "out" / "ckpt")], "inside --output"),
    (lambda d: ["--output", str(d / "busy")], "not empty"),
    (lambda d: ["--output", str(d / "out"), "--checkpoint-dir", str(d / "old-ckpt")], "--resume"),
    (lambda d: ["--output", str(d / "out"), "--weight-bits", "1"], "weight_bits"),
    (lambda d: ["--output", str(d / "out"), "--device", "cuda:0"] if not torch.cuda.is_available()
     else ["--output", str(d / "out"), "--device", "tpu"], "device"),
], ids=["resume-without-dir", "checkpoint-in-output", "non-empty-output", "existing-checkpoint", "bad-bits",
        "bad-device"])
def test_cli_refuses_before_loading_anything(tmp_path, capsys, no_loading, make_args, expected):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    (tmp_path / "old-ckpt").mkdir()
    (tmp_path / "old-ckpt" / DATA_NAME).write_bytes(b"an earlier run's data")
    before = snapshot(tmp_path)
    code, err = _cli(["quantize", "reference", "--budget", "tiny", *make_args(tmp_path)], capsys)
    assert code == 1 and err.startswith("error:") and expected in err, err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert snapshot(tmp_path) == before


def test_too_little_disk_space_is_refused_before_any_work(tiny_pipe, tmp_path, capsys, no_loading, no_sampling):
    full = SimpleNamespace(total=2**40, used=2**40 - 2**20, free=2**20)  # 1 MiB free
    with mock.patch("shutil.disk_usage", return_value=full):
        code, err = _cli(["quantize", "reference", "--output", str(tmp_path / "out")], capsys)
        assert code == 1 and "free" in err, err
        with pytest.raises(OSError, match="the calibration checkpoint needs about"):
            quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert not any(tmp_path.iterdir())


def test_cli_refuses_a_malformed_hub_id_before_loading(tmp_path, capsys, no_loading):
    code, err = _cli(["quantize", "not a/valid//id", "--output", str(tmp_path / "out")], capsys)
    assert code == 1 and "not a Hub id" in err and "namespace/name" in err, err


# ---- divergence --------------------------------------------------------------------------------
NAN_UNIT, BLOWN_UNIT = "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0"


def test_diverging_units_fall_back_to_round_to_nearest(tiny_pipe, tmp_path):
    """Two faults in one run: one unit's loss turns NaN during reconstruction, another's
    reconstruction ends far worse than round-to-nearest (its step sizes blown up). Both keep
    round-to-nearest, say so in the report, the checkpoint and the model card, and the model still
    samples finite images."""
    real = calibrate_module.reconstruct

    def faulty(problem, *args, **kwargs):
        if problem.name == NAN_UNIT:
            losses = problem.losses
            problem.losses = lambda idx, params=None: losses(idx, params) * float("nan")
            try:
                return real(problem, *args, **kwargs)
            finally:
                del problem.losses  # back to the method
        curve = real(problem, *args, **kwargs)
        if problem.name == BLOWN_UNIT:
            with torch.no_grad():
                for q in problem.act_quantizers():
                    q.scale.mul_(1e4)  # every input rounds to zero
        return curve

    with mock.patch.object(calibrate_module, "reconstruct", faulty):
        qpipe = quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=tmp_path / "ckpt")

    units = {u.name: u for u in qpipe.unet.gaq_report.units}
    fell_back = {name: u.fallback for name, u in units.items() if u.fallback}
    assert set(fell_back) == {NAN_UNIT, BLOWN_UNIT}, fell_back
    assert fell_back[NAN_UNIT].startswith("round-to-nearest") and "became nan" in fell_back[NAN_UNIT]
    assert fell_back[BLOWN_UNIT].startswith("round-to-nearest") and "reconstruction loss" in fell_back[BLOWN_UNIT]
    for name in fell_back:
        unit = units[name]
        # Round-to-nearest is where the unit started: the same loss, the codes of the nearest rounding.
        assert math.isfinite(unit.loss_final) and unit.loss_final == pytest.approx(unit.loss_init, rel=1e-4)
        for layer in qpipe.unet.get_submodule(name).modules():
            if isinstance(layer, QuantLayer) and layer.weight_quantizer is not None:
                wq, w = layer.weight_quantizer, layer.layer.weight
                scale, zp = wq._view(wq.scale, w), wq._view(wq.zero_point, w)
                nearest = torch.clamp(torch.round(w / scale) + zp, 0, 2**wq.bits - 1).to(torch.uint8)
                assert torch.equal(wq.codes, nearest), name
    # The checkpoint written after the fallbacks records them (and could be written: no NaN).
    state = checkpoint_manifest(tmp_path / "ckpt" / STATE_NAME)
    recorded = {u["name"]: u["fallback"] for u in state["units"] if u["fallback"]}
    assert recorded == fell_back

    images = qpipe(batch_size=2, num_inference_steps=3, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(torch.from_numpy(images)).all()

    card = str(build_model_card(qpipe.unet))
    assert "Reconstruction diverged for 2 unit(s)" in card and f"`{NAN_UNIT}`" in card and f"`{BLOWN_UNIT}`" in card
    qpipe.unet.save_pretrained(tmp_path / "saved")  # the saved card, and the report a reload rebuilds it from
    assert f"`{BLOWN_UNIT}`" in (tmp_path / "saved" / "README.md").read_text()
    report = json.loads((tmp_path / "saved" / "calibration_report.json").read_text())
    assert {u["name"] for u in report["units"] if u.get("fallback")} == set(fell_back)


def test_a_healthy_run_has_no_fallback(tiny_qpipe):
    assert not any(u.fallback for u in tiny_qpipe.unet.gaq_report.units)
    assert "Reconstruction diverged" not in str(build_model_card(tiny_qpipe.unet))


# ---- temporaries -------------------------------------------------------------------------------
def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_sigterm_unwinds_a_save_like_ctrl_c(tmp_path):
    """The CLI turns SIGTERM into an interrupt: a save being built removes its hidden folder (the
    default SIGTERM ended the process on the spot and left `.NAME.tmp-*` behind for good)."""
    target, before = tmp_path / "out", signal.getsignal(signal.SIGTERM)
    with pytest.raises(cli.Terminated), cli.sigterm_as_interrupt():
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert not list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the command's only


def test_temporaries_of_runs_that_are_gone_are_removed_by_the_next_run(tmp_path):
    """What SIGKILL leaves (a save's hidden folder, disk-backed captures) is removed by the next save
    or calibration when its process is gone; a live run's temporaries and unknown names are kept."""
    host, dead, live = socket.gethostname(), _dead_pid(), os.getpid()
    for base in (".out.tmp-", CAPTURE_PREFIX):
        (tmp_path / f"{base}{dead}@{host}-abc").mkdir()
        (tmp_path / f"{base}{live}@{host}-def").mkdir()
        (tmp_path / f"{base}{dead}@another-host-ghi").mkdir()
    (tmp_path / ".out.tmp-old_name").mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    remove_stale_captures(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", ".out.tmp-old_name"] + [f"{base}{pid}" for base in (".out.tmp-", CAPTURE_PREFIX)
                                                          for pid in (f"{live}@{host}-def", f"{dead}@another-host-ghi")])
