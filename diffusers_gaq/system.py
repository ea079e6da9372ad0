"""This process and its machine: the device, its peak memory, freed memory handed back, the log format."""

from __future__ import annotations

import logging
import os

import torch


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for CUDA but torch.cuda.is_available() is False; use device='cpu'")
    return dev


class PeakRSS:
    """Peak resident memory (bytes) of this process while the block runs, polled from /proc."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, 0

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self.peak = self.current()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the operating system (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed blocks below its mmap threshold in the heap, so after a large model has been
    built and its float weights dropped (the integer runtime's conversion) the process would stay as
    large as before: resident memory should show what is live."""
    import gc

    gc.collect()  # the dropped modules' tensors may sit in reference cycles until a collection
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """The CLI's logging: INFO (DEBUG with ``verbose``); ``quiet``: warnings only, and no progress bars
    from diffusers, transformers or huggingface_hub either."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet:
        from diffusers.utils import logging as diffusers_logging
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_warning()
        transformers_logging.disable_progress_bar()
        disable_progress_bars()
