"""When a measured difference is real: the spread of a median, and comparisons that say so.

Timings on a shared machine drift: the same no-checkpoint run measured 147 and then 172
samples/s minutes apart on one H200. A figure is only worth a verdict once its spread is
known, so the tools repeat a measurement until the confidence interval of its median is a
small fraction of the effect being judged (up to a cap), and print a comparison whose
interval reaches across "no difference" as *within noise*, with the spread, instead of a
ratio that reads like a result.

The interval of a median is distribution-free: the order statistics that bracket the
median with at least 95% probability (binomial, p = 1/2). With fewer than six values no
pair reaches 95%, and the whole range is the interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Comparison", "compare", "median_interval", "repeat_until_known"]

CONFIDENCE = 0.95


def median_interval(values: Sequence[float]) -> tuple[float, float]:
    """A confidence interval (>= 95% where the count allows) of the median of ``values``.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("no values: nothing to take the median of")
    ordered = sorted(values)
    n = len(ordered)
    # The largest k with P(Binomial(n, 1/2) < k) <= (1 - CONFIDENCE) / 2: the k-th smallest
    # and k-th largest values then bracket the median with at least CONFIDENCE.
    k, below = 0, 0.0
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > (1 - CONFIDENCE) / 2:
            break
        k += 1
    if k == 0:
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]


def _half_width(values: Sequence[float]) -> float:
    low, high = median_interval(values)
    return (high - low) / 2


def repeat_until_known(
    measure: Callable[[], float],
    *,
    effect: Callable[[list[float]], float],
    fraction: float = 0.25,
    minimum: int = 5,
    cap: int = 30,
) -> list[float]:
    """Call ``measure`` until the median's interval is narrow enough to judge, or ``cap``.

    Narrow enough: half its width is at most ``fraction`` x ``effect(values so far)``, the
    size of the difference the result will be judged on (a stall against a step's time,
    say). Stops after ``cap`` values whatever the spread: the caller then reports the
    result as uncertain (see ``compare``).
    """
    values = [measure() for _ in range(minimum)]
    while len(values) < cap and _half_width(values) > fraction * abs(effect(values)):
        values.append(measure())
    return values


@dataclass(frozen=True)
class Comparison:
    """A system's median against a baseline's, and whether the difference is real.

    Attributes:
        ratio: the system's median / the baseline's.
        low: the smallest ratio the two medians' intervals allow.
        high: the largest.
        within_noise: the interval [low, high] holds 1: no difference shown.
        baseline_spread: half the width of the baseline median's interval, relative to it.
        samples: values behind each median (the smaller count of the two).
    """

    ratio: float
    low: float
    high: float
    within_noise: bool
    baseline_spread: float
    samples: int

    def describe(self) -> str:
        """e.g. ``"1.24x, within noise (0.91x-1.52x)"`` or ``"0.71x (0.65x-0.78x)"``."""
        span = f"{self.low:.2f}x-{self.high:.2f}x"
        if self.within_noise:
            return f"{self.ratio:.2f}x, within noise ({span})"
        return f"{self.ratio:.2f}x ({span})"

    def to_dict(self) -> dict[str, float | int | bool]:
        """The comparison as plain values, for JSON."""
        return {
            "ratio": self.ratio,
            "low": self.low,
            "high": self.high,
            "within_noise": self.within_noise,
            "baseline_spread": self.baseline_spread,
            "samples": self.samples,
        }


def compare(values: Sequence[float], baseline: Sequence[float]) -> Comparison | None:
    """How ``values`` compare to ``baseline`` (both positive, e.g. samples/s per round).

    None when either is empty or the baseline's median is not positive.
    """
    if not values or not baseline:
        return None
    mine, theirs = statistics.median(values), statistics.median(baseline)
    if theirs <= 0 or mine < 0:
        return None
    my_low, my_high = median_interval(values)
    their_low, their_high = median_interval(baseline)
    low = my_low / their_high if their_high > 0 else 0.0
    high = my_high / their_low if their_low > 0 else math.inf
    return Comparison(
        ratio=mine / theirs,
        low=low,
        high=high,
        # One value each is no evidence either way.
        within_noise=low <= 1.0 <= high or min(len(values), len(baseline)) < 2,
        baseline_spread=(their_high - their_low) / 2 / theirs,
        samples=min(len(values), len(baseline)),
    )
