"""The summary statistics that measurements are reported in: median and p99.

Both take any iterable (a generator too) and give None for no values at all, since a
figure that was not measured must not read as zero.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

__all__ = ["median", "p99"]


def median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None


def p99(values: Iterable[float]) -> float | None:
    """The nearest-rank 99th percentile (the largest value below 100 samples)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
