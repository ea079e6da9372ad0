"""Checkpointing (diffusers_gaq/checkpointing.py): resumable calibration and its checkpoint folder.

A run killed half-way resumes to bit-identical weights; a checkpoint folder written by another run
(other settings, another model), reused without resume=True, or damaged is refused before any work
and left untouched; a checkpoint file is written atomically and never with NaN in it; the run's
fingerprint names exactly the fields that differ. docs/reliability.md lists these faults.

The runs quantize conftest's tiny_pipe (about 2 s per run at one thread); the SIGKILL test runs the
real command line on the embedded reference pipeline (about 80 s).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import checkpoint_manifest, reliability_config, same_tensors, snapshot, tiny_pipeline
from hypothesis import HealthCheck, given, settings
from test_config import valid_kwargs  # the config strategies, shared

from diffusers_gaq import GradientAlignedQuantizer, cli, quantize_pipeline
from diffusers_gaq.calibration import calibrate as calibrate_module
from diffusers_gaq.calibration.data import CalibrationData
from diffusers_gaq.checkpointing import (
    DATA_NAME,
    LOCK_NAME,
    STATE_NAME,
    CalibrationCheckpoint,
    CheckpointInUseError,
    CheckpointMismatchError,
    config_fingerprint,
    describe_mismatch,
    open_checkpoint,
)
from diffusers_gaq.models import family_for
from diffusers_gaq.serialization import CheckpointError, quantized_state_dict

torch.set_num_threads(1)
logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
INTERRUPT_AT = 3  # the unit after which the interrupted runs stop


class _Interrupted(Exception):
    """Stands for a crash: raised right after a checkpoint was written."""


def _interrupted_run(tiny_pipe, config, directory: Path, after_unit: int | None) -> None:
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
        quantize_pipeline(tiny_pipe, config, progress=False, checkpoint_dir=directory)



@pytest.fixture(scope="module")
def partial_checkpoint(tiny_pipe, tmp_path_factory) -> Path:
    """A checkpoint folder left by a run stopped after unit INTERRUPT_AT; tests copy it before use."""
    directory = tmp_path_factory.mktemp("partial") / "ckpt"
    _interrupted_run(tiny_pipe, reliability_config(), directory, INTERRUPT_AT)
    return directory


@pytest.fixture
def checkpoint(partial_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(partial_checkpoint, tmp_path / "ckpt"))



# ---- resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize("after_unit", [None, INTERRUPT_AT], ids=["after-data", f"after-unit-{INTERRUPT_AT}"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_pipe, tiny_qpipe, tmp_path, after_unit):
    directory = tmp_path / "ckpt"
    _interrupted_run(tiny_pipe, reliability_config(), directory, after_unit)
    assert (directory / DATA_NAME).is_file()
    assert (directory / STATE_NAME).is_file() == (after_unit is not None)

    resumed = quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=directory, resume=True)

    assert same_tensors(quantized_state_dict(resumed.unet), quantized_state_dict(tiny_qpipe.unet))
    # The report covers every unit, the ones from before the interruption included, with the same numbers.
    expected, got = tiny_qpipe.unet.gaq_report.units, resumed.unet.gaq_report.units
    assert [u.name for u in got] == [u.name for u in expected]
    for a, b in zip(got, expected):
        assert (a.loss_init, a.loss_final) == (b.loss_init, b.loss_final), a.name
        assert torch.equal(a.omega, b.omega), a.name
    assert checkpoint_manifest(directory / STATE_NAME)["next_unit"] == len(expected)


def test_resuming_a_finished_checkpoint_skips_calibration(tiny_pipe, tiny_qpipe, tmp_path):
    directory = tmp_path / "ckpt"
    quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=directory)
    with mock.patch.object(calibrate_module, "reconstruct", side_effect=AssertionError("recalibrated")):
        again = quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=directory, resume=True)
    assert same_tensors(quantized_state_dict(again.unet), quantized_state_dict(tiny_qpipe.unet))


def test_resume_with_an_empty_folder_starts_afresh(tiny_pipe, tiny_qpipe, tmp_path):
    result = quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=tmp_path / "new", resume=True)
    assert same_tensors(quantized_state_dict(result.unet), quantized_state_dict(tiny_qpipe.unet))


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
    state = checkpoint_manifest(ckpt / STATE_NAME)
    assert 1 <= state["next_unit"] < state["num_units"], state["next_unit"]
    logger.info("killed after %d of %d units", state["next_unit"], state["num_units"])

    # Without --quiet, which keeps the log to warnings: the resume says how far the killed run got.
    resume = [arg for arg in cmd if arg != "--quiet"] + ["--resume"]
    resumed = subprocess.run(resume, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{state['next_unit']} of {state['num_units']} units done" in resumed.stderr
    assert (out / weights).read_bytes() == (tmp_path / "D0" / weights).read_bytes()


# ---- refused checkpoints -----------------------------------------------------------------------
@pytest.mark.parametrize("changes, fields", [
    (dict(recon_iters=3), ["recon_iters"]),
    (dict(seed=1, weight_bits=8), ["seed", "weight_bits"]),
])
def test_checkpoint_of_another_config_is_refused(tiny_pipe, checkpoint, no_sampling, changes, fields):
    before = snapshot(checkpoint)
    with pytest.raises(CheckpointMismatchError) as e:
        quantize_pipeline(tiny_pipe, reliability_config(**changes), progress=False, checkpoint_dir=checkpoint, resume=True)
    message = str(e.value)
    assert "config fields differ" in message and all(f in message for f in fields), message
    assert snapshot(checkpoint) == before


def test_checkpoint_of_another_model_is_refused(checkpoint, no_sampling):
    before = snapshot(checkpoint)
    with pytest.raises(CheckpointMismatchError) as e:  # another architecture
        quantize_pipeline(tiny_pipeline(layers_per_block=2), reliability_config(), progress=False,
                          checkpoint_dir=checkpoint, resume=True)
    assert "model config keys differ: layers_per_block" in str(e.value)

    other = tiny_pipeline()
    with torch.no_grad():
        other.unet.conv_in.weight[0, 0, 0, 0] += 1e-3  # the same architecture, one weight changed
    with pytest.raises(CheckpointMismatchError) as e:
        quantize_pipeline(other, reliability_config(), progress=False, checkpoint_dir=checkpoint, resume=True)
    assert "model weights differ in 1 tensor(s): conv_in.weight" in str(e.value)
    assert snapshot(checkpoint) == before


def test_checkpoint_is_not_overwritten_without_resume(tiny_pipe, checkpoint, no_sampling):
    before = snapshot(checkpoint)
    with pytest.raises(FileExistsError, match="resume=True"):
        quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=checkpoint)
    assert snapshot(checkpoint) == before
    with pytest.raises(ValueError, match="checkpoint_dir"):
        quantize_pipeline(tiny_pipe, reliability_config(), progress=False, resume=True)


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
def test_damaged_checkpoint_is_refused(tiny_pipe, checkpoint, no_sampling, name, damage, expected):
    damage(checkpoint / name)
    before = snapshot(checkpoint)
    with pytest.raises(CheckpointError) as e:
        quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=checkpoint, resume=True)
    assert expected in str(e.value) and str(checkpoint) in str(e.value), str(e.value)
    assert snapshot(checkpoint) == before


def test_deleting_a_damaged_state_resumes_from_the_data(tiny_pipe, tiny_qpipe, checkpoint):
    """What the error message for a damaged state file suggests, and it works."""
    _truncate(checkpoint / STATE_NAME)
    with pytest.raises(CheckpointError, match=f"delete {STATE_NAME}"):
        quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=checkpoint, resume=True)
    (checkpoint / STATE_NAME).unlink()
    result = quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=checkpoint, resume=True)
    assert same_tensors(quantized_state_dict(result.unet), quantized_state_dict(tiny_qpipe.unet))


# ---- atomic writes -----------------------------------------------------------------------------
def test_a_failed_checkpoint_write_keeps_the_previous_file(tiny_qpipe, checkpoint):
    """A crash in the middle of a write (here: safetensors fails half-way) leaves the last good file."""
    before = snapshot(checkpoint)
    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError("disk full")

    saver = CalibrationCheckpoint(checkpoint, fingerprint={})
    model = tiny_qpipe.unet
    with mock.patch.object(safetensors.torch, "save_file", half_written), pytest.raises(OSError, match="disk full"):
        saver.save_unit(0, model, ["unit"], torch.zeros(3), [])
    assert snapshot(checkpoint) == before  # no temporary file left behind either


def test_nan_state_is_never_written(tiny_qpipe, tmp_path):
    saver = CalibrationCheckpoint(tmp_path / "ckpt", fingerprint={})
    with pytest.raises(FloatingPointError, match="scores"):
        saver.save_unit(0, tiny_qpipe.unet, ["unit"], torch.tensor([0.0, float("nan")]), [])
    zeros = torch.zeros(2, dtype=torch.long)
    data = CalibrationData(torch.full((2, 1, 16, 16), float("nan")), zeros, zeros, zeros, torch.tensor([False, True]))
    with pytest.raises(FloatingPointError, match="data.samples"):
        saver.save_data(data)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


# ---- fingerprint ----------------------------------------------------------------------------
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


# ---- one run per folder ------------------------------------------------------------------------
_HOLD = ("import sys, time; from diffusers_gaq.checkpointing import CheckpointLock; "
         "CheckpointLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")


@pytest.fixture
def held_folder(tmp_path):
    """A checkpoint folder whose lock another live process holds; yields (folder, that process)."""
    folder = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_on_a_held_folder_is_refused_naming_the_first(tiny_pipe, held_folder, capsys, no_sampling,
                                                                  no_loading):
    """Two runs on one folder would leave one run's data beside the other's state: while the first holds
    the folder, the second is refused, naming the first one's pid."""
    folder, holder = held_folder
    before = snapshot(folder)
    for resume in (False, True):
        with pytest.raises(CheckpointInUseError, match=rf"in use by another run \(process {holder.pid} on "):
            quantize_pipeline(tiny_pipe, reliability_config(seed=1), progress=False, checkpoint_dir=folder,
                              resume=resume)
    code = cli.main(["quantize", "reference", "--budget", "tiny", "--output", str(folder.parent / "out"),
                     "--checkpoint-dir", str(folder)])
    err = capsys.readouterr().err
    assert code == 1 and f"process {holder.pid}" in err, err
    assert snapshot(folder) == before


def test_a_multi_process_run_locks_on_its_main_process_only(tiny_pipe, held_folder):
    """The other processes of an `accelerate launch` run see the main one's lock: they must not refuse."""
    folder, _ = held_folder
    other_rank = mock.Mock(is_main=False)
    checkpoint, _ = open_checkpoint(folder, True, family_for(tiny_pipe.unet), tiny_pipe.unet,
                                    tiny_pipe.scheduler.config, reliability_config(), dist=other_rank)
    assert checkpoint.lock is None


def test_a_stale_lock_is_taken_over_and_every_run_releases_its_lock(tiny_pipe, tmp_path, caplog):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING):
        _interrupted_run(tiny_pipe, reliability_config(), folder, INTERRUPT_AT)  # ends in an error
    assert f"taking over the lock left by process {dead_pid}" in caplog.text
    assert not (folder / LOCK_NAME).exists()  # released on the error
    quantize_pipeline(tiny_pipe, reliability_config(), progress=False, checkpoint_dir=folder, resume=True)
    assert not (folder / LOCK_NAME).exists()  # and at the end


@pytest.mark.slow
def test_cli_stopped_with_sigterm_leaves_no_temporaries(tmp_path):
    """SIGTERM mid-calibration (captures on disk, a checkpoint held): the command unwinds like
    Ctrl-C, exits 143, and leaves no capture folder in TMPDIR, no lock and no temporary file; the
    checkpoint stays resumable."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TMPDIR=str(tmpdir))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"max_calibration_memory_gib": 1e-6}))  # every capture goes to disk
    ckpt, out = tmp_path / "C", tmp_path / "D"
    cmd = [sys.executable, "-m", "diffusers_gaq", "quantize", "reference", "--budget", "tiny", "--quiet",
           "--config", str(config), "--output", str(out), "--checkpoint-dir", str(ckpt)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((ckpt / STATE_NAME).exists() and any(tmpdir.glob("gaq-capture-*"))):
            assert proc.poll() is None, "the run ended before it was stopped"
            assert time.monotonic() < deadline, "no unit checkpoint and disk-backed capture after 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, err
    assert "terminated" in err
    assert not list(tmpdir.iterdir())  # no gaq-capture-* folder
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([DATA_NAME, STATE_NAME])  # no lock, no .tmp
    assert not out.exists() and not list(tmp_path.glob(".D.*"))
