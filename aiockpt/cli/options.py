"""Flags that several ``aiockpt`` commands share, each declared once.

The flags of Config's keys are generated from the keys themselves
(:func:`aiockpt.config.add_config_arguments`, re-exported here); they sit next to Config
so that the tools below the command line (bench, diagnose) generate theirs the same way.
"""

from __future__ import annotations

import argparse

from ..config import add_config_arguments, config_from_arguments

__all__ = [
    "add_config_arguments",
    "add_json",
    "add_step",
    "add_threads",
    "config_from_arguments",
    "nonnegative",
]


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=8, metavar="N", help="files read at once (default 8)"
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead of text"
    )


def add_step(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--step", type=int, metavar="N", help="when PATH is a directory of checkpoints: use step N"
    )


def nonnegative(text: str) -> int:
    """argparse's ``type`` for a count that may be 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value
