"""The ``aiockpt`` command line (also ``python -m aiockpt``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aiockpt", description="Asynchronous, crash-safe checkpoints for PyTorch."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "bench",
        help="measure checkpoint stall and persist bandwidth against this machine's limits",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
