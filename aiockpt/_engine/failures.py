"""The checkpoints in flight and how each ended: counted, logged, and failures reported.

A background failure is reported once, at the next call (``checkpoint()``, ``wait()``,
``close()``) or by its handle, whichever comes first, as a BackgroundError chained to the
original exception.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .._util.location import Location
from ..distributed.group import is_rank_zero
from ..errors import BackgroundError, CheckpointInProgressError
from ..metrics import CheckpointerStats, CheckpointMetrics

__all__ = ["AnyFuture", "Failure", "FailureLog"]

logger = logging.getLogger(__name__)

AnyFuture = concurrent.futures.Future[Location | None] | asyncio.Future[Location | None]


@dataclass
class Failure:
    step: int
    error: BaseException
    reported: bool = False

    def as_error(self) -> BackgroundError:
        self.reported = True
        error = BackgroundError(
            f"checkpoint of step {self.step} failed in the background: "
            f"{type(self.error).__name__}: {self.error}. The previous committed checkpoint is "
            "intact; fix the cause (see the chained exception) and checkpoint again"
        )
        error.__cause__ = self.error
        return error


class FailureLog:
    """Checkpoints in flight by step, their outcomes counted in ``stats``."""

    def __init__(self, stats: CheckpointerStats, *, on_error: str) -> None:
        self.stats = stats
        self.on_error = on_error
        self._failures: list[Failure] = []
        self._lock = threading.Lock()  # done-callbacks run on the loop's thread
        self._in_flight: dict[int, AnyFuture] = {}
        # The newest checkpoint handed to the background, and who hears of each commit
        # (on the loop's thread): preemption asks whether a step is saved already and how
        # long persisting takes.
        self.last_started: tuple[int, AnyFuture] | None = None
        self.commit_listeners: list[Callable[[CheckpointMetrics], None]] = []

    def failure_for(self, step: int, exc: BaseException) -> Failure:
        with self._lock:
            for failure in self._failures:
                if failure.error is exc:
                    return failure
            failure = Failure(step, exc)
            self._failures.append(failure)
            return failure

    def raise_failures(self) -> None:
        # A future is done a moment before its done-callback registers the failure; look
        # at the futures themselves so the very next call reports it.
        for step, future in list(self._in_flight.items()):
            if future.done() and not future.cancelled() and future.exception() is not None:
                failure = self.failure_for(step, future.exception())  # type: ignore[arg-type]
                if self.on_error == "warn":
                    failure.reported = True
        with self._lock:
            # Failures stay listed once reported, so a late done-callback finds them seen.
            pending = [f for f in self._failures if not f.reported]
            for failure in pending[1:]:
                failure.reported = True
        if pending and self.on_error == "raise":
            raise pending[0].as_error()

    def check_not_in_flight(self, step: int) -> None:
        if step in self._in_flight and not self._in_flight[step].done():
            raise CheckpointInProgressError(
                f"a checkpoint of step {step} is still in flight; await its handle first "
                "or use a new step number"
            )

    def started(self, step: int, metrics: CheckpointMetrics, future: AnyFuture) -> None:
        self.stats.requested += 1
        self._in_flight[step] = future
        self.last_started = (step, future)
        future.add_done_callback(lambda f: self._on_done(step, metrics, f))

    def _on_done(self, step: int, metrics: CheckpointMetrics, future: AnyFuture) -> None:
        self._in_flight.pop(step, None)
        if future.cancelled():
            return
        error = future.exception()
        if error is None and future.result() is None:  # another rank skipped it
            self.stats.skipped += 1
            return
        if error is None:
            self.stats.committed += 1
            for listener in self.commit_listeners:
                listener(metrics)
            if is_rank_zero() and logger.isEnabledFor(logging.INFO):
                logger.info("%s", metrics.summary())
            return
        self.stats.failed += 1
        failure = self.failure_for(step, error)
        if self.on_error == "warn":
            failure.reported = True
            logger.warning("checkpoint of step %d failed", step, exc_info=error)
