"""Checkpointer and SyncCheckpointer: the public face of the pipeline.

``checkpoint(step)`` does the part training must wait for on the caller's thread (call
state_dict(), flatten, copy into staging memory) and hands the rest to the runtime's
event loop, returning a handle at once. Both front-ends share one core (aiockpt's engine:
save, restore, failure bookkeeping) and run the same operation bodies; they differ only in
the bridge that waits: by awaiting a future, or by blocking on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Coroutine, Generator, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from ._engine.core import Core, close, wait
from ._engine.failures import AnyFuture, FailureLog
from ._engine.restore import restore
from ._engine.runtime import CallerLoop, MonitorLoop, PrivateLoop, Runtime
from ._engine.saver import checkpoint
from ._util.bridge import Ready, drive
from ._util.logs import apply_config_level
from .config import Config, resolve_config
from .errors import CheckpointError, EventLoopError
from .metrics import CheckpointerStats, CheckpointMetrics, LayoutSummary, StagingSummary
from .storage.local import CheckpointInfo

__all__ = ["CheckpointHandle", "Checkpointer", "SyncCheckpointHandle", "SyncCheckpointer"]

T = TypeVar("T")


class _HandleBase:
    def __init__(
        self, failures: FailureLog, step: int, metrics: CheckpointMetrics, future: AnyFuture | None
    ):
        self.step = step
        self.metrics = metrics
        self._failures = failures
        self._future = future

    @property
    def skipped(self) -> bool:
        return self.metrics.skipped

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def _outcome(self) -> CheckpointInfo | None:
        if self._future is None:
            return None
        if self._future.cancelled():
            raise CheckpointError(
                f"checkpoint of step {self.step} was cancelled (close(cancel=True)) and "
                "never became visible"
            )
        try:
            path = self._future.result()
        except BaseException as exc:
            raise self._failures.failure_for(self.step, exc).as_error() from exc
        if path is None:  # another rank skipped it: nothing was committed
            return None
        return CheckpointInfo(self.step, path, self.metrics.nbytes, time.time())

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else ("done" if self.done() else "in flight")
        return f"<{type(self).__name__} step={self.step} {state}>"


class CheckpointHandle(_HandleBase):
    """A captured checkpoint on its way to disk; ``await`` it for the durable commit."""

    async def wait(self) -> CheckpointInfo | None:
        """The committed checkpoint (None if skipped); raises BackgroundError on failure."""
        if self._future is not None and not self._future.done():
            if isinstance(self._future, concurrent.futures.Future):
                waiter = asyncio.wrap_future(self._future)
                await asyncio.wait([waiter])
                # _outcome() raises the failure; mark the copy's as seen, or asyncio logs
                # "Future exception was never retrieved" when it is collected.
                if not waiter.cancelled():
                    waiter.exception()
            else:
                await asyncio.wait([self._future])
        return self._outcome()

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.wait().__await__()


class SyncCheckpointHandle(_HandleBase):
    """A captured checkpoint on its way to disk; ``wait()`` blocks until it is durable."""

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        if isinstance(self._future, concurrent.futures.Future):
            concurrent.futures.wait([self._future], timeout=timeout)
            if not self._future.done():
                raise TimeoutError(
                    f"checkpoint of step {self.step} still in flight after {timeout} s"
                )
        return self._outcome()


class _FrontEnd:
    def __init__(
        self,
        config: Config | str | os.PathLike[str] | None,
        stateful: Mapping[str, Any],
        sync: bool,
    ) -> None:
        config = resolve_config(config, type(self).__name__)
        apply_config_level(config.verbose)  # AIOCKPT_LOG_LEVEL, else verbose = INFO
        if config.use_monitor:
            runtime: Runtime = MonitorLoop()
        else:
            runtime = PrivateLoop() if sync else CallerLoop()
        try:
            self._core = Core(config, stateful, runtime)
        except BaseException:
            runtime.close()
            raise

    @property
    def config(self) -> Config:
        return self._core.config

    @property
    def stats(self) -> CheckpointerStats:
        return self._core.stats

    @property
    def staging(self) -> StagingSummary | None:
        """The staging memory set up for the state (None before the first checkpoint and
        after close())."""
        return self._core.saver.staging_summary()

    @property
    def layout(self) -> LayoutSummary | None:
        """How the state is laid out in chunks (None before the first checkpoint and after
        close())."""
        return self._core.saver.layout_summary()


class _OneThreadAtATime:
    """Lets the calls of one thread in (any number of its tasks at once), and refuses a
    second thread's call while they run: capture's state (layout, staging, the commit
    chain) is the caller's, and an async call cannot wait for another thread without
    stalling its own event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._calls = 0

    @contextlib.contextmanager
    def entered(self, runtime: Runtime) -> Generator[None, None, None]:
        runtime.check_caller()
        me = threading.get_ident()
        with self._lock:
            if self._owner not in (None, me):
                raise EventLoopError(
                    "this Checkpointer is in a call from another thread: an async "
                    "Checkpointer serves one thread (and its event loop) at a time. Await "
                    "it from one thread, give each thread its own, or use SyncCheckpointer, "
                    "which serialises calls from several threads"
                )
            self._owner, self._calls = me, self._calls + 1
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1
                if not self._calls:
                    self._owner = None


class Checkpointer(_FrontEnd):
    """Asynchronous checkpoints of any Stateful objects, given as keyword arguments.

    >>> ckpt = aiockpt.Checkpointer(cfg, model=model, optimizer=opt, rng=aiockpt.RNGState())
    >>> handle = await ckpt.checkpoint(step)   # returns once captured
    >>> await handle                           # durable
    """

    def __init__(
        self, config: Config | str | os.PathLike[str] | None = None, /, **stateful: Any
    ) -> None:
        super().__init__(config, stateful, sync=False)
        self._callers = _OneThreadAtATime()

    async def checkpoint(self, step: int, *, block: bool | None = None) -> CheckpointHandle:
        """Capture the state now and persist it in the background.

        Returns once the snapshot is exact (training may change tensors right after).
        ``block`` overrides on_backpressure for this call.
        """
        with self._callers.entered(self._core.runtime):
            metrics, future = await checkpoint(
                self._core.saver, step, block, self._core.runtime.run
            )
        return CheckpointHandle(self._core.failures, step, metrics, future)

    async def wait(self) -> None:
        """Wait for every checkpoint in flight; re-raise a background failure."""
        with self._callers.entered(self._core.runtime):
            await wait(self._core, self._core.runtime.run)

    async def restore(
        self,
        step: int | None = None,
        *,
        only: Iterable[str] | None = None,
        layers: str | None = None,
    ) -> int | None:
        """Load the newest valid checkpoint (or ``step``) into the objects; its step or None.

        ``only`` restores some of the objects (e.g. ``["model"]``, without the optimizer);
        ``layers`` (a regular expression on layer names such as ``"model/blocks\\.[0-3]\\."``)
        restores only those layers of the modules. Either way only the needed bytes are
        read (``stats.last_restore_bytes``).
        """
        with self._callers.entered(self._core.runtime):
            return await restore(self._core.restorer, step, only, layers, self._core.runtime.run)

    async def close(self, *, cancel: bool = False) -> None:
        """Drain what is in flight, release memory, threads and the directory lock.

        ``cancel=True`` abandons checkpoints in flight instead of finishing them: none of
        them becomes visible, and their handles raise CheckpointError.
        """
        with self._callers.entered(self._core.runtime):
            await close(self._core, self._core.runtime.run, cancel)

    async def __aenter__(self) -> Checkpointer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class SyncCheckpointer(_FrontEnd):
    """The same checkpoints from plain (non-async) scripts: every call blocks the caller
    only as long as the async version would be awaited.

    With ``use_monitor = false`` there is no background loop, so ``checkpoint()`` returns
    only once the checkpoint is durable (the direct, blocking mode).
    """

    def __init__(
        self, config: Config | str | os.PathLike[str] | None = None, /, **stateful: Any
    ) -> None:
        super().__init__(config, stateful, sync=True)
        # One call at a time: capture reads and updates shared state (layout, staging
        # memory, the commit chain), and without the monitor the event loop itself is
        # the caller's, which runs in one thread at a time.
        self._serial = threading.RLock()

    def _bridge(self, coro: Coroutine[Any, Any, Any]) -> Ready:
        return Ready(self._core.runtime.run_sync(coro))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one public call: serialised between threads, Ctrl-C taken at a safe point."""
        with self._serial, self._core.runtime.interrupts.guarding():
            return drive(coro)

    def checkpoint(self, step: int, *, block: bool | None = None) -> SyncCheckpointHandle:
        metrics, future = self._call(checkpoint(self._core.saver, step, block, self._bridge))
        return SyncCheckpointHandle(self._core.failures, step, metrics, future)

    def wait(self) -> None:
        self._call(wait(self._core, self._bridge))

    def restore(
        self,
        step: int | None = None,
        *,
        only: Iterable[str] | None = None,
        layers: str | None = None,
    ) -> int | None:
        return self._call(restore(self._core.restorer, step, only, layers, self._bridge))

    def close(self, *, cancel: bool = False) -> None:
        self._call(close(self._core, self._bridge, cancel))

    def __enter__(self) -> SyncCheckpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
