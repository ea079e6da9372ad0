"""Calibration under several processes (distributed.py, DESIGN.md section 7).

The slow tests launch real processes (gloo on CPU) through ``accelerate launch`` and ``torchrun``
running tests/dist_worker.py, and compare what calibration decided with a single-process run.

Two ways to split a reconstruction minibatch, two promises:

- ``grad_shards=K`` (the CLI's ``--grad-shards K``): the minibatch is cut into K fixed shards, each
  shard's gradient is computed whole by one process and the K gradients are gathered and added in
  shard order. A shard's gradient does not depend on which process computed it, and trajectories
  are sampled in the same whole batches, so 1, 2, ... K processes give BIT-IDENTICAL results: codes,
  weight scales, activation step sizes, sample weights; tolerance zero. (Same thread count per
  process: CPU kernels may split reductions by thread.) Tested on the reference pipeline through
  the CLI, as users launch it.
- the default (one share per process, gradients all-reduced): the sums differ from a single
  process's in the last bits; quantization turns those into discrete differences (an activation
  rounds to the neighbouring level, an AdaRound V ends on the other side of 0) and every later unit
  sees them. So: weight scales / zero points bit-identical (FP weights alone); the first two units
  (time_embedding, conv_in) bit-identical codes and sample weights, activation steps within 1e-6
  (observed 8e-9); further on only the share of differing codes is bounded: at most 1 % (observed
  0.12-0.28 % over four budgets).

With GAQ_CHECK_SYNC=1 every unit is also checked to be bit-identical across ranks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_gaq import distributed
from diffusers_gaq.distributed import LAUNCH_FIX, check_launch, requested_by_accelerate_launcher

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
BIN = Path(sys.executable).parent
TIMEOUT = 240
FIRST_UNITS = ("time_embedding", "conv_in")  # nothing upstream of them is reduced differently

# The one form of the fix every guard message must name.
FIX_SNIPPET = "accelerate launch --multi_gpu --num_processes N"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(tmp: Path) -> dict[str, str]:
    """The test process's environment minus any launcher state, one thread per process, and an
    empty accelerate config home so a user's default_config.yaml cannot change the launch."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "TORCHELASTIC_")) and k not in (
               "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GAQ_CHECK_SYNC="1", HF_HOME=str(tmp / "hf_home"),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def run(cmd: list[str], tmp: Path, env: dict[str, str] | None = None, check: bool = True):
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env or launch_env(tmp), capture_output=True,
                          text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return proc


def accelerate_launch() -> list:
    """`accelerate launch` as users type it (the console script beside this interpreter), else its module."""
    script = BIN / "accelerate"
    return [script, "launch"] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def torchrun() -> list:
    script = BIN / "torchrun"
    return [script] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def accelerate_cmd(nproc: int, *args) -> list:
    return [*accelerate_launch(), "--multi_gpu", "--num_processes", nproc, "--num_machines", 1,
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(), *args]


def torchrun_cmd(nproc: int, *args) -> list:
    return [*torchrun(), "--nproc_per_node", nproc, "--master_addr", "127.0.0.1", "--master_port", free_port(), *args]


def quantize_with(launcher, tmp: Path, *extra) -> dict[str, torch.Tensor]:
    """Run the worker (``launcher(worker args)`` -> command); exactly one file may appear."""
    from safetensors.torch import load_file

    out_dir = tmp / "out"
    run(launcher(WORKER, out_dir / "decisions.safetensors", *extra), tmp)
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == ["decisions.safetensors"], f"expected one file from the main process, found {written}"
    return load_file(str(out_dir / "decisions.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return quantize_with(lambda *a: [sys.executable, *a], tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def two_torchrun(tmp_path_factory):
    # The primitives (empty shares, gradients missing on one rank, uneven gathers) are checked first.
    return quantize_with(lambda *a: torchrun_cmd(2, *a), tmp_path_factory.mktemp("torchrun"), "--check-primitives")


def assert_matches_single_process(single: dict, multi: dict) -> None:
    assert single.keys() == multi.keys()
    for key in single:
        if key.endswith(("weight_scale", "weight_zero_point")):
            assert torch.equal(single[key], multi[key]), key
    for unit in FIRST_UNITS:
        for key in (k for k in single if k.startswith(unit + ".") or k == f"omega.{unit}"):
            if key.endswith("act_scale"):
                torch.testing.assert_close(multi[key], single[key], rtol=0, atol=1e-6, msg=key)
            elif not key.startswith("loss."):
                assert torch.equal(single[key], multi[key]), key
    codes = [k for k in single if k.endswith(".codes")]
    differing = sum(int((single[k] != multi[k]).sum()) for k in codes)
    total = sum(single[k].numel() for k in codes)
    assert differing <= 0.01 * total, f"{differing} of {total} weight codes differ"


@pytest.mark.slow
def test_default_sharding_two_processes_match_one_within_bounds(single, two_torchrun):
    assert_matches_single_process(single, two_torchrun)


# ---- the CLI on the reference pipeline, fixed gradient shards: bit-identical ----------------------------

CLI = ["-m", "diffusers_gaq.cli", "quantize", "reference", "--budget", "tiny", "--weight-bits", "4",
       "--act-bits", "8", "--grad-shards", "2", "--seed", "3"]


def cli_checkpoint(launcher, tmp: Path) -> dict[str, torch.Tensor]:
    """Run the CLI under ``launcher``; return every tensor it saved (weights and calibration report)."""
    from safetensors.torch import load_file

    out = tmp / "out"
    run(launcher(*CLI, "--output", out), tmp)
    # One pipeline folder, written once (by the main process): no stray temporary folders beside it.
    assert sorted(p.name for p in tmp.iterdir() if p.name != "hf_home") == ["out"]
    tensors = {}
    for name in ("diffusion_pytorch_model.safetensors", "calibration_report.safetensors"):
        tensors.update({f"{name}:{k}": v for k, v in load_file(str(out / "unet" / name)).items()})
    return tensors


@pytest.fixture(scope="module")
def cli_single(tmp_path_factory):
    return cli_checkpoint(lambda *a: [sys.executable, *a], tmp_path_factory.mktemp("cli_single"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert any(k.endswith("weight_codes") for k in a) and any("omega" in k for k in a), sorted(a)[:20]
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_cli_accelerate_two_processes_bit_identical_to_one(cli_single, tmp_path):
    two = cli_checkpoint(lambda *a: accelerate_cmd(2, *a), tmp_path)
    assert_bit_identical(cli_single, two)


@pytest.mark.slow
def test_cli_torchrun_two_processes_bit_identical_to_one(cli_single, tmp_path):
    two = cli_checkpoint(lambda *a: torchrun_cmd(2, *a), tmp_path)
    assert_bit_identical(cli_single, two)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["accelerate --cpu", "WORLD_SIZE by hand", "state without cpu=True"])
def test_launch_that_would_run_alone_fails_naming_the_fix(case, tmp_path):
    env = launch_env(tmp_path)
    out = tmp_path / "out" / "decisions.safetensors"
    if case == "accelerate --cpu":
        # accelerate's single-process launcher: one process, nothing in its environment says 2.
        cmd = [*accelerate_launch(), "--cpu", "--num_processes", 2, "--num_machines", 1,
               "--mixed_precision", "no", "--dynamo_backend", "no", WORKER, out]
    elif case == "WORLD_SIZE by hand":
        env["WORLD_SIZE"] = "2"
        cmd = [sys.executable, WORKER, out]
    else:
        # Two real processes whose script created PartialState() without cpu=True (no CUDA here).
        cmd = accelerate_cmd(2, WORKER, out, "--state-without-cpu")
    proc = run(cmd, tmp_path, env=env, check=False)
    assert proc.returncode != 0
    assert "RuntimeError" in proc.stderr and FIX_SNIPPET in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


# ---- fast checks of the launch guard's logic (no processes) ------------------------------------------

def test_check_launch():
    check_launch(2, 2, None)
    check_launch(1, 1, None)
    check_launch(1, 1, 1)
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        check_launch(1, 2, None)
    with pytest.raises(RuntimeError, match="asked for 3 processes"):
        check_launch(1, 1, 3)
    assert FIX_SNIPPET in LAUNCH_FIX and "torchrun --nproc_per_node N" in LAUNCH_FIX


@pytest.mark.parametrize("cmdline,expected", [
    (["/v/bin/python", "/v/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "s.py"], 2),
    (["/v/bin/python", "/v/bin/accelerate", "launch", "--num_processes=4", "s.py"], 4),
    (["/v/bin/python", "/v/bin/accelerate-launch", "--num-processes", "3", "s.py"], 3),
    (["/v/bin/python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "s.py"], 2),
    (["/v/bin/python", "/v/bin/accelerate", "launch", "s.py"], None),
    (["/v/bin/python", "other.py", "--num_processes", "2"], None),
])
def test_requested_by_accelerate_launcher(monkeypatch, cmdline, expected):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert requested_by_accelerate_launcher(cmdline) == expected
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert requested_by_accelerate_launcher(cmdline) is None  # not started by accelerate's simple launcher


def test_single_process_detects_nothing(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_DIST", None)
    assert distributed.detect() is None
    assert distributed.is_main_process()
    distributed.wait_for_everyone()  # a no-op, not a hang


def test_check_config_refuses_fewer_gradient_shards_than_processes():
    from diffusers_gaq import GradientAlignedQuantizer

    # Dist's checks read only world_size: a bare instance stands in for a process group here.
    dist = object.__new__(distributed.Dist)
    dist.world_size = 4
    dist.check_config(GradientAlignedQuantizer(grad_shards=8))
    dist.check_config(GradientAlignedQuantizer(grad_shards=None))
    with pytest.raises(ValueError, match="grad_shards=2 is smaller than the number of processes"):
        dist.check_config(GradientAlignedQuantizer(grad_shards=2))
