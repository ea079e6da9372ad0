"""Reliability: resumable calibration, early validation, atomic writes, determinism, bad input.

Every fault here is one a user can meet: a run killed half-way, a checkpoint folder reused with
other settings, a corrupt or truncated file, NaN data, a non-empty output folder, a unit whose
reconstruction diverges. Each must end in a clear error before any work is spent, or in the
documented recovery, and never damage a file that already exists. docs/reliability.md lists them.

Most tests quantize a very small random-weight UNet in-process (about 2 s per run at one thread);
the SIGKILL test runs the real command line on the embedded reference pipeline (about 80 s).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from hypothesis import HealthCheck, given, settings
from safetensors import safe_open
from test_config import one_invalid, valid_kwargs  # the config strategies, shared

from diffusers_gaq import GradientAlignedQuantizer, cli, quantize_pipeline
from diffusers_gaq import quantize as pipeline_module
from diffusers_gaq.calibration import calibrate as calibrate_module
from diffusers_gaq.calibration.data import CalibrationData
from diffusers_gaq.checkpointing import (
    DATA_NAME,
    STATE_NAME,
    CalibrationCheckpoint,
    CheckpointMismatchError,
    config_fingerprint,
    describe_mismatch,
)
from diffusers_gaq.hub import build_model_card
from diffusers_gaq.quant.layers import QuantLayer
from diffusers_gaq.reference.recipe import REFERENCE_SCHEDULER_CONFIG, REFERENCE_UNET_CONFIG
from diffusers_gaq.serialization import CheckpointError, quantized_state_dict
from diffusers_gaq.modeling import save_quantized_pipeline

torch.set_num_threads(1)
logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
# The reference UNet's block types (attention, skip concatenation, time embedding) at a size that
# calibrates in about 2 s: 17 reconstruction units.
SMALL_UNET = dict(REFERENCE_UNET_CONFIG, sample_size=16, block_out_channels=(8, 16), layers_per_block=1,
                  norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
TINY = dict(num_inference_steps=4, num_calibration_timesteps=2, samples_per_timestep=4, num_groups=2,
            val_fraction=0.25, calibration_batch_size=8, recon_iters=2, recon_batch_size=8, meta_iters=1,
            meta_batch_size=8,
            first_last_precision="same")  # conv_in quantized too: the tampering tests edit its entry
INTERRUPT_AT = 3  # the unit after which the interrupted runs stop


def _pipeline(seed: int = 0, **unet_changes) -> DDIMPipeline:
    torch.manual_seed(seed)
    unet = UNet2DModel(**dict(SMALL_UNET, **unet_changes)).eval()
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**REFERENCE_SCHEDULER_CONFIG))


def _config(**changes) -> GradientAlignedQuantizer:
    return GradientAlignedQuantizer(**dict(TINY, **changes))


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to show that nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["gaq_calibration_checkpoint"])


class _Interrupted(Exception):
    """Stands for a crash: raised right after a checkpoint was written."""


def _interrupted_run(pipe, config, directory: Path, after_unit: int | None) -> None:
    """Run with a checkpoint and stop right after unit ``after_unit`` was saved (None: right after
    the calibration data was saved)."""
    save_data, save_unit = CalibrationCheckpoint.save_data, CalibrationCheckpoint.save_unit

    def data_then_stop(self, *args, **kwargs):
        save_data(self, *args, **kwargs)
        if after_unit is None:
            raise _Interrupted

    def unit_then_stop(self, index, *args, **kwargs):
        save_unit(self, index, *args, **kwargs)
        if index == after_unit:
            raise _Interrupted

    with mock.patch.object(CalibrationCheckpoint, "save_data", data_then_stop), \
            mock.patch.object(CalibrationCheckpoint, "save_unit", unit_then_stop), pytest.raises(_Interrupted):
        quantize_pipeline(pipe, config, progress=False, checkpoint_dir=directory)


@pytest.fixture(scope="module")
def pipe() -> DDIMPipeline:
    return _pipeline()


@pytest.fixture(scope="module")
def uninterrupted(pipe) -> DDIMPipeline:
    """The run every resumed run must reproduce bit for bit (no checkpoint folder at all)."""
    return quantize_pipeline(pipe, _config(), progress=False)


@pytest.fixture(scope="module")
def partial_checkpoint(pipe, tmp_path_factory) -> Path:
    """A checkpoint folder left by a run stopped after unit INTERRUPT_AT; tests copy it before use."""
    directory = tmp_path_factory.mktemp("partial") / "ckpt"
    _interrupted_run(pipe, _config(), directory, INTERRUPT_AT)
    return directory


@pytest.fixture
def checkpoint(partial_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(partial_checkpoint, tmp_path / "ckpt"))


@pytest.fixture
def no_sampling():
    """Fails the test if calibration data is collected or a model wrapped: the error had to come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the input was refused")

    with mock.patch.object(pipeline_module, "collect_calibration_data", forbidden), \
            mock.patch.object(pipeline_module, "wrap_model", forbidden):
        yield


# ---- resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize("after_unit", [None, INTERRUPT_AT], ids=["after-data", f"after-unit-{INTERRUPT_AT}"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(pipe, uninterrupted, tmp_path, after_unit):
    directory = tmp_path / "ckpt"
    _interrupted_run(pipe, _config(), directory, after_unit)
    assert (directory / DATA_NAME).is_file()
    assert (directory / STATE_NAME).is_file() == (after_unit is not None)

    resumed = quantize_pipeline(pipe, _config(), progress=False, checkpoint_dir=directory, resume=True)

    assert _same_tensors(quantized_state_dict(resumed.unet), quantized_state_dict(uninterrupted.unet))
    # The report covers every unit, the ones from before the interruption included, with the same numbers.
    expected, got = uninterrupted.unet.gaq_report.units, resumed.unet.gaq_report.units
    assert [u.name for u in got] == [u.name for u in expected]
    for a, b in zip(got, expected):
        assert (a.loss_init, a.loss_final) == (b.loss_init, b.loss_final), a.name
        assert torch.equal(a.omega, b.omega), a.name
    assert _manifest(directory / STATE_NAME)["next_unit"] == len(expected)


def test_resuming_a_finished_checkpoint_skips_calibration(pipe, uninterrupted, tmp_path):
    directory = tmp_path / "ckpt"
    quantize_pipeline(pipe, _config(), progress=False, checkpoint_dir=directory)
    with mock.patch.object(calibrate_module, "reconstruct", side_effect=AssertionError("recalibrated")):
        again = quantize_pipeline(pipe, _config(), progress=False, checkpoint_dir=directory, resume=True)
    assert _same_tensors(quantized_state_dict(again.unet), quantized_state_dict(uninterrupted.unet))


def test_resume_with_an_empty_folder_starts_afresh(pipe, uninterrupted, tmp_path):
    result = quantize_pipeline(pipe, _config(), progress=False, checkpoint_dir=tmp_path / "new", resume=True)
    assert _same_tensors(quantized_state_dict(result.unet), quantized_state_dict(uninterrupted.unet))


@pytest.mark.slow
def test_cli_killed_with_sigkill_resumes_to_identical_weights(tmp_path):
    """The real thing: `diffusers-gaq quantize` killed with SIGKILL right after its first finished
    unit, then `--resume`: the weights file is byte-identical to an uninterrupted run's."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "diffusers_gaq", "quantize", "reference", "--budget", "tiny", "--quiet"]
    weights = Path("unet") / "diffusion_pytorch_model.safetensors"

    t0 = time.perf_counter()
    done = subprocess.run(base + ["--output", str(tmp_path / "D0")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    logger.info("uninterrupted run: %.0fs", time.perf_counter() - t0)

    ckpt, out = tmp_path / "C", tmp_path / "D1"
    cmd = base + ["--output", str(out), "--checkpoint-dir", str(ckpt)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (ckpt / STATE_NAME).exists():  # appears, whole, when the first unit is finished
            assert proc.poll() is None, "the run ended before its first unit checkpoint"
            assert time.monotonic() < deadline, "no unit checkpoint after 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    state = _manifest(ckpt / STATE_NAME)
    assert 1 <= state["next_unit"] < state["num_units"], state["next_unit"]
    logger.info("killed after %d of %d units", state["next_unit"], state["num_units"])

    resumed = subprocess.run(cmd + ["--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{state['next_unit']} of {state['num_units']} units done" in resumed.stderr
    assert (out / weights).read_bytes() == (tmp_path / "D0" / weights).read_bytes()


# ---- determinism -------------------------------------------------------------------------------
def test_two_identical_runs_write_byte_identical_files(pipe, uninterrupted, tmp_path):
    again = quantize_pipeline(pipe, _config(), progress=False)
    uninterrupted.unet.save_pretrained(tmp_path / "a", model_card=False)
    again.unet.save_pretrained(tmp_path / "b", model_card=False)
    # The report holds timings; everything else must match byte for byte.
    for name in ("diffusion_pytorch_model.safetensors", "quantization_config.json", "config.json",
                 "calibration_report.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ---- refused checkpoints -----------------------------------------------------------------------
@pytest.mark.parametrize("changes, fields", [
    (dict(recon_iters=3), ["recon_iters"]),
    (dict(seed=1, weight_bits=8), ["seed", "weight_bits"]),
])
def test_checkpoint_of_another_config_is_refused(pipe, checkpoint, no_sampling, changes, fields):
    before = _snapshot(checkpoint)
    with pytest.raises(CheckpointMismatchError) as e:
        quantize_pipeline(pipe, _config(**changes), progress=False, checkpoint_dir=checkpoint, resume=True)
    message = str(e.value)
    assert "config fields differ" in message and all(f in message for f in fields), message
    assert _snapshot(checkpoint) == before


def test_checkpoint_of_another_model_is_refused(checkpoint, no_sampling):
    before = _snapshot(checkpoint)
    with pytest.raises(CheckpointMismatchError) as e:  # another architecture
        quantize_pipeline(_pipeline(layers_per_block=2), _config(), progress=False, checkpoint_dir=checkpoint,
                          resume=True)
    assert "model config keys differ: layers_per_block" in str(e.value)

    other = _pipeline()
    with torch.no_grad():
        other.unet.conv_in.weight[0, 0, 0, 0] += 1e-3  # the same architecture, one weight changed
    with pytest.raises(CheckpointMismatchError) as e:
        quantize_pipeline(other, _config(), progress=False, checkpoint_dir=checkpoint, resume=True)
    assert "model weights differ in 1 tensor(s): conv_in.weight" in str(e.value)
    assert _snapshot(checkpoint) == before


def test_checkpoint_is_not_overwritten_without_resume(pipe, checkpoint, no_sampling):
    before = _snapshot(checkpoint)
    with pytest.raises(FileExistsError, match="resume=True"):
        quantize_pipeline(pipe, _config(), progress=False, checkpoint_dir=checkpoint)
    assert _snapshot(checkpoint) == before
    with pytest.raises(ValueError, match="checkpoint_dir"):
        quantize_pipeline(pipe, _config(), progress=False, resume=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the tensor data: safetensors itself cannot notice
    path.write_bytes(bytes(data))


def _drop_manifest(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path))


@pytest.mark.parametrize("name, damage, expected", [
    (STATE_NAME, _truncate, "truncated or corrupt"),
    (STATE_NAME, _flip_last_byte, "do not match the digest"),
    (STATE_NAME, _drop_manifest, "no readable diffusers-gaq manifest"),
    (DATA_NAME, _truncate, "truncated or corrupt"),
    (DATA_NAME, _flip_last_byte, "do not match the digest"),
    (DATA_NAME, Path.unlink, "incomplete"),
], ids=["state-truncated", "state-bit-flip", "state-no-manifest", "data-truncated", "data-bit-flip", "data-missing"])
def test_damaged_checkpoint_is_refused(pipe, checkpoint, no_sampling, name, damage, expected):
    damage(checkpoint / name)
    before = _snapshot(checkpoint)
    with pytest.raises(CheckpointError) as e:
        quantize_pipeline(pipe, _config(), progress=False, checkpoint_dir=checkpoint, resume=True)
    assert expected in str(e.value) and str(checkpoint) in str(e.value), str(e.value)
    assert _snapshot(checkpoint) == before


def test_deleting_a_damaged_state_resumes_from_the_data(pipe, uninterrupted, checkpoint):
    """What the error message for a damaged state file suggests, and it works."""
    _truncate(checkpoint / STATE_NAME)
    with pytest.raises(CheckpointError, match=f"delete {STATE_NAME}"):
        quantize_pipeline(pipe, _config(), progress=False, checkpoint_dir=checkpoint, resume=True)
    (checkpoint / STATE_NAME).unlink()
    result = quantize_pipeline(pipe, _config(), progress=False, checkpoint_dir=checkpoint, resume=True)
    assert _same_tensors(quantized_state_dict(result.unet), quantized_state_dict(uninterrupted.unet))


# ---- atomic writes -----------------------------------------------------------------------------
def test_a_failed_checkpoint_write_keeps_the_previous_file(uninterrupted, checkpoint):
    """A crash in the middle of a write (here: safetensors fails half-way) leaves the last good file."""
    before = _snapshot(checkpoint)
    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError("disk full")

    saver = CalibrationCheckpoint(checkpoint, fingerprint={})
    model = uninterrupted.unet
    with mock.patch.object(safetensors.torch, "save_file", half_written), pytest.raises(OSError, match="disk full"):
        saver.save_unit(0, model, ["unit"], torch.zeros(3), [])
    assert _snapshot(checkpoint) == before  # no temporary file left behind either


def test_nan_state_is_never_written(uninterrupted, tmp_path):
    saver = CalibrationCheckpoint(tmp_path / "ckpt", fingerprint={})
    with pytest.raises(FloatingPointError, match="scores"):
        saver.save_unit(0, uninterrupted.unet, ["unit"], torch.tensor([0.0, float("nan")]), [])
    zeros = torch.zeros(2, dtype=torch.long)
    data = CalibrationData(torch.full((2, 1, 16, 16), float("nan")), zeros, zeros, zeros, torch.tensor([False, True]))
    with pytest.raises(FloatingPointError, match="data.samples"):
        saver.save_data(data)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_pipeline_save_refuses_a_non_empty_folder_and_keeps_it(uninterrupted, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="not empty"):
        save_quantized_pipeline(uninterrupted, tmp_path)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("edit", ["weight_shape", "config"])
def test_tampered_checkpoint_shapes_are_refused_on_load(uninterrupted, tmp_path, edit):
    """quantization_config.json records every layer's weight shape; a file edited to disagree with
    config.json (or config.json edited to build another model) is refused, naming the layer."""
    from diffusers_gaq.modeling import load_quantized

    folder = uninterrupted.unet.save_pretrained(tmp_path / "saved", model_card=False)
    if edit == "weight_shape":
        qcfg = json.loads((folder / "quantization_config.json").read_text())
        qcfg["layers"]["conv_in"]["weight_shape"] = [9, 1, 3, 3]
        (folder / "quantization_config.json").write_text(json.dumps(qcfg))
    else:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["block_out_channels"] = [16, 16]
        (folder / "config.json").write_text(json.dumps(cfg))
    before = _snapshot(folder)
    with pytest.raises(CheckpointError, match=r"layer conv_in is recorded with weight shape .* the two files disagree"):
        load_quantized(folder)
    assert _snapshot(folder) == before


# ---- early validation --------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=one_invalid())
def test_invalid_config_is_refused_before_any_work(pipe, no_sampling, tmp_path, case):
    """A config made valid, then edited into an invalid one (validation on construction is passed by):
    quantize_pipeline refuses it naming the field, before sampling and before writing a checkpoint."""
    name, kw = case
    config = GradientAlignedQuantizer()
    for field, value in kw.items():
        setattr(config, field, value)
    directory = tmp_path / f"ckpt-{time.perf_counter_ns()}"
    with pytest.raises(ValueError) as e:
        quantize_pipeline(pipe, config, progress=False, checkpoint_dir=directory)
    assert name in str(e.value)
    assert not directory.exists()


def _constructible(kw: dict) -> bool:
    # test_config's valid_kwargs can draw a val_fraction that leaves no training sample (its
    # cross-field rules are not all encoded); keep the configs the class accepts.
    try:
        GradientAlignedQuantizer(**kw)
    except ValueError:
        return False
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(a=valid_kwargs().filter(_constructible), b=valid_kwargs().filter(_constructible))
def test_config_fingerprint_names_exactly_the_fields_that_differ(a, b):
    """Valid configs survive the JSON round trip of a checkpoint manifest unchanged (a resume with the
    same settings is accepted), and a resume with other settings is refused naming each changed field."""
    ca, cb = GradientAlignedQuantizer(**a), GradientAlignedQuantizer(**b)
    saved = json.loads(json.dumps({"config": config_fingerprint(ca)}))
    assert describe_mismatch(saved, {"config": config_fingerprint(ca)}) == []
    changed = sorted(k for k in a if a[k] != b[k] and k != "device" and not (
        isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])))
    lines = describe_mismatch(saved, {"config": config_fingerprint(cb)})
    if not changed:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith("config fields differ")
        shown = changed[:8]  # the message lists the first eight
        assert all(f"{k} (checkpoint" in lines[0] for k in shown), (changed, lines)


def test_nan_calibration_data_is_refused_before_any_work(pipe, no_sampling, tmp_path):
    good = CalibrationData(torch.randn(4, 1, 16, 16), torch.tensor([999, 999, 500, 500]), torch.tensor([0, 0, 1, 1]),
                           torch.tensor([0, 0, 1, 1]), torch.tensor([False, True, False, True]))
    bad = CalibrationData(**{**good.__dict__, "samples": good.samples.clone()})
    bad.samples[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf in 1 of 4 samples"):
        quantize_pipeline(pipe, _config(), calibration_data=bad, progress=False, checkpoint_dir=tmp_path / "c")
    wrong = CalibrationData(**{**good.__dict__, "samples": torch.randn(4, 3, 16, 16)})
    with pytest.raises(ValueError, match="3 channels; the model expects 1"):
        quantize_pipeline(pipe, _config(), calibration_data=wrong, progress=False, checkpoint_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_unsupported_pipeline_and_device_are_refused_before_any_work(pipe, no_sampling):
    with pytest.raises(TypeError, match="supported pipelines"):
        quantize_pipeline(object(), _config())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            quantize_pipeline(pipe, _config(device="cuda"))


def _cli(args, capsys) -> tuple[int, str]:
    """The command line in-process (fast: every case here stops before loading the model)."""
    code = cli.main(args)
    return code, capsys.readouterr().err


@pytest.fixture
def no_loading():
    with mock.patch.object(cli, "load_pipeline", side_effect=AssertionError("the model was loaded")):
        yield


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
    before = _snapshot(tmp_path)
    code, err = _cli(["quantize", "reference", "--budget", "tiny", *make_args(tmp_path)], capsys)
    assert code == 1 and err.startswith("error:") and expected in err, err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert _snapshot(tmp_path) == before


def test_too_little_disk_space_is_refused_before_any_work(pipe, tmp_path, capsys, no_loading, no_sampling):
    full = SimpleNamespace(total=2**40, used=2**40 - 2**20, free=2**20)  # 1 MiB free
    with mock.patch("shutil.disk_usage", return_value=full):
        code, err = _cli(["quantize", "reference", "--output", str(tmp_path / "out")], capsys)
        assert code == 1 and "free" in err, err
        with pytest.raises(OSError, match="the calibration checkpoint needs about"):
            quantize_pipeline(pipe, _config(), progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert not any(tmp_path.iterdir())


def test_cli_refuses_a_malformed_hub_id_before_loading(tmp_path, capsys, no_loading):
    code, err = _cli(["quantize", "not a/valid//id", "--output", str(tmp_path / "out")], capsys)
    assert code == 1 and "not a Hub id" in err and "namespace/name" in err, err


# ---- divergence --------------------------------------------------------------------------------
NAN_UNIT, BLOWN_UNIT = "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0"


def test_diverging_units_fall_back_to_round_to_nearest(pipe, tmp_path):
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
        qpipe = quantize_pipeline(pipe, _config(), progress=False, checkpoint_dir=tmp_path / "ckpt")

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
    recorded = {u["name"]: u["fallback"] for u in _manifest(tmp_path / "ckpt" / STATE_NAME)["units"] if u["fallback"]}
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


def test_a_healthy_run_has_no_fallback(uninterrupted):
    assert not any(u.fallback for u in uninterrupted.unet.gaq_report.units)
    assert "Reconstruction diverged" not in str(build_model_card(uninterrupted.unet))
