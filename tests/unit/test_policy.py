"""Interval policies against simulated time: every N steps, every T seconds, the adaptive
overhead budget (CheckFreq-like), their combination, and the once-only backlog warning."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

import aiockpt
from aiockpt.training.policy import (
    AdaptiveOverhead,
    AnyOf,
    BasePolicy,
    EveryNSeconds,
    EveryNSteps,
    Never,
    policy_from_config,
)


@dataclass
class Run:
    """What a simulated training run did under a policy."""

    checkpoints: list[int] = field(default_factory=list)
    train_seconds: dict[int, float] = field(default_factory=dict)  # per step
    stall_seconds: dict[int, float] = field(default_factory=dict)  # per checkpointed step

    def overhead(self, first: int, last: int) -> float:
        """Stall / training time between the checkpoints nearest ``first`` and ``last``.

        Each checkpoint pays for the steps since the previous one, so the window runs
        from just after one checkpoint up to and including a later one.
        """
        start = min(s for s in self.checkpoints if s >= first)
        end = max(s for s in self.checkpoints if s <= last)
        train = sum(t for s, t in self.train_seconds.items() if start < s <= end)
        stall = sum(t for s, t in self.stall_seconds.items() if start < s <= end)
        return stall / train

    def gaps(self, first: int, last: int) -> set[int]:
        steps = [s for s in self.checkpoints if first <= s <= last]
        return {b - a for a, b in itertools.pairwise(steps)}


def simulate(
    policy: BasePolicy,
    steps: int,
    step_time: Callable[[int], float],
    stall: Callable[[int], float],
    persist: float = 0.0,
    start: int = 0,
) -> Run:
    """Drive ``policy`` as the Trainer does, on a fake clock; checkpoints are durable at once."""
    run, now = Run(), 0.0
    for step in range(start + 1, start + steps + 1):
        seconds = step_time(step)
        now += seconds
        run.train_seconds[step] = seconds
        policy.record_step(seconds)
        if policy.should_checkpoint(step, now):
            cost = stall(step)
            now += cost
            run.checkpoints.append(step)
            run.stall_seconds[step] = cost
            policy.checkpoint_taken(step, now)
            policy.record_checkpoint(cost, persist)
    return run


def constant(value: float) -> Callable[[int], float]:
    return lambda step: value


def noisy(value: float, spread: float, seed: int) -> Callable[[int], float]:
    rng = random.Random(seed)
    return lambda step: value * rng.uniform(1 - spread, 1 + spread)


# -- every N steps, every T seconds ----------------------------------------------------------
def test_every_n_steps_checkpoints_at_multiples() -> None:
    run = simulate(EveryNSteps(5), 23, constant(0.1), constant(0.01))
    assert run.checkpoints == [5, 10, 15, 20]
    # Multiples of n after a resume too: a run resumed at step 12 checkpoints at 15, 20.
    run = simulate(EveryNSteps(5), 10, constant(0.1), constant(0.01), start=12)
    assert run.checkpoints == [15, 20]
    assert not EveryNSteps(5).should_checkpoint(0, 0.0)


def test_every_n_seconds_with_a_fake_clock() -> None:
    policy = EveryNSeconds(1.0)
    # The clock starts at the first ask; 0.3 s steps: 1.0 s has passed after step 4 (t=1.2).
    # The clock starts at the first ask (the end of step 1, t=0.3): 0.3 s steps reach
    # 1.0 s later at step 5 (t=1.5), then step 9 (t=2.7), then step 13.
    run = simulate(policy, 14, constant(0.3), constant(0.0))
    assert run.checkpoints == [5, 9, 13]
    policy = EveryNSeconds(10.0)
    assert not policy.should_checkpoint(1, 100.0)
    assert not policy.should_checkpoint(2, 109.9)
    assert policy.should_checkpoint(3, 110.0)
    policy.checkpoint_taken(3, 110.5)  # counts from the last checkpoint, whoever took it
    assert not policy.should_checkpoint(4, 120.0)
    assert policy.should_checkpoint(5, 120.5)
    policy.reset(5, 200.0)  # a resume restarts the clock
    assert not policy.should_checkpoint(6, 209.0)
    assert policy.should_checkpoint(7, 210.0)


def test_never_and_policy_from_config() -> None:
    assert not simulate(Never(), 100, constant(0.1), constant(0.1)).checkpoints
    cfg = aiockpt.Config()
    assert isinstance(policy_from_config(cfg), Never)
    assert isinstance(policy_from_config(cfg.replace(interval_steps=3)), EveryNSteps)
    assert isinstance(policy_from_config(cfg.replace(interval_seconds=2.5)), EveryNSeconds)
    adaptive = policy_from_config(cfg.replace(max_overhead=0.05))
    assert isinstance(adaptive, AdaptiveOverhead) and adaptive.max_overhead == 0.05
    both = policy_from_config(cfg.replace(interval_steps=7, interval_seconds=1.0))
    assert isinstance(both, AnyOf)
    assert [type(p) for p in both.policies] == [EveryNSteps, EveryNSeconds]


def test_any_of_checkpoints_when_any_says_so() -> None:
    # Every 7 steps, or 1.0 s (4 steps of 0.25 s) after the last checkpoint or the first ask.
    run = simulate(AnyOf(EveryNSteps(7), EveryNSeconds(1.0)), 19, constant(0.25), constant(0))
    assert run.checkpoints == [5, 7, 11, 14, 18]


@pytest.mark.parametrize(
    "make",
    [
        lambda: EveryNSteps(0),
        lambda: EveryNSteps(True),
        lambda: EveryNSeconds(0),
        lambda: AdaptiveOverhead(0),
        lambda: AdaptiveOverhead(1.0),
        lambda: AdaptiveOverhead(0.1, warmup_steps=0),
        lambda: AnyOf(),
    ],
)
def test_bad_arguments(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


# -- the adaptive overhead budget ------------------------------------------------------------
def test_adaptive_interval_formula_and_floor_of_one() -> None:
    policy = AdaptiveOverhead(0.05)
    for _ in range(5):
        policy.record_step(0.1)
    policy.record_checkpoint(5.0, 1.0)  # the first (cold) stall is not used
    assert policy.interval_steps() is None
    policy.record_checkpoint(0.05, 1.0)
    assert policy.interval_steps() == 10  # ceil(0.05 / (0.05 * 0.1)), despite rounding
    policy.record_checkpoint(0.051, 1.0)
    policy.record_checkpoint(0.051, 1.0)
    assert policy.interval_steps() == 11
    cheap = AdaptiveOverhead(0.5)
    cheap.record_step(1.0)
    cheap.record_checkpoint(0.0, 0.0)
    cheap.record_checkpoint(0.0, 0.0)
    assert cheap.interval_steps() == 1  # never less than one step


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    ("budget", "step", "stall"), [(0.02, 0.1, 0.03), (0.05, 0.02, 0.2), (0.01, 0.05, 0.002)]
)
def test_adaptive_keeps_the_budget(seed: int, budget: float, step: float, stall: float) -> None:
    """Step times and stalls vary by +-20% around their means; the first stall is 2 s."""
    noisy_stall = noisy(stall, 0.2, seed + 100)
    taken: list[int] = []

    def stall_of(s: int) -> float:
        taken.append(s)
        # The first checkpoint plans the layout and pins memory: slow, once.
        return 2.0 if len(taken) == 1 else noisy_stall(s)

    steps = 20_000
    run = simulate(AdaptiveOverhead(budget), steps, noisy(step, 0.2, seed), stall_of)
    # From the first checkpoint on measured numbers (the two before it are warm-up probes).
    achieved = run.overhead(run.checkpoints[2], steps)
    assert achieved <= budget * 1.05
    # And the budget is used, not wasted: the interval is the shortest that keeps it.
    assert achieved >= budget * 0.8
    expected = -(-stall // (budget * step))
    assert max(run.gaps(1000, steps)) <= expected * 1.35 + 1  # +1: ceil() of a noisy ratio
    assert min(run.gaps(1000, steps)) >= max(1, expected * 0.7)


def test_adaptive_follows_a_change_of_step_time() -> None:
    budget, stall = 0.02, 0.03
    policy = AdaptiveOverhead(budget)
    run = simulate(policy, 3000, lambda s: 0.1 if s <= 1500 else 0.05, constant(stall))
    assert run.gaps(300, 1500) == {15}  # 0.03 / (0.02 * 0.1)
    assert run.gaps(1600, 3000) == {30}  # faster steps: checkpoint half as often
    assert run.overhead(run.checkpoints[1], 1500) <= budget * 1.05
    assert run.overhead(1600, 3000) <= budget * 1.05


def test_adaptive_follows_a_change_of_stall() -> None:
    budget = 0.02
    policy = AdaptiveOverhead(budget)
    run = simulate(policy, 4000, constant(0.1), lambda s: 0.03 if s <= 1500 else 0.12)
    assert run.gaps(300, 1500) == {15}
    assert run.gaps(2000, 4000) == {60}  # four times the stall, four times the interval
    assert run.overhead(2000, 4000) <= budget * 1.05


def test_adaptive_probes_once_warm_and_never_while_a_probe_is_in_flight() -> None:
    policy = AdaptiveOverhead(0.05, warmup_steps=10)
    for step in range(1, 10):
        policy.record_step(0.1)
        assert not policy.should_checkpoint(step, step * 0.1)
    policy.record_step(0.1)
    assert policy.should_checkpoint(10, 1.0)
    policy.checkpoint_taken(10, 1.0)
    for step in range(11, 40):  # the probe has not reported yet: no second probe
        policy.record_step(0.1)
        assert not policy.should_checkpoint(step, step * 0.1)
    policy.record_checkpoint(1.5, 3.0)  # cold: not representative
    assert policy.should_checkpoint(40, 4.0)  # so a second probe
    policy.checkpoint_taken(40, 4.0)
    policy.record_checkpoint(0.01, 0.5)
    assert policy.interval_steps() == 2  # ceil(0.01 / (0.05 * 0.1))
    assert not policy.should_checkpoint(41, 4.1)
    assert policy.should_checkpoint(42, 4.2)
    # A checkpoint that failed never reports; reset() lets probing go on.
    fresh = AdaptiveOverhead(0.05, warmup_steps=3)
    for _ in range(3):
        fresh.record_step(0.1)
    fresh.checkpoint_taken(3, 0.3)
    fresh.reset(3, 0.3)
    for step in range(4, 6):
        fresh.record_step(0.1)
        assert not fresh.should_checkpoint(step, step * 0.1)
    assert fresh.should_checkpoint(6, 0.6)


def test_adaptive_state_round_trips() -> None:
    policy = AdaptiveOverhead(0.02)
    simulate(policy, 500, constant(0.1), constant(0.03))
    restored = AdaptiveOverhead(0.02)
    restored.load_state_dict(policy.state_dict())
    assert restored.interval_steps() == policy.interval_steps() == 15
    restored.reset(500, 0.0)
    run = simulate(restored, 100, constant(0.1), constant(0.03), start=500)
    assert run.checkpoints[0] == 515  # no probing after a resume: it kept its numbers


# -- the backlog warning ---------------------------------------------------------------------
def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "aiockpt.training.policy" and r.levelno == logging.WARNING
    ]


def test_backlog_warns_once_with_numbers_and_advice(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aiockpt")
    # Every step (0.01 s) while each checkpoint takes 0.5 s to persist: the notes' backlog.
    run = simulate(EveryNSteps(1), 200, constant(0.01), constant(0.001), persist=0.5)
    assert len(run.checkpoints) == 200
    records = _warnings(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    for part in ("10.0 ms", "500.0 ms", "interval_steps = 1", "at least 50", "skip"):
        assert part in message, (part, message)


def test_no_backlog_warning_when_the_disk_keeps_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aiockpt")
    simulate(EveryNSteps(10), 300, constant(0.1), constant(0.001), persist=0.5)
    simulate(EveryNSeconds(2.0), 300, constant(0.1), constant(0.001), persist=1.9)
    assert not _warnings(caplog)


def test_backlog_allows_max_async_overlapping_checkpoints(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiockpt")
    # Every 1.0 s, 1.5 s to persist: two in flight at once absorb it (max_async = 2).
    policy = policy_from_config(aiockpt.Config(interval_steps=10, max_async=2))
    assert policy.max_in_flight == 2
    simulate(policy, 300, constant(0.1), constant(0.001), persist=1.5)
    assert not _warnings(caplog)
    policy = policy_from_config(aiockpt.Config(interval_steps=10, max_async=2))
    simulate(policy, 300, constant(0.1), constant(0.001), persist=2.5)
    records = _warnings(caplog)
    assert len(records) == 1
    assert "max_async = 2" in records[0].getMessage()
    assert "at least 13" in records[0].getMessage()  # 2.5 s over 2 overlapping, 0.1 s steps


def test_backlog_warning_for_seconds_and_combined(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aiockpt")
    simulate(EveryNSeconds(1.0), 300, constant(0.1), constant(0.001), persist=2.5)
    records = _warnings(caplog)
    assert len(records) == 1 and "interval_seconds = 1" in records[0].getMessage()
    caplog.clear()
    # Combined: one warning, about the shortest interval (every 5 steps = 0.5 s).
    combined = AnyOf(EveryNSteps(5), EveryNSeconds(3.0))
    simulate(combined, 300, constant(0.1), constant(0.001), persist=2.0)
    records = _warnings(caplog)
    assert len(records) == 1 and "interval_steps = 5" in records[0].getMessage()
