"""What ``aiockpt diagnose`` works with: the measurements, the thresholds, the findings.

Plain dataclasses: :mod:`aiockpt.tools.diagnose_measure` fills :class:`Measurements` from a
run, :mod:`aiockpt.tools.diagnose_advice` turns them into an :class:`Analysis`, and tests craft
them by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import Config

__all__ = [
    "Analysis",
    "Disk",
    "Finding",
    "IntervalRun",
    "Measurements",
    "Memory",
    "Number",
    "Setup",
    "Thresholds",
    "Timings",
]

Number = float | int | str | bool | None


@dataclass(frozen=True)
class Thresholds:
    """Where a measured figure turns into advice (reported with the findings)."""

    overhead_target: float = 0.05  # checkpoint cost / training time; max_overhead if set
    host_pool_fraction: float = 0.5  # host staging pool / MemAvailable
    write_efficiency: float = 0.7  # chunk writes / parallel fsync bandwidth: below is slow
    contention_fraction: float = 0.10  # steps this much slower while persisting

    @classmethod
    def for_config(cls, config: Config) -> Thresholds:
        if config.max_overhead is not None:
            return cls(overhead_target=config.max_overhead)
        return cls()

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Setup:
    config: Config
    device: str  # "cpu" or the GPU's name
    on_gpu: bool
    state_bytes: int  # tensor bytes one checkpoint persists
    chunks: int  # per checkpoint
    staging_mode: str  # what this run used: "cpu", "gpu" or "host"
    interval_steps: int
    interval_source: str  # which setting gave interval_steps


@dataclass
class Timings:
    """Medians over the isolated checkpoints (one in flight at a time), milliseconds
    unless named otherwise."""

    step_ms: float  # a plain training step
    call_ms: float  # checkpoint() returning
    call_ms_p99: float
    stall_ms: float  # the step with checkpoint() in it, less the plain step before it
    stall_ms_p99: float
    state_dict_ms: float
    staging_ms: float
    capture_ms: float
    persist_seconds: float  # capture to durable commit
    write_seconds: float  # first chunk write started to last one done
    commit_ms: float
    first_checkpoint_ms: float  # plans the layout, allocates (and pins) staging memory
    copy_gbps: float | None = None  # GPU staging buffer -> host, per checkpoint
    plain_step_ms: float | None = None  # interleaved with the persisting steps
    persisting_step_ms: float | None = None  # steps run while a checkpoint persisted
    persisting_steps: int = 0
    chunk_write_ms: float | None = None  # one chunk: checksum, write, fsync
    chunk_wait_ms: float | None = None  # a chunk waiting for a writer thread
    chunk_wait_ms_max: float | None = None
    # How sure the figures are: the interval (>= 95% where the count allows) of the median
    # stall, the interquartile range of the plain steps (how much training varies with no
    # checkpoint at all), and how many isolated checkpoints it took to know.
    stall_ms_low: float | None = None
    stall_ms_high: float | None = None
    plain_step_ms_spread: float | None = None
    isolated_checkpoints: int = 0


@dataclass
class Disk:
    # Chunk-sized files written as the pipeline writes chunks, ``writers`` threads at once.
    parallel_write_gbps: float
    writers: int
    single_writer_gbps: float
    d2h_pinned_gbps: float | None = None


@dataclass
class IntervalRun:
    """Training at the checkpoint interval, as configured."""

    steps: int = 0
    seconds: float = 0.0
    requested: int = 0
    committed: int = 0
    skipped: int = 0
    queue_wait_ms: float | None = None  # median wait for an in-flight place
    queue_wait_ms_max: float | None = None
    overhead_ms_per_step: float | None = None  # against plain steps


@dataclass
class Memory:
    available_bytes: int | None  # host MemAvailable before the run
    pool_bytes: int  # host staging pool the checkpointer allocated
    pinned: bool
    gpu_free_bytes: int | None = None
    gpu_total_bytes: int | None = None
    gpu_room_bytes: int | None = None  # free beyond the headroom "auto" keeps
    gpu_headroom_fraction: float | None = None
    gpu_staging_bytes: int | None = None  # the GPU staging buffer gpu staging needs
    auto_staging: str | None = None  # what staging = "auto" picks on this GPU
    # The memory tier: where it is, and the space its tmpfs has free (None: no tier).
    memory_tier_directory: str | None = None
    memory_tier_free_bytes: int | None = None


@dataclass
class Measurements:
    setup: Setup
    timings: Timings
    disk: Disk
    run: IntervalRun
    memory: Memory

    def to_dict(self) -> dict[str, Any]:
        setup = {k: v for k, v in asdict(self.setup).items() if k != "config"}
        return {
            "setup": setup,
            "timings": asdict(self.timings),
            "disk": asdict(self.disk),
            "interval_run": asdict(self.run),
            "memory": asdict(self.memory),
        }


@dataclass(frozen=True)
class Finding:
    """One line of the diagnosis; ``change`` is set when the numbers call for one."""

    section: str
    code: str
    message: str
    numbers: dict[str, Number] = field(default_factory=dict)
    change: str | None = None
    # Why the measurements cannot tell (the effect judged is within their noise); None
    # when they can.
    uncertain: str | None = None

    @property
    def is_advice(self) -> bool:
        return self.change is not None

    def line(self) -> str:
        text = f"{self.message}: {self.change}" if self.change else self.message
        return f"{text} (uncertain: {self.uncertain})" if self.uncertain else text

    def to_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "code": self.code,
            "advice": self.is_advice,
            "message": self.message,
            "change": self.change,
            "uncertain": self.uncertain,
            "numbers": dict(self.numbers),
        }


@dataclass
class Analysis:
    numbers: dict[str, dict[str, Number]]  # per section, the figures derived
    findings: list[Finding]

    @property
    def advice(self) -> list[Finding]:
        return [f for f in self.findings if f.is_advice]

    @property
    def verdict(self) -> str:
        n = len(self.advice)
        verdict = "no changes needed" if n == 0 else f"{n} change{'s' * (n != 1)} advised"
        unsure = [f for f in self.findings if f.uncertain]
        if unsure:
            verdict += f"; uncertain: {unsure[0].uncertain}" + (
                f" (and {len(unsure) - 1} more)" if len(unsure) > 1 else ""
            )
        return verdict
