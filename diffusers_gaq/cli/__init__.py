"""The ``diffusers-gaq`` command line: one module per command (quantize, evaluate, info / push, demo /
sensitivity), the shared checks in common.py, the parser in parser.py (its docstring is the usage)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from ..system import setup_logging
from .common import REFERENCE, CLIError, build_config, load_pipeline
from .parser import build_parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds like Ctrl-C: every ``finally`` runs
    (temporary folders and capture files deleted, the checkpoint lock released)."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into :class:`Terminated` while the command runs (main thread only: Python
    installs signal handlers there alone); the previous handler is put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, quiet=getattr(args, "quiet", False))
    try:
        with sigterm_as_interrupt():
            return args.func(args)
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports a process killed by it
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users, the traceback with --verbose
        if args.verbose:
            raise
        # Some errors carry no text (a MemoryError): their type is the message.
        print(f"error: {e}" if str(e) else f"error: {type(e).__name__}", file=sys.stderr)
        return 1


__all__ = ["REFERENCE", "CLIError", "Terminated", "build_config", "build_parser", "load_pipeline", "main",
           "sigterm_as_interrupt"]
