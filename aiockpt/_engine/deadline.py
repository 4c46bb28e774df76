"""Where a last checkpoint can be durable before the grace period after a signal ends.

Each tier a checkpoint can go to keeps a :class:`PersistHistory` of its recent commits;
:func:`fastest_fitting` estimates how long each tier would take for the bytes at hand and
picks the fastest one that ends within the time left. Today there is one tier, the
checkpoint directory; a shared-memory or object-store tier joins the list with a history
of its own, and the caller saves to whichever tier comes back.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

__all__ = [
    "FIRST_TIME_BYTES_PER_S",
    "FIRST_TIME_OVERHEAD_S",
    "SAFETY_FACTOR",
    "Estimate",
    "PersistHistory",
    "Tier",
    "fastest_fitting",
]

# With nothing measured yet, assume a slow disk (a network volume under load) and a
# commit that costs as much as several fsyncs of a busy one: saving and being SIGKILLed
# halfway costs the grace period for nothing, while not saving keeps the last checkpoint
# anyway.
FIRST_TIME_BYTES_PER_S = 100e6
FIRST_TIME_OVERHEAD_S = 0.5
# Measured times vary from one checkpoint to the next (page cache, other jobs' I/O).
SAFETY_FACTOR = 1.5
_REMEMBERED = 8


@dataclass
class PersistHistory:
    """How long a tier's recent checkpoints took, from capture to durable commit."""

    recent: collections.deque[tuple[int, float]] = field(
        default_factory=lambda: collections.deque(maxlen=_REMEMBERED)
    )

    def record(self, nbytes: int, seconds: float) -> None:
        """A checkpoint of ``nbytes`` became durable ``seconds`` after its capture."""
        if seconds > 0:
            self.recent.append((nbytes, seconds))

    def estimate(self, nbytes: int) -> float:
        """Seconds a checkpoint of ``nbytes`` would take, on the slow side."""
        if not self.recent:
            return FIRST_TIME_OVERHEAD_S + nbytes / FIRST_TIME_BYTES_PER_S
        # The slowest recent checkpoint, scaled to this size: the fixed costs (fsyncs,
        # the commit) scale too, which errs on the slow side for a larger state.
        slowest = max(seconds * max(nbytes, 1) / max(saved, 1) for saved, seconds in self.recent)
        return SAFETY_FACTOR * slowest


@dataclass(frozen=True)
class Tier:
    """A place a checkpoint can be persisted to, and what its past checkpoints took."""

    name: str
    location: str
    history: PersistHistory


@dataclass(frozen=True)
class Estimate:
    tier: Tier
    seconds: float


def fastest_fitting(
    tiers: list[Tier], nbytes: int, seconds_left: float
) -> tuple[Estimate | None, list[Estimate]]:
    """The fastest tier whose estimate ends within ``seconds_left`` (None if none does),
    and every tier's estimate, fastest first."""
    estimates = sorted(
        (Estimate(tier, tier.history.estimate(nbytes)) for tier in tiers),
        key=lambda estimate: estimate.seconds,
    )
    fitting = [estimate for estimate in estimates if estimate.seconds <= seconds_left]
    return (fitting[0] if fitting else None), estimates
