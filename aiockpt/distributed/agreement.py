"""Which step every rank stops at after a preemption signal, agreed in the background.

A signal may reach one rank, or all of them at different steps. Every rank must still
save the same step, and none may have trained past it. The ranks agree through a gloo
group of their own (not the one that votes on commits, whose collectives run on another
thread in an order of their own), on a watcher thread per rank: each round, every rank
gathers every rank's row (the signal it received, how long ago, how far it may get, and
whether it is closing). Until a signal comes, that is one small collective every
``IDLE_PERIOD_S`` off the training thread; training itself only stores an int per step
boundary it reports (``reached``) and reads two attributes.

Once a signal is known and every rank has reported a boundary, the rounds agree on a stop
step in two phases:

- *propose* the highest step any rank may reach: ``progress`` is, at every moment, the
  highest boundary its rank can get to without news from the watcher (the boundary after
  the one it reported, while it trains on; that boundary itself, while it waits);
- *confirm* it in the next round if no rank's ``progress`` went past it; else propose the
  new highest. A rank whose boundary reaches the proposal waits there for the answer.

``reached`` stores ``progress`` before it reads the proposal and the watcher sets the
proposal before it reads ``progress`` in the next round, so either the rank sees the
proposal in time or the next round sees the rank's progress past it: a confirmed step is
one that no rank has passed and every rank can reach (ranks behind it train on to it).
Ranks in lock step (DDP) therefore never wait for each other at different boundaries: a
rank only waits at the proposal, which no rank has passed.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .group import RankGroup

__all__ = [
    "BUSY_PERIOD_S",
    "IDLE_PERIOD_S",
    "REPORT_PERIOD_S",
    "Agreed",
    "RankRow",
    "StopAgreement",
    "Verdict",
    "next_agreement",
]

logger = logging.getLogger(__name__)

# How often the ranks compare notes while no signal is known: a signal at one rank reaches
# the others within this (plus a round), far inside any grace period, and one collective
# of a few bytes this often is nothing next to a training step.
IDLE_PERIOD_S = 0.2
# Once a signal is known, every rank reports at its next step boundary: rounds come often
# enough not to add to a step, and not so often that they take the GIL from training.
REPORT_PERIOD_S = 0.02
# Once a step is proposed, a rank that reached it waits for the answer: rounds follow each
# other quickly (a few of them end the agreement).
BUSY_PERIOD_S = 0.002
# How long close() waits for the last round before leaving the watcher to the exit.
CLOSE_TIMEOUT_S = 60.0
NO_PROGRESS = -1  # a rank that has not reported a step boundary yet


class Verdict(enum.Enum):
    """What a rank does at a step boundary, once a signal is known."""

    CONTINUE = "continue"  # train the next step (the stop step is later, or undecided)
    WAIT = "wait"  # ask again shortly: the ranks are still agreeing
    STOP = "stop"  # save this step and exit


@dataclass(frozen=True)
class RankRow:
    """One rank's row of a round."""

    signal: int  # the signal it received (0: none)
    elapsed_ms: int  # how long ago it received it
    progress: int  # the highest boundary it may reach without news (NO_PROGRESS: unknown)
    closing: bool  # its checkpointer is closing: the rounds end

    def as_list(self) -> list[int]:
        return [self.signal, self.elapsed_ms, self.progress, int(self.closing)]

    @classmethod
    def from_list(cls, values: list[int]) -> RankRow:
        signal, elapsed_ms, progress, closing = values
        return cls(signal, elapsed_ms, progress, bool(closing))


@dataclass(frozen=True)
class Agreed:
    """What the rounds so far decided; every rank computes the same from the same rows."""

    signal: int = 0  # the signal of the lowest rank that received one
    elapsed_ms: int = 0  # the longest any rank has had it, at the last round
    proposal: int | None = None
    stop_step: int | None = None  # confirmed: every rank saves this step
    over: bool = False  # a rank is closing: no more rounds


def next_agreement(agreed: Agreed, rows: Sequence[RankRow]) -> Agreed:
    """The decision after one round with ``rows`` (one per rank, in rank order)."""
    if any(row.closing for row in rows):
        return replace(agreed, over=True)
    signalled = [row for row in rows if row.signal]
    if not signalled and not agreed.signal:
        return agreed
    signal = agreed.signal or signalled[0].signal
    elapsed = max((row.elapsed_ms for row in signalled), default=agreed.elapsed_ms)
    agreed = replace(agreed, signal=signal, elapsed_ms=elapsed)
    progress = [row.progress for row in rows]
    if NO_PROGRESS in progress:
        return agreed  # a rank that has not reported could be anywhere
    highest = max(progress)
    if agreed.proposal is not None and highest <= agreed.proposal:
        return replace(agreed, stop_step=agreed.proposal)
    return replace(agreed, proposal=highest)


class StopAgreement:
    """The watcher thread of one rank and what the training thread asks it.

    Built on every rank at the same point (it creates a gloo group, a collective call).
    """

    def __init__(self, ranks: RankGroup, timeout_seconds: float) -> None:
        self.ranks = ranks.sibling(timeout_seconds)
        self.local_signal = 0
        self.local_since: float | None = None  # time.monotonic() of the local signal
        self.progress = NO_PROGRESS
        self.agreed = Agreed()
        # time.monotonic() of the first signal at any rank, as this rank reckons it.
        self.first_since: float | None = None
        self.error: BaseException | None = None
        self._closing = False
        self._waiting_at: int | None = None
        self._thread = threading.Thread(target=self._watch, name="aiockpt-preemption", daemon=True)
        self._thread.start()

    # -- the training thread ----------------------------------------------------------------
    def record_local(self, signum: int, since: float) -> None:
        """This rank received ``signum`` at ``since`` (time.monotonic())."""
        if not self.local_signal:
            self.local_signal, self.local_since = signum, since

    @property
    def signal(self) -> int:
        """The signal any rank received, as far as this rank knows (0: none)."""
        return self.local_signal or self.agreed.signal

    def deadline(self, grace_s: float) -> float | None:
        """time.monotonic() when the first rank's grace period ends, as far as known."""
        ends = []
        if self.local_since is not None:
            ends.append(self.local_since + grace_s)
        if self.first_since is not None:
            ends.append(self.first_since + grace_s)
        return min(ends, default=None)

    def reached(self, step: int) -> Verdict:
        """This rank finished step ``step``: go on, wait, or stop and save it."""
        stop = self.agreed.stop_step
        if stop is not None:
            return Verdict.STOP if step >= stop else Verdict.CONTINUE
        if self._waiting_at != step:
            # Published before the proposal is read: see the module docstring.
            self.progress = step + 1
        proposal = self.agreed.proposal
        if proposal is not None and step >= proposal:
            self.progress, self._waiting_at = step, step
            return Verdict.WAIT
        self._waiting_at = None
        return Verdict.CONTINUE

    @property
    def watching(self) -> bool:
        """Whether the rounds still run (they end once a stop step is confirmed, a rank
        closes, or a collective fails)."""
        return self._thread.is_alive()

    def all_fit(self, fits: bool) -> bool:
        """Whether every rank's save fits its grace period (a collective; after STOP)."""
        self._thread.join()
        return all(self.ranks.all_gather(fits))

    def close(self, timeout_s: float) -> None:
        """End the rounds on every rank (each one ends when any rank closes)."""
        self._closing = True
        # The other ranks' watchers answer within a round whatever their training does;
        # only a rank that is gone or frozen keeps this one waiting, up to the timeout.
        self._thread.join(min(timeout_s, CLOSE_TIMEOUT_S))
        if self._thread.is_alive():
            logger.warning(
                "the preemption watcher did not stop within %.0f s: another rank may be "
                "gone; leaving it to the process's exit",
                min(timeout_s, CLOSE_TIMEOUT_S),
            )
            return
        self.ranks.destroy()

    # -- the watcher thread -----------------------------------------------------------------
    def _row(self) -> RankRow:
        elapsed = 0
        if self.local_since is not None:
            elapsed = int((time.monotonic() - self.local_since) * 1e3)
        return RankRow(self.local_signal, elapsed, self.progress, self._closing)

    def _watch(self) -> None:
        try:
            while True:
                rows = [
                    RankRow.from_list(row)
                    for row in self.ranks.all_gather_ints(self._row().as_list())
                ]
                agreed = next_agreement(self.agreed, rows)
                if agreed.signal:
                    # Clocks of other hosts do not compare; how long ago they received it
                    # does (give or take one round).
                    since = time.monotonic() - agreed.elapsed_ms / 1e3
                    self.first_since = min(since, self.first_since or since)
                # The last thing a round does: the training thread may act on it at once.
                self.agreed = agreed
                if agreed.over or agreed.stop_step is not None:
                    return
                time.sleep(
                    IDLE_PERIOD_S
                    if not agreed.signal
                    else REPORT_PERIOD_S
                    if agreed.proposal is None
                    else BUSY_PERIOD_S
                )
        except Exception as exc:  # a rank died, or the group was torn down
            self.error = exc
            logger.warning("ranks can no longer agree on a preemption step: %s", exc)
