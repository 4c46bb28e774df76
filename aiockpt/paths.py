"""Path-level saves: ``aiockpt.save(state, path)`` and ``await aiockpt.save_async(...)``.

For code that names its own checkpoint paths and keeps its own retention (a framework's
checkpoint callback), with the same capture, format, checksums and atomic commit as the
step manager, but no ``step-<N>`` directories, ``latest``, retention or directory lock.
``save`` returns once the state is captured; the handle's ``wait()`` returns once it is
durable at the path.

A ``PathSaver`` owns the staging memory and threads that saves reuse while the state keeps
its structure; ``close()`` frees them. ``aiockpt.save`` uses one per process, made on the
first call (again after ``close_saves()``, or when a call passes a different config).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import Any

from ._engine.failures import AnyFuture
from ._engine.paths import PathEngine, path_of
from ._util.bridge import Ready, drive
from .config import Config, resolve_config
from .metrics import CheckpointerStats, CheckpointMetrics, LayoutSummary, StagingSummary
from .storage.paths import remove_checkpoint

__all__ = [
    "AsyncSaveHandle",
    "PathSaver",
    "SaveHandle",
    "close_saves",
    "save",
    "save_async",
]


class _SaveHandleBase:
    def __init__(
        self, engine: PathEngine, path: Path, metrics: CheckpointMetrics, future: AnyFuture
    ) -> None:
        self.path = path
        self.step = metrics.step
        self.metrics = metrics
        self._engine = engine
        self._future = future

    @property
    def skipped(self) -> bool:
        """Whether the save was dropped on backpressure (``on_backpressure = "skip"``)."""
        return self.metrics.skipped

    def done(self) -> bool:
        """Whether the save is over: committed, failed or skipped.

        Returns:
            True when waiting would not block.
        """
        return self._future.done()

    def _outcome(self) -> Path | None:
        try:
            final = self._future.result()
        except BaseException as exc:
            failures = self._engine.engine.failures
            what = f"save to {self.path}"
            raise failures.failure_for(self.step, exc, what).as_error() from exc
        # A path-level save commits to the local path it was given.
        return None if final is None else Path(str(final))

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else ("done" if self.done() else "in flight")
        return f"<{type(self).__name__} {self.path} {state}>"


class SaveHandle(_SaveHandleBase):
    """A captured save on its way to its path; ``wait()`` blocks until it is durable.

    Attributes:
        path: where it is saved.
        step: the step its manifest records.
        metrics: its :class:`~aiockpt.CheckpointMetrics`, filled in as it persists.
    """

    def wait(self, timeout: float | None = None) -> Path | None:
        """Block until the save is durably committed at its path.

        Args:
            timeout: give up after this many seconds (None: wait as long as it takes).

        Returns:
            The path it committed to, or None if it was skipped on backpressure.

        Raises:
            TimeoutError: still in flight after ``timeout`` seconds; it goes on.
            BackgroundError: it failed in the background; ``__cause__`` holds the original
                exception, and what was at the path before is intact.
        """
        concurrent.futures.wait([self._future], timeout=timeout)  # type: ignore[list-item]
        if not self._future.done():
            raise TimeoutError(f"save to {self.path} still in flight after {timeout} s")
        return self._outcome()


class AsyncSaveHandle(_SaveHandleBase):
    """A captured save on its way to its path; ``await`` it for the durable commit.

    Attributes:
        path: where it is saved.
        step: the step its manifest records.
        metrics: its :class:`~aiockpt.CheckpointMetrics`, filled in as it persists.
    """

    async def wait(self) -> Path | None:
        """Wait until the save is durably committed (``await handle`` does the same).

        Returns:
            The path it committed to, or None if it was skipped on backpressure.

        Raises:
            BackgroundError: it failed in the background; ``__cause__`` holds the original
                exception, and what was at the path before is intact.
        """
        if not self._future.done():
            assert isinstance(self._future, concurrent.futures.Future)
            waiter = asyncio.wrap_future(self._future)
            await asyncio.wait([waiter])
            if not waiter.cancelled():
                waiter.exception()  # seen here; _outcome() raises it
        return self._outcome()

    def __await__(self) -> Generator[Any, None, Path | None]:
        return self.wait().__await__()


class PathSaver:
    """Saves of whole states to paths, reusing staging memory from one save to the next.

    >>> saver = aiockpt.PathSaver()
    >>> handle = saver.save({"model": model, "step": 10}, "runs/one")  # once captured
    >>> handle.wait()                                                   # durable
    >>> saver.close()                                                   # memory freed

    It keeps host staging memory of about ``pinned_ratio`` x the state's size (pinned when
    the state is on a GPU), a GPU staging buffer of the state's size where ``staging``
    picks it, ``num_threads`` writer threads and one event-loop thread, from the first save
    until ``close()``. Saves still in flight when the interpreter exits are finished first.

    Args:
        config: a :class:`~aiockpt.Config`, the path of a TOML file, or None for the
            defaults. What applies: ``chunk_size_mb``/``chunk_count``, ``num_threads``,
            ``max_async``, ``on_backpressure``, ``pinned_ratio``, ``staging``,
            ``durable``, ``on_error``; the directory, retention and interval keys do not.

    Raises:
        ConfigError: ``config`` is not a Config or a TOML path, or the file is bad.
    """

    def __init__(self, config: Config | str | os.PathLike[str] | None = None) -> None:
        self._engine = PathEngine(resolve_config(config, type(self).__name__))
        # The newest save of each path still in flight (those before it commit first).
        self._newest: dict[Path, _SaveHandleBase] = {}
        self._newest_lock = threading.Lock()

    def _track(self, handle: _SaveHandleBase) -> None:
        with self._newest_lock:
            self._newest = {p: h for p, h in self._newest.items() if not h.done()}
            self._newest[handle.path] = handle

    @property
    def config(self) -> Config:
        """The settings in use."""
        return self._engine.config

    @property
    def stats(self) -> CheckpointerStats:
        """Running totals: saves requested, committed, skipped and failed."""
        return self._engine.stats

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._engine.closed

    @property
    def staging(self) -> StagingSummary | None:
        """The staging memory kept for the saves' state (None before the first save and
        after close())."""
        return self._engine.engine.saver.staging_summary()

    @property
    def layout(self) -> LayoutSummary | None:
        """How the saves' state is laid out in chunks (None before the first save and
        after close())."""
        return self._engine.engine.saver.layout_summary()

    def save(
        self, state: Any, path: str | os.PathLike[str], *, step: int | None = None
    ) -> SaveHandle:
        """Capture ``state`` now and write it to ``path`` in the background.

        Returns once the snapshot is exact: the tensors may change right after.

        Args:
            state: ``{name: value}``; a value with ``state_dict()``/``load_state_dict()``
                is saved as its ``state_dict()``, anything else (nested dicts and lists of
                tensors and plain values) as it is. ``aiockpt.load(path)`` gives it back.
            path: the checkpoint directory to write; a checkpoint already there is
                replaced atomically, and its parent directories are made.
            step: the step the manifest records (default: N for a path named
                ``step-<N>``, else 0).

        Returns:
            The save's handle; ``wait()`` blocks until it is durable.

        Raises:
            ConfigError: ``path`` holds something other than an aiockpt checkpoint (a
                file, a non-empty directory), or ``step`` is not one it can record;
                nothing was touched.
            UsageError: ``state`` is not a non-empty mapping.
            UnsupportedStateError: the state holds a value aiockpt cannot store; its path
                is named, and nothing was written.
            BackgroundError: an earlier save failed in the background and was not waited
                for (``on_error = "raise"``); ``__cause__`` holds the original exception.
            CheckpointError: the saver is closed.
        """
        engine = self._engine
        with engine.lock, engine.runtime.interrupts.guarding():
            request = engine.prepare(state, path, step)
            metrics, future = drive(engine.save(request, self._bridge))
        handle = SaveHandle(engine, request.destination.final, metrics, future)
        self._track(handle)
        return handle

    def _bridge(self, coro: Any) -> Ready:
        return Ready(self._engine.runtime.run_sync(coro))

    async def save_async(
        self, state: Any, path: str | os.PathLike[str], *, step: int | None = None
    ) -> AsyncSaveHandle:
        """:meth:`save` for async code: returns once captured, without blocking the loop
        while it waits for a free in-flight place.

        Args:
            state: as for :meth:`save`.
            path: as for :meth:`save`.
            step: as for :meth:`save`.

        Returns:
            The save's handle; ``await`` it for the durable commit.

        Raises:
            ConfigError: as for :meth:`save`.
            UsageError: as for :meth:`save`.
            UnsupportedStateError: as for :meth:`save`.
            BackgroundError: as for :meth:`save`.
            CheckpointError: the saver is closed.
        """
        engine = self._engine
        with engine.lock:
            request = engine.prepare(state, path, step)
            metrics, future = await engine.save(request, engine.runtime.run)
        handle = AsyncSaveHandle(engine, request.destination.final, metrics, future)
        self._track(handle)
        return handle

    def wait(self, path: str | os.PathLike[str] | None = None) -> None:
        """Block until every save in flight (or every save to ``path``) is over.

        Args:
            path: wait only for the saves to this path (None: for all of them).

        Raises:
            BackgroundError: a save failed that was not waited for (with ``path``: the
                newest save to it failed); ``__cause__`` holds the original exception.
            ConfigError: ``path`` is not a str or os.PathLike.
        """
        if path is None:
            self._engine.wait()
            return
        with self._newest_lock:
            newest = self._newest.get(path_of(path))
        if newest is not None:
            # Saves to one path commit in order: the newest is the last to finish.
            concurrent.futures.wait([newest._future])  # type: ignore[list-item]
            newest._outcome()

    def remove(self, path: str | os.PathLike[str]) -> bool:
        """Delete the checkpoint at ``path`` once the saves to it in flight are over.

        It is hidden first (one rename), then deleted, with any copy a killed save left
        beside it.

        Args:
            path: a path this saver (or any aiockpt save) wrote.

        Returns:
            Whether there was a checkpoint to delete.

        Raises:
            ConfigError: ``path`` holds something other than an aiockpt checkpoint.
            BackgroundError: the newest save to ``path`` failed.
        """
        self.wait(path)
        return remove_checkpoint(path_of(path), durable=self.config.durable)

    async def wait_async(self) -> None:
        """:meth:`wait` for async code.

        Raises:
            BackgroundError: as for :meth:`wait`.
        """
        await self._engine.wait_async()

    def close(self) -> None:
        """Finish the saves in flight, then free the staging memory and threads.

        Raises:
            BackgroundError: a save failed that was not waited for.
        """
        self._engine.close()

    def __enter__(self) -> PathSaver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_process_saver: PathSaver | None = None
_process_lock = threading.Lock()


def _saver_for(config: Config | str | os.PathLike[str] | None) -> PathSaver:
    """The process's PathSaver, made (or remade, for another config) when needed."""
    global _process_saver
    wanted = None if config is None else resolve_config(config, "save")
    with _process_lock:
        current = _process_saver
        if current is not None and not current.closed:
            if wanted is None or wanted == current.config:
                return current
            current.close()  # finishes its saves: another config, another layout
        _process_saver = PathSaver(wanted)
        return _process_saver


def save(
    state: Any,
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    config: Config | str | os.PathLike[str] | None = None,
) -> SaveHandle:
    """Capture ``state`` now and write it to ``path`` in the background.

    The process keeps one :class:`PathSaver` for these calls; ``close_saves()`` frees it.

    Args:
        state: ``{name: value}``: Stateful objects (saved as their ``state_dict()``) or
            plain state (nested dicts and lists of tensors and values).
        path: the checkpoint directory to write; a checkpoint there is replaced atomically.
        step: the step the manifest records (default: N for ``step-<N>``, else 0).
        config: the settings of the saves (see :class:`PathSaver`); a config other than
            the last call's finishes the saves in flight and starts a new saver.

    Returns:
        The save's handle; ``wait()`` blocks until it is durable and returns the path.

    Raises:
        ConfigError: ``path`` holds something other than an aiockpt checkpoint, or
            ``config``/``step`` is bad; nothing was touched.
        UsageError: ``state`` is not a non-empty mapping.
        UnsupportedStateError: the state holds a value aiockpt cannot store (named).
        BackgroundError: an earlier save failed and was not waited for.
    """
    return _saver_for(config).save(state, path, step=step)


async def save_async(
    state: Any,
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    config: Config | str | os.PathLike[str] | None = None,
) -> AsyncSaveHandle:
    """:func:`save` for async code; ``await`` the handle for the durable commit.

    Args:
        state: as for :func:`save`.
        path: as for :func:`save`.
        step: as for :func:`save`.
        config: as for :func:`save`.

    Returns:
        The save's handle; ``await`` it for the durable commit.

    Raises:
        ConfigError: as for :func:`save`.
        UsageError: as for :func:`save`.
        UnsupportedStateError: as for :func:`save`.
        BackgroundError: as for :func:`save`.
    """
    return await _saver_for(config).save_async(state, path, step=step)


def close_saves() -> None:
    """Finish the saves of :func:`save`/:func:`save_async` and free their memory.

    The next ``save`` starts a new saver (and sets up its staging memory again).

    Raises:
        BackgroundError: a save failed that was not waited for.
    """
    global _process_saver
    with _process_lock:
        current, _process_saver = _process_saver, None
    if current is not None:
        current.close()
