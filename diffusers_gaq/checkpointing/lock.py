"""One run at a time per checkpoint folder: a lock file holding the process id and host of the run
that writes the folder.

Two runs writing one folder leave one run's data beside the other's state, and neither can
resume. The lock is an advisory ``flock`` on ``calibration.lock`` (released by the kernel when the
process dies, however it dies) plus the holder's pid and host in the file, which name the holder
in the refusal and tell a stale lock (its process gone) from a live one. Under several processes
only the main process takes it (it is the only one that writes).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ..files import pid_alive

try:
    import fcntl
except ImportError:  # Windows: the pid check alone
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = "calibration.lock"


class CheckpointInUseError(RuntimeError):
    """Another live run holds the checkpoint folder."""


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _alive_here(holder: dict) -> bool:
    """The holder runs on this host and its process is alive (and is not this process)."""
    return (holder.get("host") == socket.gethostname() and holder["pid"] != os.getpid()
            and pid_alive(holder["pid"]))


def _busy(directory: Path, holder: dict | None) -> CheckpointInUseError:
    who = (f"process {holder['pid']} on {holder.get('host', '?')}, since {holder.get('started', '?')}" if holder
           else "another process")
    return CheckpointInUseError(
        f"checkpoint folder {directory} is in use by another run ({who}); wait for it to end or stop it, or choose "
        f"another --checkpoint-dir (if that run is gone, delete {directory / LOCK_NAME})")


def check_not_locked(directory: str | os.PathLike) -> None:
    """Refuse, before any work, a folder whose lock names a live process of this host. (A holder on
    another host is judged when the lock is taken: its flock tells.)"""
    directory = Path(directory)
    holder = _read_holder(directory / LOCK_NAME)
    if holder is not None and _alive_here(holder):
        raise _busy(directory, holder)


class CheckpointLock:
    """``acquire()`` takes the folder (creating it) or raises CheckpointInUseError naming the holder;
    ``release()`` removes the lock file. A lock left by a process that is gone is taken over, with a
    warning naming it."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> CheckpointLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = self._open_locked()
        previous = _read_holder(self.path)
        if previous is not None and _alive_here(previous):  # no flock support: the pid tells
            os.close(fd)
            raise _busy(self.directory, previous)
        if previous is not None:
            logger.warning("checkpoint folder %s: taking over the lock left by process %d on %s, which is no longer "
                           "running", self.directory, previous["pid"], previous.get("host", "?"))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _open_locked(self) -> int:
        """An fd of the lock file holding its flock. The file may be removed by its releasing holder
        between open and flock: then the lock is on a dead inode and the open is repeated."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(self.directory, _read_holder(self.path)) from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


__all__ = ["CheckpointInUseError", "CheckpointLock", "LOCK_NAME", "check_not_locked"]
