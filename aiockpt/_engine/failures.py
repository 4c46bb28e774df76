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
    # What failed, in words (a path-level save names its path); None: "checkpoint of step N".
    what: str | None = None

    def as_error(self) -> BackgroundError:
        self.reported = True
        what = self.what or f"checkpoint of step {self.step}"
        error = BackgroundError(
            f"{what} failed in the background: "
            f"{type(self.error).__name__}: {self.error}. The previous committed checkpoint is "
            "intact; fix the cause (see the chained exception) and checkpoint again"
        )
        error.__cause__ = self.error
        return error


class FailureLog:
    """Checkpoints in flight (several may share a step: path-level saves), their
    outcomes counted in ``stats``."""

    def __init__(self, stats: CheckpointerStats, *, on_error: str) -> None:
        self.stats = stats
        self.on_error = on_error
        self._failures: list[Failure] = []
        self._lock = threading.Lock()  # done-callbacks run on the loop's thread
        self._in_flight: dict[AnyFuture, tuple[int, str | None]] = {}
        # The newest checkpoint handed to the background, and who hears of each commit
        # (on the loop's thread): preemption asks whether a step is saved already and how
        # long persisting takes.
        self.last_started: tuple[int, AnyFuture] | None = None
        self.commit_listeners: list[Callable[[CheckpointMetrics], None]] = []

    def failure_for(self, step: int, exc: BaseException, what: str | None = None) -> Failure:
        with self._lock:
            for failure in self._failures:
                if failure.error is exc:
                    return failure
            failure = Failure(step, exc, what=what)
            self._failures.append(failure)
            return failure

    def raise_failures(self) -> None:
        # A future is done a moment before its done-callback registers the failure; look
        # at the futures themselves so the very next call reports it.
        for future, (step, what) in list(self._in_flight.items()):
            if future.done() and not future.cancelled() and future.exception() is not None:
                failure = self.failure_for(step, future.exception(), what)  # type: ignore[arg-type]
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
        in_flight = [f for f, (s, _) in list(self._in_flight.items()) if s == step]
        if any(not future.done() for future in in_flight):
            raise CheckpointInProgressError(
                f"a checkpoint of step {step} is still in flight; await its handle first "
                "or use a new step number"
            )

    def started(
        self, step: int, metrics: CheckpointMetrics, future: AnyFuture, what: str | None = None
    ) -> None:
        self.stats.requested += 1
        self._in_flight[future] = (step, what)
        self.last_started = (step, future)
        future.add_done_callback(lambda f: self._on_done(step, metrics, f, what))

    def _on_done(
        self, step: int, metrics: CheckpointMetrics, future: AnyFuture, what: str | None
    ) -> None:
        self._in_flight.pop(future, None)
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
        failure = self.failure_for(step, error, what)
        if self.on_error == "warn":
            failure.reported = True
            logger.warning("%s failed", what or f"checkpoint of step {step}", exc_info=error)
