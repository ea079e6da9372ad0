"""Files that are never half-written: atomic writes of files and folders, and the check that a
location can be written at all (before any long work starts)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    A crash mid-write leaves the previous file (or none), never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary folder beside ``target``; on success fsync its files and swap it into place.

    The previous folder survives until the new one is whole (it is renamed aside, then removed),
    so a crash leaves the old folder, the new one, or a ``.NAME.old`` to recover; never a half folder.
    A killed process may also leave the hidden ``.NAME.tmp-PID@HOST-*`` folder it was building (the
    next save to ``target`` removes it once that process is gone); any other failure, Ctrl-C and the
    CLI's SIGTERM included, removes it (and puts a renamed-aside folder back)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        # Renaming a file aside and removing it as a folder used to fail half-way, leaving .NAME.old.
        raise FileExistsError(f"{target} is a file, not a folder; delete it or choose another folder")
    check_writable_location(target.parent)  # a parent that is a file: refused before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, f".{target.name}.tmp-")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=owned_prefix(f".{target.name}.tmp-")))
    try:
        yield tmp
        for path in tmp.rglob("*"):  # libraries (diffusers, quanto) write without fsync
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        tmp.chmod(0o777 & ~_umask())
        _swap_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def owned_prefix(base: str) -> str:
    """A temporary name prefix naming this process (``BASE<pid>@<host>-``), so that a later run can
    tell a leftover of a process that is gone from a live run's temporary."""
    return f"{base}{os.getpid()}@{socket.gethostname()}-"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, base: str) -> None:
    """Delete ``folder``'s entries named ``owned_prefix(base)`` by a process of this host that is no
    longer running (a run killed with SIGKILL, or a power loss). Live runs' temporaries, other
    hosts' and names without a pid are left alone."""
    folder = Path(folder)
    pattern = re.compile(re.escape(base) + r"(\d+)@(.+)-[^-]*$")
    host = socket.gethostname()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match and match.group(2) == host and not pid_alive(int(match.group(1))):
            logger.info("removing %s, left by process %s, which is no longer running", entry, match.group(1))
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; a previous ``target`` is renamed aside first and removed last,
    or put back when the rename fails."""
    old = target.with_name(f".{target.name}.old")
    _remove(old)  # left by an earlier crash: the target itself is whole
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_writable_location(path: str | os.PathLike) -> Path:
    """Refuse a path that cannot be created: its nearest existing ancestor must be a folder this
    process can write. Returns that ancestor (where free space is measured)."""
    path = Path(path).absolute()
    probe = path if path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"cannot create {path}: {probe} is a file, not a folder; choose a path under a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {probe}; choose a folder you can write")
    return probe


def check_room(path: str | os.PathLike, need_bytes: int, what: str = "the output") -> Path:
    """Refuse, before any work, a location that cannot be created or written (check_writable_location)
    or that has less than ``need_bytes`` free. Returns the existing folder the space was measured in."""
    probe = check_writable_location(path)
    free = shutil.disk_usage(probe).free
    if need_bytes and free < need_bytes:
        raise OSError(f"{what} needs about {need_bytes / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB are free "
                      f"under {probe}; free some space or choose another folder")
    return probe


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _canonicalize_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header with sorted keys. safetensors writes ``metadata`` from a hash
    map, in an order that changes from one call to the next, so equal tensors gave different bytes;
    the canonical header makes a file depend on its content alone (deterministic runs)."""
    import json

    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None)
        canonical = {"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}
        canonical.update(sorted(header.items()))  # tensor entries carry their own data offsets
        text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= size:  # the same entries reordered: it fits, padded with spaces as the format allows
            f.seek(8)
            f.write(text + b" " * (size - len(text)))
            return
        data = f.read()  # only if the JSON is spelled differently: write the whole file again
        text += b" " * (-(8 + len(text)) % 8)  # keep the data 8-byte aligned
        f.seek(0)
        f.write(len(text).to_bytes(8, "little") + text + data)
        f.truncate()


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _canonicalize_safetensors_header(tmp)
