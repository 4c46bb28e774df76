"""When the Trainer checkpoints: interval policies.

Pure logic with an injected clock (no torch needed), so the policies can be tested
against simulated time. The Trainer drives a policy with four calls::

    should_checkpoint(step, now)   after each optimizer step: checkpoint now?
    record_step(seconds)           how long that optimizer step took (checkpoint stall excluded)
    checkpoint_taken(step, now)    a checkpoint was captured (whoever asked for it); optional
    record_checkpoint(stall, persist)  once it is durable: what training waited, what the disk took
    reset(step, now)               training (re)starts here: after a resume, or a failed
                                   checkpoint; optional

Policies: :class:`EveryNSteps`, :class:`EveryNSeconds`, :class:`AdaptiveOverhead` (CheckFreq's
idea: keep the stall per checkpoint under a fraction of the time between checkpoints),
:class:`AnyOf` and :class:`Never`; :func:`policy_from_config` builds one from a Config.

Every policy warns once (logger ``"aiockpt"``, rank 0 only) when checkpoints are asked for
more often than they can persist: the backlog the source notes found when checkpointing
every step, which ends in stalls on backpressure or skipped checkpoints. With
``max_in_flight`` (the config's max_async) checkpoints allowed to overlap, that is when one
takes longer to persist than ``max_in_flight`` intervals.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any, Protocol, runtime_checkable

from .._util.stats import median
from ..distributed.group import is_rank_zero

__all__ = [
    "AdaptiveOverhead",
    "AnyOf",
    "BasePolicy",
    "EveryNSeconds",
    "EveryNSteps",
    "IntervalPolicy",
    "Never",
    "policy_from_config",
]

logger = logging.getLogger(__name__)

# A median over a window shrugs off one slow step (an eval pass, a GC pause, a data-loader
# hiccup) that an EMA would smear over many decisions, and still follows a real change
# within half a window.
STEP_WINDOW = 32
CHECKPOINT_WINDOW = 5
# ceil() of a ratio computed in floating point: 0.05 / (0.05 * 0.1) is 10.000000000000002.
_EPS = 1e-9


@runtime_checkable
class IntervalPolicy(Protocol):
    """What the Trainer needs from a policy.

    Optional: ``checkpoint_taken(step, now)``, called whenever a checkpoint is captured,
    and ``reset(step, now)``, called after a resume or a failed checkpoint.
    """

    def should_checkpoint(self, step: int, now: float) -> bool:
        """Whether to checkpoint now, after an optimizer step.

        Args:
            step: optimizer steps done so far (the step a checkpoint now would save).
            now: the Trainer's clock, in seconds.

        Returns:
            True to checkpoint at this step.
        """
        ...

    def record_step(self, seconds: float) -> None:
        """Take note of one optimizer step's duration.

        Args:
            seconds: wall time of the step, forward to optimizer step.
        """
        ...

    def record_checkpoint(self, stall_seconds: float, persist_seconds: float) -> None:
        """Take note of what a durable checkpoint cost.

        Args:
            stall_seconds: how long training waited for its capture.
            persist_seconds: time from capture to durable commit.
        """
        ...


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


class BasePolicy:
    """Measurements and the backlog warning shared by every policy.

    Keeps the recent optimizer-step times, checkpoint stalls and persist times. The stall
    of the very first checkpoint is kept apart: it plans the layout and allocates (and
    pins) the staging memory once, so it says nothing about the next ones.
    """

    def __init__(self) -> None:
        self.step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self.stalls: deque[float] = deque(maxlen=CHECKPOINT_WINDOW)
        self.persists: deque[float] = deque(maxlen=CHECKPOINT_WINDOW)
        self.first_stall: float | None = None
        self.last_step: int | None = None
        self.last_time: float | None = None
        self.taken = 0
        self.recorded = 0
        self.warn_backlog = True
        self.warned = False
        # Checkpoints that may persist at once (max_async): up to this many intervals of
        # persist time overlap without stalling anything.
        self.max_in_flight = 1

    # Whether decisions follow the wall clock: each rank of a run would then decide on its
    # own, and the ranks must all checkpoint the same steps.
    uses_clock = False

    def decides_by_clock(self) -> bool:
        """Whether decisions follow the wall clock (refused under torch.distributed).

        Returns:
            True when ranks could decide differently at the same step.
        """
        return self.uses_clock

    # -- the protocol ----------------------------------------------------------------------
    def should_checkpoint(self, step: int, now: float) -> bool:
        """Whether to checkpoint now, after an optimizer step.

        Args:
            step: optimizer steps done so far (the step a checkpoint now would save).
            now: the Trainer's clock, in seconds.

        Returns:
            True to checkpoint at this step.
        """
        raise NotImplementedError

    def record_step(self, seconds: float) -> None:
        """Take note of one optimizer step's duration (negative or infinite ones are
        ignored).

        Args:
            seconds: wall time of the step, forward to optimizer step.
        """
        if seconds >= 0 and math.isfinite(seconds):
            self.step_times.append(float(seconds))

    def checkpoint_taken(self, step: int, now: float) -> None:
        """Start the next interval: a checkpoint was just captured.

        Args:
            step: the step it saves.
            now: the Trainer's clock, in seconds.
        """
        self.last_step, self.last_time = step, now
        self.taken += 1

    def reset(self, step: int, now: float) -> None:
        """Count the next interval from ``step``: after a resume, or a failed checkpoint.

        Args:
            step: the step training goes on from.
            now: the Trainer's clock, in seconds.
        """
        # Count the next interval from here; a checkpoint that failed will never report.
        self.last_step, self.last_time = step, now
        self.taken = self.recorded

    def record_checkpoint(self, stall_seconds: float, persist_seconds: float) -> None:
        """Take note of what a durable checkpoint cost; warns once when checkpoints are
        requested faster than they persist.

        Args:
            stall_seconds: how long training waited for its capture (the first one is
                kept apart: it includes one-time setup).
            persist_seconds: time from capture to durable commit.
        """
        if self.first_stall is None and not self.stalls:
            self.first_stall = float(stall_seconds)
        else:
            self.stalls.append(float(stall_seconds))
        self.persists.append(float(persist_seconds))
        self.recorded += 1
        self._check_backlog()

    # -- estimates -------------------------------------------------------------------------
    @property
    def step_seconds(self) -> float | None:
        """Median recent optimizer-step time, or None before the first step."""
        return median(self.step_times)

    @property
    def stall_seconds(self) -> float | None:
        """Median recent stall per checkpoint (the first one excluded), or None."""
        return median(self.stalls)

    @property
    def persist_seconds(self) -> float | None:
        """Median recent time from capture to durable commit, or None."""
        return median(self.persists)

    def interval_seconds(self) -> float | None:
        """The time between checkpoints this policy aims at, when it can tell.

        Returns:
            Seconds between checkpoints, or None while it is not known.
        """
        return None

    def describe(self) -> str:
        """The policy's settings, as a warning names them.

        Returns:
            e.g. ``"interval_steps = 10 at 52.0 ms per step"``.
        """
        return type(self).__name__

    def advice(self, persist: float) -> str:
        """What to change so that checkpoints are at least ``persist`` seconds apart.

        Args:
            persist: the interval, in seconds, that checkpoints need.

        Returns:
            One sentence naming the setting to change.
        """
        return "checkpoint less often"

    # -- the backlog warning ---------------------------------------------------------------
    def _check_backlog(self) -> None:
        if self.warned or not self.warn_backlog or len(self.persists) < 2:
            return  # one sample may be a cold start (first write, empty page cache)
        interval, persist = self.interval_seconds(), self.persist_seconds
        overlap = max(1, self.max_in_flight)
        if interval is None or persist is None or persist <= interval * overlap:
            return
        self.warned = True
        if is_rank_zero():
            logger.warning(
                "checkpoints are requested every %s (%s) but each takes %s to "
                "persist, longer than %d interval(s) (max_async = %d may overlap), so they "
                "pile up: training stalls on backpressure (or, with on_backpressure = "
                '"skip", checkpoints are dropped). %s, or set on_backpressure = "skip" to '
                "drop checkpoints instead of waiting.",
                _seconds(interval),
                self.describe(),
                _seconds(persist),
                overlap,
                overlap,
                self.advice(persist / overlap),
            )

    # -- Stateful: a resumed run keeps its measurements instead of probing again -----------
    def state_dict(self) -> dict[str, Any]:
        """The measurements, so that a resumed run need not probe again.

        Returns:
            Recent step times, stalls and persist times.
        """
        return {
            "step_times": list(self.step_times),
            "stalls": list(self.stalls),
            "persists": list(self.persists),
            "first_stall": self.first_stall,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back the measurements of :meth:`state_dict`.

        Args:
            state: what :meth:`state_dict` returned (missing entries start empty).
        """
        self.step_times = deque(map(float, state.get("step_times", ())), maxlen=STEP_WINDOW)
        self.stalls = deque(map(float, state.get("stalls", ())), maxlen=CHECKPOINT_WINDOW)
        self.persists = deque(map(float, state.get("persists", ())), maxlen=CHECKPOINT_WINDOW)
        first = state.get("first_stall")
        self.first_stall = None if first is None else float(first)


class Never(BasePolicy):
    """No automatic checkpoints: only ``trainer.checkpoint()`` or ``enable_checkpoint=True``."""

    def should_checkpoint(self, step: int, now: float) -> bool:
        return False


class EveryNSteps(BasePolicy):
    """Checkpoint at every step that is a multiple of ``n`` (n, 2n, ...), resumed or not.

    Args:
        n: steps between checkpoints, an integer >= 1 (else ValueError).
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"EveryNSteps(n={n!r}): expected an integer >= 1")
        self.n = n

    def should_checkpoint(self, step: int, now: float) -> bool:
        return step > 0 and step % self.n == 0

    def interval_seconds(self) -> float | None:
        step = self.step_seconds
        return None if step is None else self.n * step

    def describe(self) -> str:
        step = self.step_seconds
        at = f" at {_seconds(step)} per step" if step is not None else ""
        return f"interval_steps = {self.n}{at}"

    def advice(self, persist: float) -> str:
        step = self.step_seconds
        if not step:
            return "Raise interval_steps"
        return f"Raise interval_steps to at least {math.ceil(persist / step - _EPS)}"


class EveryNSeconds(BasePolicy):
    """Checkpoint once ``seconds`` have passed since the last checkpoint (or the start).

    Args:
        seconds: the interval, a finite number > 0 (else ValueError).
    """

    uses_clock = True

    def __init__(self, seconds: float) -> None:
        super().__init__()
        if not isinstance(seconds, (int, float)) or not (0 < seconds < math.inf):
            raise ValueError(f"EveryNSeconds(seconds={seconds!r}): expected a number > 0")
        self.seconds = float(seconds)

    def should_checkpoint(self, step: int, now: float) -> bool:
        if self.last_time is None:
            self.last_time = now  # the clock starts at the first step
            return False
        return now - self.last_time >= self.seconds

    def interval_seconds(self) -> float | None:
        return self.seconds

    def describe(self) -> str:
        return f"interval_seconds = {self.seconds:g}"

    def advice(self, persist: float) -> str:
        return f"Raise interval_seconds to at least {math.ceil(persist)}"


class AdaptiveOverhead(BasePolicy):
    """Checkpoint as often as keeps ``stall / (interval * step_time) <= max_overhead``.

    The interval in steps is ``ceil(stall / (max_overhead * step_time))``, at least 1,
    from the median recent step time and stall, so it follows either when it changes
    (a bigger batch, a slower disk that makes checkpoints wait on backpressure). Until a
    representative stall is known it probes: a checkpoint after ``warmup_steps`` steps,
    and another ``warmup_steps`` later (the first one's stall includes one-time setup),
    never while a probe is still in flight.

    Args:
        max_overhead: the budget, a fraction strictly between 0 and 1 (0.05: training at
            most 5% slower); else ValueError.
        warmup_steps: steps before each of the two probes, an integer >= 1.
    """

    uses_clock = True

    def __init__(self, max_overhead: float, *, warmup_steps: int = 10) -> None:
        super().__init__()
        if not isinstance(max_overhead, (int, float)) or not (0 < max_overhead < 1):
            raise ValueError(
                f"AdaptiveOverhead(max_overhead={max_overhead!r}): expected a fraction "
                "strictly between 0 and 1 (0.05 = at most 5% slower training)"
            )
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps!r}: expected an integer >= 1")
        self.max_overhead = float(max_overhead)
        self.warmup_steps = warmup_steps

    def interval_steps(self) -> int | None:
        """Steps between checkpoints that keep the budget.

        Returns:
            The interval in steps (at least 1), or None until step time and stall are
            measured.
        """
        step, stall = self.step_seconds, self.stall_seconds
        if step is None or stall is None:
            return None
        if step <= 0:
            return 1
        return max(1, math.ceil(stall / (self.max_overhead * step) - _EPS))

    def should_checkpoint(self, step: int, now: float) -> bool:
        since = step - (self.last_step if self.last_step is not None else 0)
        interval = self.interval_steps()
        if interval is not None:
            return since >= interval
        # Probing: wait for a step time, and for the previous probe's numbers.
        if len(self.step_times) == 0 or self.taken > self.recorded:
            return False
        return since >= self.warmup_steps

    def interval_seconds(self) -> float | None:
        interval, step = self.interval_steps(), self.step_seconds
        return None if interval is None or step is None else interval * step

    def describe(self) -> str:
        interval, step, stall = self.interval_steps(), self.step_seconds, self.stall_seconds
        if interval is None or step is None or stall is None:
            return f"max_overhead = {self.max_overhead:g}"
        return (
            f"max_overhead = {self.max_overhead:g}: every {interval} steps of "
            f"{_seconds(step)} for a stall of {_seconds(stall)}"
        )

    def advice(self, persist: float) -> str:
        return (
            "Lower the checkpoint frequency: a smaller max_overhead, or a faster disk "
            "(the stall is small, the write is what falls behind)"
        )


class AnyOf(BasePolicy):
    """Checkpoint when any of ``policies`` says so; it alone warns about a backlog.

    Args:
        policies: at least one policy (else ValueError); their own backlog warnings are
            turned off.
    """

    def __init__(self, *policies: BasePolicy) -> None:
        super().__init__()
        if not policies:
            raise ValueError("AnyOf() needs at least one policy")
        self.policies = list(policies)
        self.uses_clock = any(p.decides_by_clock() for p in self.policies)
        for policy in self.policies:
            policy.warn_backlog = False  # one warning, about the shortest interval

    def should_checkpoint(self, step: int, now: float) -> bool:
        # Ask every policy (no short-circuit): EveryNSeconds starts its clock on the first ask.
        answers = [p.should_checkpoint(step, now) for p in self.policies]
        return any(answers)

    def record_step(self, seconds: float) -> None:
        super().record_step(seconds)
        for policy in self.policies:
            policy.record_step(seconds)

    def checkpoint_taken(self, step: int, now: float) -> None:
        super().checkpoint_taken(step, now)
        for policy in self.policies:
            policy.checkpoint_taken(step, now)

    def reset(self, step: int, now: float) -> None:
        super().reset(step, now)
        for policy in self.policies:
            policy.reset(step, now)

    def record_checkpoint(self, stall_seconds: float, persist_seconds: float) -> None:
        for policy in self.policies:
            policy.record_checkpoint(stall_seconds, persist_seconds)
        super().record_checkpoint(stall_seconds, persist_seconds)

    def _shortest(self) -> BasePolicy | None:
        known: list[tuple[float, BasePolicy]] = []
        for policy in self.policies:
            seconds = policy.interval_seconds()
            if seconds is not None:
                known.append((seconds, policy))
        return min(known, key=lambda item: item[0])[1] if known else None

    def interval_seconds(self) -> float | None:
        shortest = self._shortest()
        return None if shortest is None else shortest.interval_seconds()

    def describe(self) -> str:
        shortest = self._shortest()
        return shortest.describe() if shortest is not None else "any of several policies"

    def advice(self, persist: float) -> str:
        shortest = self._shortest()
        return shortest.advice(persist) if shortest is not None else super().advice(persist)

    def state_dict(self) -> dict[str, Any]:
        """The measurements of every policy, in order.

        Returns:
            ``{"policies": [...]}``, one state per policy.
        """
        return {"policies": [p.state_dict() for p in self.policies]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give each policy its saved measurements; a different number of policies than
        were saved starts measuring afresh.

        Args:
            state: what :meth:`state_dict` returned.
        """
        saved = state.get("policies", [])
        if len(saved) == len(self.policies):
            for policy, policy_state in zip(self.policies, saved, strict=True):
                policy.load_state_dict(policy_state)
        # A different set of policies than the one that saved: start measuring afresh.


def policy_from_config(config: Any) -> BasePolicy:
    """The policy that a Config's interval_steps / interval_seconds / max_overhead ask for,
    and the memory tier's ``memory.interval_steps``.

    Several set: checkpoint when any says so. None set: :class:`Never` (checkpoint
    explicitly with ``trainer.checkpoint()`` or ``enable_checkpoint=True``).

    Args:
        config: a :class:`~aiockpt.Config` (or any object with those attributes and
            ``max_async``).

    Returns:
        The policy, told how many checkpoints may persist at once.
    """
    policies: list[BasePolicy] = []
    if getattr(config, "interval_steps", None) is not None:
        policies.append(EveryNSteps(config.interval_steps))
    if getattr(config, "interval_seconds", None) is not None:
        policies.append(EveryNSeconds(config.interval_seconds))
    if getattr(config, "max_overhead", None) is not None:
        policies.append(AdaptiveOverhead(config.max_overhead))
    memory = getattr(config, "memory", None)
    if getattr(memory, "interval_steps", None) is not None:
        # The memory tier's interval: those checkpoints stay in RAM unless a slower tier
        # is due at the same step.
        policies.append(EveryNSteps(memory.interval_steps))  # type: ignore[union-attr]
    if not policies:
        return Never()
    policy = policies[0] if len(policies) == 1 else AnyOf(*policies)
    policy.max_in_flight = getattr(config, "max_async", 1)
    return policy
