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
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

__all__ = ["CallerLoop", "MonitorLoop", "PrivateLoop", "Runtime", "new_event_loop"]

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop has no Windows build; asyncio's loop does the same job
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Runtime:
    """Runs pipeline coroutines somewhere and hands back awaitables or blocking results."""

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
            raise RuntimeError("aiockpt: blocking call made from its own monitor thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(self.submit(coro))

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def event_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()


class CallerLoop(Runtime):
    """Runs coroutines as tasks of the loop that is running when they are submitted."""

    def submit(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            raise RuntimeError(
                "use_monitor = false runs the pipeline on your event loop, so call "
                "aiockpt from inside a running loop (or set use_monitor = true)"
            ) from None
        return loop.create_task(coro)

    def run(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return self.submit(coro)

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        coro.close()
        raise RuntimeError("a blocking aiockpt call cannot run inside a running event loop")

    def event_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()


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
            future.set_result(self.loop.run_until_complete(coro))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def run(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(self.submit(coro))

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def event_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()
