"""Preemption signals: caught when configured, acted on at the next step boundary.

A scheduler that preempts a job sends a signal (SIGTERM, often SIGUSR1 ahead of time),
waits a grace period, then sends SIGKILL. With ``preemption_signals`` set, a Checkpointer
installs one handler per signal while it is open. The handler only records which signal
came and when: Python runs it on the main thread between two bytecodes, maybe in the
middle of a capture, so it must not touch the pipeline. The work happens where training
asks for it, at a step boundary (``checkpoint_and_exit``).

The handler replaces the previous one for as long as the Checkpointer is open, and calls
nothing else: the default action of SIGTERM (terminate) or SIGINT (KeyboardInterrupt), or
a framework's handler that raises, would end the process before the save. The same signal
a third time goes to the previous handler, as a way out. ``close()`` puts the previous
handlers back; if a signal came and was never acted on, it is raised again then, so the
process does what it would have done without aiockpt.

Handlers can only be installed from the main thread (Python delivers signals there), so a
Checkpointer with ``preemption_signals`` built on another thread is refused.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..config import Config
from ..distributed.agreement import StopAgreement, Verdict
from ..distributed.group import RankGroup
from ..errors import UsageError
from .deadline import PersistHistory, Tier

__all__ = ["Preemption", "Verdict", "check_can_install"]

logger = logging.getLogger(__name__)

# The arrival of one signal that goes to the previous handler. Not the second: the scheduler
# signals every process of a job and torchrun passes what it receives on to its workers,
# so a worker can get the one SIGTERM twice.
_WAY_OUT = 3

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class _Latch:
    """The process's handlers for the configured signals, shared by every open Preemption.

    Several checkpointers may be open at once: the first to want a signal installs the
    handler, the last to let it go puts the previous one back.
    """

    def __init__(self) -> None:
        self._owners: tuple[Preemption, ...] = ()  # replaced, never mutated: the handler reads it
        self._previous: dict[int, Handler] = {}
        self._users: dict[int, int] = {}
        self._repeats: dict[int, int] = {}  # arrivals of each signal while installed

    def install(self, owner: Preemption, signums: list[int]) -> None:
        for signum in signums:
            if self._users.get(signum, 0) == 0:
                previous = signal.signal(signum, self._on_signal)
                # Still ours if a close() on another thread could not put it back.
                self._previous.setdefault(signum, previous)
            self._users[signum] = self._users.get(signum, 0) + 1
        self._owners = (*self._owners, owner)

    def remove(self, owner: Preemption, signums: list[int]) -> list[int]:
        """Let ``owner``'s signals go; those whose previous handler is back."""
        self._owners = tuple(o for o in self._owners if o is not owner)
        restored = []
        for signum in signums:
            self._users[signum] -= 1
            if self._users[signum] == 0 and self._restore(signum):
                restored.append(signum)
        return restored

    def _restore(self, signum: int) -> bool:
        self._repeats.pop(signum, None)
        if threading.current_thread() is not threading.main_thread():
            # Only the main thread may; _on_signal hands the signal on when it comes.
            return False
        previous = self._previous.pop(signum, None)
        # A handler the program set after ours stays: it is the newer wish.
        if signal.getsignal(signum) == self._on_signal:
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        return True

    def forget_in_child(self) -> None:
        """In a forked child (a DataLoader worker): the signals are the parent's to
        answer; the child must react to them as it would without aiockpt."""
        self._owners = ()
        for signum in [s for s, users in self._users.items() if users]:
            self._users[signum] = 0
            self._restore(signum)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        owners = self._owners
        self._repeats[signum] = self._repeats.get(signum, 0) + 1
        if owners and self._repeats[signum] >= _WAY_OUT:
            # Someone insists (Ctrl-C again and again, a save that hangs): the previous
            # handler has it, as without aiockpt; the default one ends the process, which
            # leaves the newest committed checkpoint as it is.
            for owner in owners:
                owner.answered = True
            self._restore(signum)
            signal.raise_signal(signum)
            return
        for owner in owners:
            owner.record(signum, now)
        if not owners and self._users.get(signum, 0) == 0:
            # Left installed by a close() on another thread: this is the main thread,
            # so put the previous handler back and let it have the signal.
            self._restore(signum)
            signal.raise_signal(signum)


_latch = _Latch()
os.register_at_fork(after_in_child=_latch.forget_in_child)


def check_can_install(config: Config) -> None:
    """Refuse ``preemption_signals`` off the main thread, where no handler can be set."""
    if config.preemption_signals and threading.current_thread() is not threading.main_thread():
        raise UsageError(
            f"preemption_signals = {list(config.preemption_signals)} needs the Checkpointer "
            "(or Trainer) built on the main thread, not on "
            f"{threading.current_thread().name!r}: Python runs signal handlers on the main "
            "thread only and lets no other thread install them. Build it on the main "
            "thread, or leave preemption_signals empty and call checkpoint_and_exit(step) "
            "when a handler of your own says so"
        )


class Preemption:
    """What one Checkpointer knows of preemption: the signal, the deadline, the tiers."""

    def __init__(self, config: Config, ranks: RankGroup | None) -> None:
        self.config = config
        self.grace_s = config.preemption_grace_s
        self.signums = [int(signal.Signals[name]) for name in config.preemption_signals]
        self.received: int | None = None  # the signal this process received
        self.received_at: float | None = None  # time.monotonic() when it came
        # checkpoint_and_exit() took it, or a repeat went to the previous handler.
        self.answered = False
        # Today's one tier: the checkpoint directory; a list of tiers plugs in here.
        self.tiers = [Tier("directory", str(config.directory), PersistHistory())]
        self.agreement: StopAgreement | None = None
        if not self.signums:
            return
        _latch.install(self, self.signums)
        if ranks is not None:
            try:
                self.agreement = StopAgreement(ranks, config.rank_timeout_s)
            except BaseException:
                _latch.remove(self, self.signums)
                self.signums = []
                raise

    def record(self, signum: int, at: float) -> None:
        """The signal handler's one action (the first signal wins)."""
        if self.received is None:
            self.received, self.received_at = signum, at
            if self.agreement is not None:
                self.agreement.record_local(signum, at)

    @property
    def signal(self) -> signal.Signals | None:
        """The signal received here, or (several ranks) at any rank, once known here."""
        signum = self.received or (self.agreement.signal if self.agreement else 0)
        return signal.Signals(signum) if signum else None

    def seconds_left(self) -> float:
        """Of the grace period after the first signal (all of it without a signal)."""
        ends = []
        if self.received_at is not None:
            ends.append(self.received_at + self.grace_s)
        if self.agreement is not None:
            end = self.agreement.deadline(self.grace_s)
            if end is not None:
                ends.append(end)
        return (min(ends) if ends else time.monotonic() + self.grace_s) - time.monotonic()

    def reached(self, step: int) -> Verdict:
        """``step`` is done: save it now, train on, or wait for the other ranks."""
        if self.agreement is None:
            return Verdict.STOP
        return self.agreement.reached(step)

    def close(self) -> None:
        """Put the previous handlers back; raise an unanswered signal again."""
        if self.agreement is not None:
            self.agreement.close(self.config.rank_timeout_s)
            self.agreement = None
        if not self.signums:
            return
        restored = _latch.remove(self, self.signums)
        self.signums = []
        if self.received in restored and not self.answered:
            logger.warning(
                "%s arrived while the checkpointer was open and nothing saved for it; "
                "raising it again now that the previous handler is back",
                signal.Signals(self.received).name,
            )
            signal.raise_signal(self.received)
