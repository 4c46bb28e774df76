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
import signal
import threading
import time
from collections.abc import Coroutine, Generator, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from ._engine.core import Core, close, wait
from ._engine.failures import AnyFuture, FailureLog
from ._engine.last_save import checkpoint_and_exit
from ._engine.restore import restore
from ._engine.runtime import CallerLoop, MonitorLoop, PrivateLoop, Runtime
from ._engine.tiers import checkpoint_tiers
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
        """Whether the request was dropped on backpressure (``on_backpressure = "skip"``)."""
        return self.metrics.skipped

    def done(self) -> bool:
        """Whether the checkpoint is over: committed, failed, cancelled or skipped.

        Returns:
            True when waiting would not block.
        """
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
    """A captured checkpoint on its way to disk; ``await`` it for the durable commit.

    Attributes:
        step: the step it saves.
        metrics: its :class:`~aiockpt.CheckpointMetrics`, filled in as it persists.
    """

    async def wait(self) -> CheckpointInfo | None:
        """Wait until the checkpoint is durably committed (``await handle`` does the same).

        Returns:
            The committed checkpoint, or None if it was skipped (or another rank skipped
            it, so nothing was committed).

        Raises:
            BackgroundError: it failed in the background; ``__cause__`` holds the original
                exception, and the previous checkpoint is intact.
            CheckpointError: it was abandoned by ``close(cancel=True)``.
        """
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

    def __await__(self) -> Generator[Any, None, CheckpointInfo | None]:
        return self.wait().__await__()


class SyncCheckpointHandle(_HandleBase):
    """A captured checkpoint on its way to disk; ``wait()`` blocks until it is durable.

    Attributes:
        step: the step it saves.
        metrics: its :class:`~aiockpt.CheckpointMetrics`, filled in as it persists.
    """

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until the checkpoint is durably committed.

        Args:
            timeout: give up after this many seconds (None: wait as long as it takes).

        Returns:
            The committed checkpoint, or None if it was skipped (or another rank skipped
            it, so nothing was committed).

        Raises:
            TimeoutError: still in flight after ``timeout`` seconds; it goes on.
            BackgroundError: it failed in the background; ``__cause__`` holds the original
                exception, and the previous checkpoint is intact.
            CheckpointError: it was abandoned by ``close(cancel=True)``.
        """
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
        """The settings in use (a TOML path given as ``config`` is read once)."""
        return self._core.config

    @property
    def stats(self) -> CheckpointerStats:
        """Running totals: checkpoints requested, committed, skipped and failed, and the
        bytes the last restore read."""
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

    @property
    def preempted(self) -> signal.Signals | None:
        """The preemption signal received (one of ``preemption_signals``), or None.

        Under torch.distributed, a signal that reached any rank shows on every rank within
        a fraction of a second. Once it is set, call ``checkpoint_and_exit(step)`` at each
        step boundary."""
        return self._core.preemption.signal


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

    Args:
        config: a :class:`~aiockpt.Config`, the path of a TOML file (read with
            :meth:`Config.from_toml <aiockpt.Config.from_toml>`), or None for the defaults.
        **stateful: the objects to save, by the names they are saved under: anything
            with ``state_dict()``/``load_state_dict()``, and ``aiockpt.RNGState()``.

    Raises:
        UsageError: no object given, or one without ``state_dict()``/``load_state_dict()``.
        UnsupportedStateError: a name that cannot be saved (``/`` in it, a leading ``$``).
        ConfigError: ``config`` is not a Config or a TOML path, or the file is bad.
        DirectoryLockedError: another live process writes to the directory.
    """

    def __init__(
        self, config: Config | str | os.PathLike[str] | None = None, /, **stateful: Any
    ) -> None:
        super().__init__(config, stateful, sync=False)
        self._callers = _OneThreadAtATime()

    async def checkpoint(self, step: int, *, block: bool | None = None) -> CheckpointHandle:
        """Capture the state now and persist it in the background.

        Returns once the snapshot is exact (training may change tensors right after).
        With a memory or remote tier configured, the checkpoint goes to each tier whose
        ``interval_steps`` divides ``step`` (README, "Tiers").

        Args:
            step: the training step, a non-negative int; it names the checkpoint.
            block: overrides ``on_backpressure`` for this call: True waits for a free
                in-flight place, False skips the request when there is none.

        Returns:
            The checkpoint's handle; ``await`` it for the durable commit.

        Raises:
            ConfigError: ``step`` is not a non-negative int the format can hold.
            CheckpointInProgressError: a checkpoint of ``step`` is still in flight.
            CheckpointError: the checkpointer is closed.
            BackgroundError: an earlier checkpoint failed in the background (with
                ``on_error = "raise"``); ``__cause__`` holds the original exception.
            UnsupportedStateError: a state_dict holds a value aiockpt cannot store; its
                path is named, and nothing was written.
            EventLoopError: called from a second thread while a call from another is under
                way, or (with ``use_monitor = false``) from another event loop.
        """
        with self._callers.entered(self._core.runtime):
            metrics, future = await checkpoint_tiers(
                self._core.tiers, self._core.saver, step, block, self._core.runtime.run
            )
        return CheckpointHandle(self._core.failures, step, metrics, future)

    async def wait(self) -> None:
        """Wait for every checkpoint in flight; re-raise a background failure.

        Raises:
            BackgroundError: a checkpoint failed in the background (with
                ``on_error = "raise"``); ``__cause__`` holds the original exception.
            EventLoopError: called from a second thread while a call from another is under
                way, or (with ``use_monitor = false``) from another event loop.
        """
        with self._callers.entered(self._core.runtime):
            await wait(self._core, self._core.runtime.run)

    async def restore(
        self,
        step: int | None = None,
        *,
        only: Iterable[str] | None = None,
        layers: str | None = None,
        strict: bool = True,
    ) -> int | None:
        """Load the newest valid checkpoint (or ``step``) into the objects; its step or None.

        A corrupt checkpoint is skipped for the next newest, with a warning saying why.
        With ``only`` or ``layers`` only the needed bytes are read
        (``stats.last_restore_bytes``).

        Args:
            step: load this step rather than the newest valid one (no fallback then).
            only: the names of the objects to restore (e.g. ``["model"]``); the others
                keep their values.
            layers: a regular expression on layer names (``"model/blocks\\.[0-3]\\."``):
                only those layers of the modules are restored.
            strict: with False, modules load with ``load_state_dict(strict=False)`` and
                an object the checkpoint lacks is skipped; what did not match is logged
                and kept in ``stats.last_restore_missing``, ``last_restore_unexpected``
                and ``last_restore_skipped``. Other objects load as they are.

        Returns:
            The step restored, or None when the directory holds no checkpoint.

        Raises:
            NoCheckpointError: ``step`` is not committed.
            CorruptCheckpointError: ``step`` fails its checks, or every checkpoint does
                (each one's reason is named).
            WorldSizeError: per-rank state saved by fewer ranks than restore it.
            MissingStateError: the checkpoint holds no state under a name asked for
                (with ``strict`` True).
            StateMismatchError: with ``strict`` True, saved keys differ from the objects'
                (nothing is loaded).
            ValueError: ``only`` names an unknown object, or ``layers`` is given
                without a module to apply it to.
            EventLoopError: called from a second thread while a call from another is under
                way, or (with ``use_monitor = false``) from another event loop.
        """
        with self._callers.entered(self._core.runtime):
            return await restore(
                self._core.restorer, step, only, layers, self._core.runtime.run, strict
            )

    async def checkpoint_and_exit(self, step: int) -> None:
        """Save ``step`` within the preemption grace period, then exit the process.

        Call it at a step boundary once ``preempted`` is set. Checkpoints in flight
        finish first; ``step`` is captured (unless it is saved already) and persisted if
        it can be durable within what is left of ``preemption_grace_s`` (estimated from
        earlier checkpoints), then SystemExit(128 + the signal's number) is raised, so
        ``finally`` blocks and ``close()`` run. When it cannot be durable in time,
        nothing is written and the error is logged. Called without a signal, it saves
        and exits with status 0.

        Under torch.distributed with ``preemption_signals`` set, the ranks agree on one
        step: call it at every step boundary while ``preempted`` is set; it returns on a
        rank that must train on to the step the ranks agreed on. Without
        ``preemption_signals``, every rank calls it at the same step, as ``checkpoint()``.

        Args:
            step: the training step just finished, a non-negative int.

        Returns:
            Only under torch.distributed, before the agreed step: None (train the next
            step and call it again).

        Raises:
            SystemExit: always, on one process; at the agreed step, under torch.distributed.
            UsageError: under torch.distributed with ``preemption_signals`` set, called
                before any rank received one.
            CheckpointError: the checkpointer is closed, or the ranks can no longer agree.
            BackgroundError: the save (or an earlier checkpoint) failed in the background;
                ``__cause__`` holds the original exception.
            ConfigError: ``step`` is not a non-negative int the format can hold.
            EventLoopError: called from a second thread while a call from another is under
                way, or (with ``use_monitor = false``) from another event loop.
        """
        with self._callers.entered(self._core.runtime):
            await checkpoint_and_exit(self._core, step, self._core.runtime.run)

    async def close(self, *, cancel: bool = False) -> None:
        """Drain what is in flight, release memory, threads and the directory lock.

        Args:
            cancel: abandon checkpoints in flight instead of finishing them: none of them
                becomes visible, and their handles raise CheckpointError.

        Raises:
            BackgroundError: a checkpoint in flight failed in the background.
            EventLoopError: called from a second thread while a call from another is under
                way, or (with ``use_monitor = false``) from another event loop.
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

    Args:
        config: a :class:`~aiockpt.Config`, the path of a TOML file (read with
            :meth:`Config.from_toml <aiockpt.Config.from_toml>`), or None for the defaults.
        **stateful: the objects to save, by the names they are saved under: anything
            with ``state_dict()``/``load_state_dict()``, and ``aiockpt.RNGState()``.

    Raises:
        UsageError: no object given, or one without ``state_dict()``/``load_state_dict()``.
        UnsupportedStateError: a name that cannot be saved (``/`` in it, a leading ``$``).
        ConfigError: ``config`` is not a Config or a TOML path, or the file is bad.
        DirectoryLockedError: another live process writes to the directory.
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
        """Capture the state now and persist it in the background.

        Returns once the snapshot is exact (training may change tensors right after);
        with ``use_monitor = false``, once the checkpoint is durable. With a memory or
        remote tier configured, the checkpoint goes to each tier whose ``interval_steps``
        divides ``step`` (README, "Tiers").

        Args:
            step: the training step, a non-negative int; it names the checkpoint.
            block: overrides ``on_backpressure`` for this call: True waits for a free
                in-flight place, False skips the request when there is none.

        Returns:
            The checkpoint's handle; ``wait()`` on it blocks until the commit is durable.

        Raises:
            ConfigError: ``step`` is not a non-negative int the format can hold.
            CheckpointInProgressError: a checkpoint of ``step`` is still in flight.
            CheckpointError: the checkpointer is closed.
            BackgroundError: an earlier checkpoint failed in the background (with
                ``on_error = "raise"``); ``__cause__`` holds the original exception.
            UnsupportedStateError: a state_dict holds a value aiockpt cannot store; its
                path is named, and nothing was written.
        """
        core = self._core
        metrics, future = self._call(
            checkpoint_tiers(core.tiers, core.saver, step, block, self._bridge)
        )
        return SyncCheckpointHandle(self._core.failures, step, metrics, future)

    def wait(self) -> None:
        """Block until every checkpoint in flight is durable; re-raise a background failure.

        Raises:
            BackgroundError: a checkpoint failed in the background (with
                ``on_error = "raise"``); ``__cause__`` holds the original exception.
        """
        self._call(wait(self._core, self._bridge))

    def restore(
        self,
        step: int | None = None,
        *,
        only: Iterable[str] | None = None,
        layers: str | None = None,
        strict: bool = True,
    ) -> int | None:
        """Load the newest valid checkpoint (or ``step``) into the objects, blocking.

        A corrupt checkpoint is skipped for the next newest, with a warning saying why.
        With ``only`` or ``layers`` only the needed bytes are read
        (``stats.last_restore_bytes``).

        Args:
            step: load this step rather than the newest valid one (no fallback then).
            only: the names of the objects to restore (e.g. ``["model"]``); the others
                keep their values.
            layers: a regular expression on layer names (``"model/blocks\\.[0-3]\\."``):
                only those layers of the modules are restored.
            strict: with False, modules load with ``load_state_dict(strict=False)`` and
                an object the checkpoint lacks is skipped; what did not match is logged
                and kept in ``stats.last_restore_missing``, ``last_restore_unexpected``
                and ``last_restore_skipped``. Other objects load as they are.

        Returns:
            The step restored, or None when the directory holds no checkpoint.

        Raises:
            NoCheckpointError: ``step`` is not committed.
            CorruptCheckpointError: ``step`` fails its checks, or every checkpoint does
                (each one's reason is named).
            WorldSizeError: per-rank state saved by fewer ranks than restore it.
            MissingStateError: the checkpoint holds no state under a name asked for
                (with ``strict`` True).
            StateMismatchError: with ``strict`` True, saved keys differ from the objects'
                (nothing is loaded).
            ValueError: ``only`` names an unknown object, or ``layers`` is given
                without a module to apply it to.
        """
        return self._call(restore(self._core.restorer, step, only, layers, self._bridge, strict))

    def checkpoint_and_exit(self, step: int) -> None:
        """Save ``step`` within the preemption grace period, then exit the process.

        The blocking form of :meth:`Checkpointer.checkpoint_and_exit`, which says when
        to call it and what it does.

        Args:
            step: the training step just finished, a non-negative int.

        Returns:
            Only under torch.distributed, before the agreed step: None (train the next
            step and call it again).

        Raises:
            SystemExit: always, on one process; at the agreed step, under torch.distributed.
            UsageError: under torch.distributed with ``preemption_signals`` set, called
                before any rank received one.
            CheckpointError: the checkpointer is closed, or the ranks can no longer agree.
            BackgroundError: the save (or an earlier checkpoint) failed in the background;
                ``__cause__`` holds the original exception.
            ConfigError: ``step`` is not a non-negative int the format can hold.
        """
        self._call(checkpoint_and_exit(self._core, step, self._bridge))

    def close(self, *, cancel: bool = False) -> None:
        """Drain what is in flight, release memory, threads and the directory lock.

        Args:
            cancel: abandon checkpoints in flight instead of finishing them: none of them
                becomes visible, and their handles raise CheckpointError.

        Raises:
            BackgroundError: a checkpoint in flight failed in the background.
        """
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
