"""Output for the command line: consoles, human units, progress bars, errors with hints.

Every command writes its result to stdout (text, or one JSON document with ``--json``) and
everything else (progress, notes, errors) to stderr, so ``aiockpt ... --json | jq`` works.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .units import human_bytes  # one formatter; commands take it from here with the rest

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "ByteProgress",
    "CliError",
    "TaskProgress",
    "byte_progress",
    "human_bytes",
    "human_time",
    "iso_time",
    "json_number",
    "note",
    "print_json",
    "stdout_console",
    "task_progress",
]

ByteCounter = Callable[[int], None]


class ByteProgress:
    """What ``byte_progress`` yields: ``progress(n)`` counts bytes; ``set_total`` fixes the
    total once it is known (after the manifests are parsed)."""

    def __init__(self, advance: ByteCounter, set_total: ByteCounter) -> None:
        self._advance = advance
        self.set_total = set_total

    def __call__(self, nbytes: int) -> None:
        self._advance(nbytes)


class CliError(Exception):
    """A failure to report on stderr: what went wrong, and a hint what to do about it."""

    def __init__(self, message: str, hint: str | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.hint = hint
        self.code = code


def _console(file: Any) -> Console:
    from rich.console import Console

    # Piped output must not be cut at 80 columns: long tensor names would wrap mid-word and
    # break grep. On a terminal, rich measures the real width.
    terminal = file.isatty() if hasattr(file, "isatty") else False
    return Console(
        file=file, highlight=False, width=None if terminal else 10_000, soft_wrap=not terminal
    )


def stdout_console() -> Console:
    # Created per call: tests (and callers) may have replaced sys.stdout since import.
    return _console(sys.stdout)


def note(message: str) -> None:
    """A remark for the human (never part of the result): stderr."""
    print(message, file=sys.stderr)


def print_json(document: Any) -> None:
    # allow_nan=False: NaN is not JSON; statistics put null there instead.
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")


def json_number(value: float | int | None) -> float | int | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


def human_time(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def iso_time(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))


@contextmanager
def byte_progress(total: int, description: str, *, enabled: bool) -> Iterator[ByteProgress]:
    """A progress bar over ``total`` bytes on stderr; yields a thread-safe byte counter.

    Disabled (a no-op counter) for JSON output and when stderr is not a terminal, where a
    bar would only litter logs.
    """
    if not enabled or not sys.stderr.isatty():
        yield ByteProgress(lambda n: None, lambda n: None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    # Progress.advance takes rich's internal lock, so worker threads may call it directly.
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task(description, total=max(total, 1))
        yield ByteProgress(
            lambda n: progress.advance(task, n),
            lambda n: progress.update(task, total=max(n, 1)),
        )


class TaskProgress:
    """What ``task_progress`` yields: ``show(text)`` names the task under way, ``advance()``
    counts one as done."""

    def __init__(self, show: Callable[[str], None], advance: Callable[[], None]) -> None:
        self.show = show
        self.advance = advance


@contextmanager
def task_progress(total: int, *, enabled: bool) -> Iterator[TaskProgress]:
    """A progress bar over ``total`` tasks on stderr, named as they go; like byte_progress,
    a no-op for JSON output and when stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield TaskProgress(lambda text: None, lambda: None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task("", total=max(total, 1))
        yield TaskProgress(
            lambda text: progress.update(task, description=text),
            lambda: progress.advance(task),
        )
