"""The ``diffusers-gaq`` command line: one module per command (quantize, evaluate, info / push, demo /
sensitivity), the shared checks in common.py, the parser in parser.py (its docstring is the usage)."""

from __future__ import annotations

import sys

from ..system import setup_logging
from .common import REFERENCE, CLIError, build_config, load_pipeline
from .parser import build_parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, quiet=getattr(args, "quiet", False))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users, the traceback with --verbose
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


__all__ = ["REFERENCE", "CLIError", "build_config", "build_parser", "load_pipeline", "main"]
