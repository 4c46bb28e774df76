"""One body for async and blocking front-ends.

An operation is written once, as a coroutine that awaits what a ``Bridge`` gives it. The
async front-end's bridge hands back real awaitables; the blocking front-end's bridge runs
the work to completion and hands back ``Ready`` values, and ``drive`` runs the coroutine
on the caller's thread without an event loop, since it never suspends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["Bridge", "Ready", "drive"]

T = TypeVar("T")

Bridge = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]


class Ready:
    """An awaitable whose value is already there: awaiting it never suspends."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, Any]:
        return self.value
        yield  # a generator that returns at once


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that only awaits Ready values, on the caller's thread."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("aiockpt: a blocking call tried to suspend")
