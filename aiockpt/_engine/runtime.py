"""Where the pipeline's coroutines run: a monitor thread's uvloop, or the caller's loop.

With ``use_monitor`` one daemon thread owns an event loop (uvloop when installed) for the
whole life of a Checkpointer. Callers reach it through futures: async callers await
``asyncio.wrap_future`` of them, sync callers block on ``.result()``. Without the
monitor, coroutines run on the caller's own running loop; no loop is ever nested or
patched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from types import FrameType
from typing import Any, TypeVar

from ..errors import EventLoopError

__all__ = [
    "IO_THREADS",
    "CallerLoop",
    "DeferredInterrupt",
    "MonitorLoop",
    "PrivateLoop",
    "Runtime",
    "new_event_loop",
]

T = TypeVar("T")
# Threads of the monitor loop's default executor (see MonitorLoop).
IO_THREADS = 4


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop has no Windows build; asyncio's loop does the same job
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class DeferredInterrupt:
    """Ctrl-C during a blocking call, delivered once the call has reached a safe point.

    Python raises KeyboardInterrupt wherever the main thread happens to be. When that is
    inside an event loop's callback (with ``use_monitor = false`` the pipeline's loop runs
    on the caller's thread), the callback is lost: the one that hands a writer thread's
    result to its task, say, and that checkpoint then waits forever, so ``close()`` hangs.
    Caller-side state can be torn the same way (an admission granted on the loop but never
    received). So, while a blocking call runs: the first SIGINT is only recorded and the
    call goes on to its end (a checkpoint in progress becomes durable, or is abandoned
    whole); a second one cancels what the call is waiting for, through the loop; either
    way KeyboardInterrupt is raised as the call returns. A third one is raised at once, as
    a way out of a call stuck on a hung disk.

    Only the main thread receives signals, and a SIGINT handler the program installed
    itself is left alone: both simply run the call unguarded.
    """

    def __init__(self) -> None:
        self._active = False
        self._count = 0
        self._cancel: Callable[[], Any] | None = None

    @contextlib.contextmanager
    def guarding(self) -> Iterator[None]:
        """Around one public call; nested calls share the outermost guard."""
        if (
            self._active
            or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            yield
            return
        self._active, self._count, self._cancel = True, 0, None
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        except BaseException as exc:
            if self._stop(previous):
                cancelled = isinstance(
                    exc, (asyncio.CancelledError, concurrent.futures.CancelledError)
                )
                raise KeyboardInterrupt from None if cancelled else exc
            raise
        if self._stop(previous):
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def waiting_on(self, cancel: Callable[[], Any]) -> Iterator[None]:
        """What a second Ctrl-C cancels while the guarded call waits; thread-safe."""
        if not self._active or threading.current_thread() is not threading.main_thread():
            yield  # a wait outside the guard (another thread's) is not the guard's to cancel
            return
        self._cancel = cancel
        try:
            yield
        finally:
            self._cancel = None

    def _stop(self, previous: Any) -> bool:
        signal.signal(signal.SIGINT, previous)
        self._active, self._cancel = False, None
        return self._count > 0

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self._count += 1
        if self._count >= 3:
            raise KeyboardInterrupt
        if self._count == 2 and self._cancel is not None:
            self._cancel()


class Runtime:
    """Runs pipeline coroutines somewhere and hands back awaitables or blocking results."""

    interrupts = DeferredInterrupt()  # signals are per process: one guard for all

    def check_caller(self) -> None:
        """Raise EventLoopError if the calling thread or loop cannot be served."""

    def submit(
        self, coro: Coroutine[Any, Any, T]
    ) -> concurrent.futures.Future[T] | asyncio.Future[T]:
        raise NotImplementedError

    def run(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """An awaitable for the caller's loop."""
        raise NotImplementedError

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        raise NotImplementedError

    def event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop that submitted coroutines run on (for futures made off it)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class MonitorLoop(Runtime):
    """A background thread running one event loop."""

    def __init__(self, name: str = "aiockpt-monitor") -> None:
        self.loop = new_event_loop()
        # The default executor serves the commit path's small-file and directory calls
        # (aiofiles), retention and restore's hand-off: short calls a few threads keep up
        # with. Bounded and named, so a long run's thread count stays flat whatever the
        # machine's core count (asyncio's own default grows to cores + 4).
        self.loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(IO_THREADS, thread_name_prefix="aiockpt-io")
        )
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            # restore() reads on the default executor: its threads end with the loop.
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if threading.current_thread() is self._thread:
            coro.close()
            raise EventLoopError(
                "aiockpt was called from its own monitor thread (from a done-callback of a "
                "checkpoint handle?); call it from your own code instead"
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(self.submit(coro))

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        future = self.submit(coro)
        with self.interrupts.waiting_on(future.cancel):
            return future.result()

    def event_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()


class CallerLoop(Runtime):
    """Runs coroutines as tasks of the caller's running loop: the first one it is called
    from, for good, since the pipeline's futures and tasks live on that loop."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise EventLoopError(
                "use_monitor = false runs the pipeline on your event loop, so call "
                "aiockpt from inside a running loop (or set use_monitor = true)"
            ) from None
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise EventLoopError(
                "this Checkpointer was first used from another event loop (or thread): "
                "use_monitor = false binds a checkpointer to the one event loop it runs on. "
                "Use it from that loop only, or set use_monitor = true to call it from "
                "several threads or loops"
            )
        return loop

    def check_caller(self) -> None:
        self._bound_loop()

    def submit(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        try:
            loop = self._bound_loop()
        except EventLoopError:
            coro.close()
            raise
        return loop.create_task(coro)

    def run(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return self.submit(coro)

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        coro.close()
        raise EventLoopError(
            "a blocking aiockpt call cannot run the pipeline of an async Checkpointer "
            "with use_monitor = false: await its methods on the loop it runs on"
        )

    def event_loop(self) -> asyncio.AbstractEventLoop:
        return self._bound_loop()


class PrivateLoop(Runtime):
    """A loop owned by a sync caller and run only inside its calls (direct mode).

    Nothing runs between calls, so ``submit`` runs the coroutine to completion before it
    returns: without a monitor thread, a checkpoint is durable when ``checkpoint()``
    returns.
    """

    def __init__(self) -> None:
        self.loop = new_event_loop()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            future.set_result(self.run_sync(coro))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def run(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(self.submit(coro))

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_running():
            # Only a second thread gets here; SyncCheckpointer serialises its calls.
            coro.close()
            raise EventLoopError(
                "this checkpointer's event loop is busy with a call from another thread: "
                "use_monitor = false binds a checkpointer to one thread at a time; call it "
                "from one thread, or set use_monitor = true"
            )
        task = self.loop.create_task(coro)
        # The cancel is handed to the loop, which runs it between callbacks.
        with self.interrupts.waiting_on(lambda: self.loop.call_soon_threadsafe(task.cancel)):
            return self.loop.run_until_complete(task)

    def event_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()
