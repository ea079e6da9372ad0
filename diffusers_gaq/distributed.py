"""Several processes (``accelerate launch`` / ``torchrun``): DESIGN.md section 7.

Every process builds the same wrapped UNet and runs the same calibration; only three things
are split between processes:

- the calibration trajectories (each process samples a shard, :meth:`Dist.gather_trajectories`
  puts the full set back together in trajectory order);
- every reconstruction minibatch: by default each process takes a share (:meth:`Dist.shard`)
  and the gradients are summed across processes before each optimizer step
  (:meth:`Dist.sum_grads`); with ``config.grad_shards = K`` the minibatch is cut into K fixed
  shards, each process computes whole shards and the shard gradients are gathered and added in
  shard order (:meth:`Dist.gather_rows`, reconstruction.sharded_backward);
- nothing else: the meta step on the sample scores is computed on the full minibatch by every
  process (its L_GM term couples all samples of the minibatch, so it does not split into a sum
  over shares), and rank 0's score gradient is broadcast as a safety net (:meth:`Dist.broadcast_tensor`).

So every process holds identical parameters at every step. By default the result matches a
single-process run up to floating-point reduction order (which quantization turns into a few
differing codes); with ``grad_shards`` set it is bit-identical to a single-process run with the
same ``grad_shards`` and thread count.

How launches behave on a CPU-only machine (measured with accelerate 1.15, torch 2.13):

- ``torchrun --nproc_per_node N script.py`` starts N processes; they join with gloo once
  ``PartialState(cpu=True)`` is created (which :func:`detect` does when CUDA is absent).
- ``accelerate launch --multi_gpu --num_processes N script.py`` (add ``--num_machines 1
  --mixed_precision no --dynamo_backend no`` to silence its warnings) starts N processes with
  torchrun's variables; they join with gloo in the same way. ``PartialState()`` without
  ``cpu=True`` leaves each of them alone, even with ``ACCELERATE_USE_CPU=true`` (that variable
  is read by ``Accelerator``, not ``PartialState``), hence ``cpu=True`` here.
- ``accelerate launch --cpu --num_processes N`` and ``accelerate launch --num_processes N``
  (no ``--multi_gpu``, no config file) start ONE process and set no variable that says N was
  asked for (only ``ACCELERATE_USE_CPU``). :func:`detect` reads the launcher's command line
  from ``/proc`` (Linux only) to catch this; elsewhere it cannot be detected.
- ``WORLD_SIZE=N`` set by hand, without a launcher: accelerate fails asking for MASTER_ADDR;
  with MASTER_ADDR / RANK / LOCAL_WORLD_SIZE also set, the process waits for the others at the
  rendezvous (torch's default timeout), as any torch.distributed program would.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

from .calibration.gradients import pack_grads, unpack_grads

logger = logging.getLogger(__name__)

# What to type instead, named by every error below.
LAUNCH_FIX = (
    "on a CPU-only machine start several processes with `accelerate launch --multi_gpu --num_processes N "
    "--num_machines 1 --mixed_precision no --dynamo_backend no script.py ...` (diffusers-gaq joins them with "
    "gloo) or `torchrun --nproc_per_node N script.py ...`; `accelerate launch --cpu --num_processes N` starts a "
    "single process. To run on one process on purpose, launch with `python script.py` or `--num_processes 1`."
)

# Variables a launcher sets when it starts several processes (torchrun / accelerate's multi-process
# launcher: WORLD_SIZE, LOCAL_RANK; MPI: PMI_SIZE, OMPI_COMM_WORLD_SIZE, MV2_COMM_WORLD_SIZE).
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched_world_size() -> int:
    """The number of processes the environment says were launched (1 when it says nothing)."""
    return max([_env_int(v, 1) for v in _WORLD_SIZE_VARS] + [1])


def _parent_cmdline() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a for a in raw.decode(errors="replace").split("\0") if a]


def requested_by_accelerate_launcher(cmdline: list[str] | None = None) -> int | None:
    """``--num_processes`` of the ``accelerate launch`` that started this process, or None.

    accelerate's single-process launcher (``--cpu``, or no ``--multi_gpu`` and no config) runs the
    script as a child and exports nothing but ``ACCELERATE_USE_CPU``, so the parent's command line
    is the only trace of a request for several processes."""
    if "ACCELERATE_USE_CPU" not in os.environ:
        return None  # not started by accelerate's simple launcher
    args = _parent_cmdline() if cmdline is None else cmdline
    names = [Path(a).name for a in args]
    # `accelerate launch`, `accelerate-launch`, `python -m accelerate.commands.launch`,
    # `python -m accelerate.commands.accelerate_cli launch`.
    is_launch = "accelerate-launch" in names or "accelerate.commands.launch" in names or any(
        n in ("accelerate", "accelerate.commands.accelerate_cli") and i + 1 < len(names) and names[i + 1] == "launch"
        for i, n in enumerate(names))
    if not is_launch:
        return None
    for i, a in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            value = args[i + 1] if a == flag and i + 1 < len(args) else (
                a.split("=", 1)[1] if a.startswith(flag + "=") else None)
            if value is not None:
                try:
                    return int(value)
                except ValueError:
                    return None
    return None


def check_launch(num_processes: int, env_world_size: int, accelerate_requested: int | None) -> None:
    """Raise when the launcher asked for several processes but this one runs alone: each process
    would calibrate the whole model by itself and they would all write the same files."""
    if num_processes > 1:
        return
    if env_world_size > 1:
        raise RuntimeError(
            f"the environment says {env_world_size} processes were launched (WORLD_SIZE), but this one did not join "
            f"a process group and would calibrate alone (on a machine without CUDA, an `Accelerator()` or "
            f"`PartialState()` created before without cpu=True does this: pass cpu=True); {LAUNCH_FIX}")
    if accelerate_requested is not None and accelerate_requested > 1:
        raise RuntimeError(
            f"`accelerate launch` was asked for {accelerate_requested} processes but started a single one; {LAUNCH_FIX}")


class Dist:
    """This process's place among several, and the collectives calibration needs.

    Every method that communicates must be called by every process in the same order, with an
    empty share if need be: a process that skips one leaves the others waiting."""

    def __init__(self, state):
        self.state = state
        self.rank = state.process_index
        self.world_size = state.num_processes
        self.is_main = state.is_main_process
        self.device = state.device
        # gloo reduces CPU tensors; nccl only CUDA tensors, whatever device calibration runs on.
        backend = torch.distributed.get_backend()
        self.comm_device = torch.device("cpu") if backend in ("gloo", "mpi") else torch.device(state.device)

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    def check_config(self, config) -> None:
        """Refuse, before any work, a budget that would hand some process an empty minibatch share.

        sum_grads copes with empty shares, but an empty share still runs the unit on a batch of zero
        samples, and the attention units cannot (models/attention.py reshapes q/k/v with -1)"""
        if config.method == "reconstruction" and config.recon_iters > 0 and config.recon_batch_size < self.world_size:
            raise ValueError(
                f"recon_batch_size={config.recon_batch_size} is smaller than the number of processes "
                f"({self.world_size}): some processes would get an empty share of every reconstruction minibatch; "
                f"use recon_batch_size >= {self.world_size} or fewer processes")
        if config.grad_shards is not None and config.grad_shards < self.world_size:
            raise ValueError(
                f"grad_shards={config.grad_shards} is smaller than the number of processes ({self.world_size}): "
                f"{self.world_size - config.grad_shards} processes would have no shard to compute; use grad_shards "
                f"= a multiple of {self.world_size} (bit-identical results for every process count up to it)")

    # -- work splitting ------------------------------------------------------------------------------
    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's share of a minibatch: every world_size-th entry, possibly none."""
        return idx[self.rank :: self.world_size]

    def split_trajectories(self, n: int, batch_size: int | None = None) -> list[int]:
        """This process's trajectory ids among 0..n-1: contiguous, in whole sampling batches of
        ``batch_size`` (numbers of batches differing by at most one; a process may get none).

        Whole batches, because CPU kernels round differently for different batch sizes: only a
        process that samples exactly the batches a single process samples gets the same bits."""
        batch_size = batch_size or n
        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        with self.state.split_between_processes(batches) as mine:
            return [i for batch in mine for i in batch]

    # -- collectives ---------------------------------------------------------------------------------
    def _all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place SUM over processes of a tensor on any device."""
        buf = t.detach().to(self.comm_device)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
        return t

    @torch.no_grad()
    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Replace every ``p.grad`` by its sum over processes, in one all-reduce.

        A process with an empty (or partial) share may have ``grad is None`` where another has a
        gradient: it contributes zeros, so no process skips the collective; a gradient that is None
        on every process stays None (see :func:`pack_grads`)."""
        if not params:
            return
        flat = pack_grads([p.grad for p in params], params, device=self.comm_device)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        unpack_grads(params, flat)

    def sum_scalar(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over processes of a (detached) scalar tensor."""
        return self._all_reduce_(t.detach().clone())

    @torch.no_grad()
    def gather_trajectories(self, local: torch.Tensor, ids) -> torch.Tensor:
        """``local`` [S, k, ...] holds trajectories ``ids`` (k of them, k may differ between processes,
        even be 0); return the full [S, n, ...] with trajectory j at position j on every process."""
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        if len(ids_t) != local.shape[1]:
            raise ValueError(f"gather_trajectories: {local.shape[1]} trajectories but {len(ids_t)} ids")
        counts = torch.zeros(self.world_size, dtype=torch.long, device=self.comm_device)
        counts[self.rank] = len(ids_t)
        torch.distributed.all_reduce(counts)
        width = int(counts.max())
        # all_gather needs the same shape everywhere: pad every share to the largest one.
        pad = torch.zeros(local.shape[0], width, *local.shape[2:], dtype=local.dtype, device=self.comm_device)
        pad[:, : len(ids_t)] = local.to(self.comm_device)
        pad_ids = torch.full((width,), -1, dtype=torch.long, device=self.comm_device)
        pad_ids[: len(ids_t)] = ids_t.to(self.comm_device)
        shares = [torch.empty_like(pad) for _ in range(self.world_size)]
        share_ids = [torch.empty_like(pad_ids) for _ in range(self.world_size)]
        torch.distributed.all_gather(shares, pad)
        torch.distributed.all_gather(share_ids, pad_ids)
        counts = counts.tolist()
        full = torch.cat([s[:, :c] for s, c in zip(shares, counts)], dim=1).to(local.device)
        all_ids = torch.cat([i[:c] for i, c in zip(share_ids, counts)]).cpu()
        if sorted(all_ids.tolist()) != list(range(len(all_ids))):
            raise RuntimeError(f"gather_trajectories: the processes' trajectory ids are not a partition of "
                               f"0..{len(all_ids) - 1}: {all_ids.tolist()}")
        out = torch.empty_like(full)
        out[:, all_ids.to(full.device)] = full
        return out

    def trajectory_gatherer(self, ids):
        """``gather(xs)`` for :func:`collect_calibration_data`, bound to this process's ids."""
        return functools.partial(self.gather_trajectories, ids=ids)

    def owned_rows(self, total: int) -> range:
        """The rows of a [total, ...] matrix this process computes: i, i + W, ... from its rank."""
        return range(self.rank, total, self.world_size)

    @torch.no_grad()
    def gather_rows(self, rows: torch.Tensor, total: int) -> torch.Tensor:
        """``rows`` [k, D] are this process's :meth:`owned_rows` of a [total, D] matrix; return the whole
        matrix on every process, in row order."""
        width = -(-total // self.world_size)  # the most rows any process holds
        pad = torch.zeros(width, rows.shape[1], dtype=rows.dtype, device=self.comm_device)
        pad[: len(rows)] = rows.to(self.comm_device)
        shares = [torch.empty_like(pad) for _ in range(self.world_size)]
        torch.distributed.all_gather(shares, pad)
        full = torch.empty(total, rows.shape[1], dtype=rows.dtype, device=self.comm_device)
        for r, share in enumerate(shares):
            ids = list(range(r, total, self.world_size))  # process r's owned_rows
            full[ids] = share[: len(ids)]
        return full.to(rows.device)

    def broadcast_tensor(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Process ``src``'s ``t`` on every process (a new tensor): exact for any number of processes."""
        buf = t.detach().clone().to(self.comm_device)
        torch.distributed.broadcast(buf, src=src)
        return buf.to(t.device)

    def broadcast_object(self, obj=None, src: int = 0):
        """``obj`` of process ``src`` (small picklable objects: paths, flags, metadata)."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def wait_for_everyone(self) -> None:
        self.state.wait_for_everyone()

    # -- debugging -----------------------------------------------------------------------------------
    def assert_same(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        """Raise unless every process holds bit-identical ``tensors`` (one small all-gather of digests)."""
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
            h.update(f"{name}:{t.dtype}:{tuple(tensors[name].shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        digests = [None] * self.world_size
        torch.distributed.all_gather_object(digests, h.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"processes diverged at {what}: digests {digests}")
        logger.debug("%s identical on %d processes", what, self.world_size)


def sync_check_enabled() -> bool:
    return os.environ.get("GAQ_CHECK_SYNC", "0").lower() in ("1", "true", "yes")


def unit_sync_check(dist: Dist | None, units: list[tuple[str, torch.nn.Module]]):
    """A per-unit hook for ``calibrate_model`` asserting that every process holds the same
    unit state (codes, scales, step sizes) and scores after each unit; None unless GAQ_CHECK_SYNC=1."""
    if dist is None or not sync_check_enabled():
        return None

    def check(index: int, scores: torch.Tensor, report) -> None:
        name, unit = units[index]
        state = {k: v for k, v in unit.state_dict().items() if isinstance(v, torch.Tensor)}
        state["__scores__"] = scores
        dist.assert_same(state, f"unit {index} ({name})")

    return check


_DIST: Dist | None = None


def detect(cpu: bool | None = None) -> Dist | None:
    """The process group this process belongs to, or None when it runs alone.

    ``cpu`` (default: no CUDA, or ACCELERATE_USE_CPU set) joins CPU processes with gloo. Raises
    RuntimeError when the launcher asked for several processes but this one would run alone."""
    global _DIST
    if _DIST is not None:
        return _DIST
    env_world = launched_world_size()
    launched = env_world > 1 or _env_int("LOCAL_RANK", -1) != -1
    if not launched and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # No launcher variables: a plain single process, unless accelerate's single-process launcher
        # dropped a request for several.
        check_launch(1, 1, requested_by_accelerate_launcher())
        return None
    from accelerate import PartialState

    if cpu is None:
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    try:
        state = PartialState(cpu=cpu)
    except ValueError as err:  # e.g. WORLD_SIZE set by hand: accelerate asks for MASTER_ADDR
        raise RuntimeError(f"could not join the {env_world} launched processes ({err}); {LAUNCH_FIX}") from err
    check_launch(state.num_processes, env_world, None)
    if state.num_processes == 1:
        return None
    _DIST = Dist(state)
    logger.info("calibrating with %d processes (%s backend), this is rank %d", _DIST.world_size,
                torch.distributed.get_backend(), _DIST.rank)
    return _DIST


def is_main_process() -> bool:
    """True on the process that writes files (the only one when not launched in several)."""
    dist = detect()
    return dist is None or dist.is_main


def wait_for_everyone() -> None:
    """Barrier across processes; a no-op for a single process."""
    dist = detect()
    if dist is not None:
        dist.wait_for_everyone()


__all__ = ["Dist", "LAUNCH_FIX", "check_launch", "detect", "is_main_process", "launched_world_size",
           "requested_by_accelerate_launcher", "unit_sync_check", "wait_for_everyone"]
