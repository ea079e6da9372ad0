"""Where the captured inputs and FP targets of a reconstruction unit live: in memory while they fit
a budget, else in files of a temporary folder, read back a minibatch at a time.

Reconstruction touches a random minibatch of calibration samples per step, so the whole set need
not be resident: at 64x64 with 320 channels one sample of one unit's input is 5 MB, and the 5,120
samples of a paper-size calibration set would be 26 GB. A disk-backed table keeps rows as their raw
bytes, so reading a row back gives exactly the tensor that was written (bit-identical results).
Reads go through ``os.preadv`` into a fresh tensor, not through a memory map: the page cache
holds recently read rows without counting them as the process's own memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..files import owned_prefix, remove_stale_temporaries

logger = logging.getLogger(__name__)

CAPTURE_PREFIX = "gaq-capture-"  # then <pid>@<host>-: see files.owned_prefix


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous [rows, bytes] uint8 view of ``t`` (any dtype, also those numpy lacks)."""
    t = t.contiguous()
    return t.reshape(len(t), -1).view(torch.uint8) if t.numel() else t.reshape(len(t), 0).to(torch.uint8)


class DiskRows:
    """A [rows, *row_shape] table in one file; ``rows[idx]`` reads the rows ``idx`` (a LongTensor)."""

    def __init__(self, path: Path, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype):
        self.path, self.rows, self.row_shape, self.dtype = Path(path), rows, tuple(row_shape), dtype
        self.row_bytes = torch.empty((), dtype=dtype).element_size() * int(torch.Size(row_shape).numel())
        with open(self.path, "wb") as f:
            f.truncate(self.row_bytes * rows)
        self._fd = os.open(self.path, os.O_RDWR)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, *self.row_shape))

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return self.rows

    def write(self, start: int, batch: torch.Tensor) -> None:
        data = _as_bytes(batch.detach().cpu()).numpy()
        written = os.pwrite(self._fd, memoryview(data).cast("B"), start * self.row_bytes)
        if written != data.nbytes:
            raise OSError(f"short write to {self.path} ({written} of {data.nbytes} bytes): is the disk full?")

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long).flatten().tolist()
        out = torch.empty((len(idx), *self.row_shape), dtype=self.dtype)
        view = _as_bytes(out).numpy()
        # Consecutive indices (evaluation passes, sorted minibatches) are read in one call.
        j = 0
        while j < len(idx):
            k = j + 1
            while k < len(idx) and idx[k] == idx[k - 1] + 1:
                k += 1
            buf = memoryview(view[j:k]).cast("B")
            got = os.preadv(self._fd, [buf], idx[j] * self.row_bytes)
            if got != buf.nbytes:
                raise OSError(f"short read from {self.path} ({got} of {buf.nbytes} bytes)")
            j = k
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class MemoryRows:
    """The in-memory twin of :class:`DiskRows`: a preallocated tensor filled batch by batch (no
    concatenation of parts, which would hold the set twice)."""

    def __init__(self, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype):
        self.tensor = torch.empty((rows, *row_shape), dtype=dtype)

    def write(self, start: int, batch: torch.Tensor) -> None:
        self.tensor[start : start + len(batch)] = batch.detach().cpu()


class CaptureStore:
    """Hands out row tables for one unit's captures: in memory until ``max_memory_bytes`` are
    committed (None: no bound), then on disk under a temporary folder (``folder``, else TMPDIR).
    Close it (or use it as a context manager) to delete the files."""

    def __init__(self, max_memory_bytes: int | None = None, folder: str | os.PathLike | None = None):
        self.max_memory_bytes = max_memory_bytes
        self.folder = folder
        self.memory_bytes = 0
        self.disk_bytes = 0
        self._dir: Path | None = None
        self._tables: list[DiskRows] = []

    def new_rows(self, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, what: str):
        """A writable table; ``finish`` turns it into what reconstruction reads (a tensor or DiskRows)."""
        nbytes = rows * torch.empty((), dtype=dtype).element_size() * int(torch.Size(row_shape).numel())
        if self.max_memory_bytes is None or self.memory_bytes + nbytes <= self.max_memory_bytes:
            self.memory_bytes += nbytes
            return MemoryRows(rows, row_shape, dtype)
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=owned_prefix(CAPTURE_PREFIX), dir=self.folder))
        free = shutil.disk_usage(self._dir).free
        if nbytes > free:
            raise OSError(f"the captured {what} need {nbytes / 2**30:.2f} GiB on disk but {self._dir} has "
                          f"{free / 2**30:.2f} GiB free: point TMPDIR at a larger disk, or raise "
                          "GradientAlignedQuantizer.max_calibration_memory_gib to keep more in memory")
        table = DiskRows(self._dir / f"{len(self._tables)}.bin", rows, row_shape, dtype)
        self._tables.append(table)
        self.disk_bytes += nbytes
        logger.info("captured %s (%.2f GiB) go to disk at %s (in memory: %.2f GiB of the %.2f GiB budget)",
                    what, nbytes / 2**30, table.path, self.memory_bytes / 2**30, self.max_memory_bytes / 2**30)
        return table

    @staticmethod
    def finish(table):
        return table.tensor if isinstance(table, MemoryRows) else table

    def close(self) -> None:
        for table in self._tables:
            table.close()
        self._tables = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def remove_stale_captures(folder: str | os.PathLike | None = None) -> None:
    """Delete capture folders left in ``folder`` (else TMPDIR) by runs that are gone (SIGKILL)."""
    remove_stale_temporaries(folder or tempfile.gettempdir(), CAPTURE_PREFIX)


__all__ = ["CAPTURE_PREFIX", "CaptureStore", "remove_stale_captures", "DiskRows", "MemoryRows"]
