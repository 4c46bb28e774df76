"""What ``aiockpt diagnose`` concludes from its measurements: numbers in, findings out.

Pure functions over the dataclasses of :mod:`aiockpt.tools.diagnose_data`, so every rule can be
checked against crafted numbers. Each finding is one line with the numbers behind it;
those that name a change are the advice.

What a checkpoint costs training, per checkpoint::

    stall          the step with checkpoint() in it, less a plain step (capture included)
  + contention     how much slower steps run while it persists x the steps it overlaps
  + backpressure   with on_backpressure = "block": the wait for an in-flight place, once
                   checkpoints are asked for faster than the pipeline completes them

The pipeline completes one checkpoint every ``max(persist / max_async, bytes / disk
bandwidth)`` seconds (at most ``persist``): up to max_async persist at once, but
together never faster than the disk writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .._util.units import human_bytes
from ..config import Config
from ..training.policy import Never, policy_from_config
from .diagnose_data import (
    Analysis,
    Disk,
    Finding,
    IntervalRun,
    Measurements,
    Number,
    Thresholds,
    Timings,
)

__all__ = [
    "DEFAULT_INTERVAL_STEPS",
    "Copy",
    "Frequency",
    "HostPool",
    "Queueing",
    "analyze",
    "checkpoint_interval",
    "format_bytes",
    "pipeline_seconds",
    "writers_needed",
]

# Assumed when the config sets no interval: a common choice, and a cheap one to run.
DEFAULT_INTERVAL_STEPS = 10
# ceil() of a ratio computed in floating point must not round 10.000000001 up to 11.
_EPS = 1e-9

# -- formatting -----------------------------------------------------------------------------


def _time(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.2f} s"


def _ms(ms: float) -> str:
    return _time(ms / 1e3)


def format_bytes(nbytes: float) -> str:
    """Decimal units, like the GB/s figures next to them."""
    return human_bytes(nbytes, decimal=True)


_size = format_bytes


def _ceil(value: float) -> int:
    return max(1, math.ceil(value - _EPS))


# -- the interval ---------------------------------------------------------------------------


def checkpoint_interval(
    config: Config,
    override: int | None,
    step_seconds: Sequence[float],
    checkpoints: Sequence[tuple[float, float]],
) -> tuple[int, str]:
    """Steps between checkpoints under ``config``'s policy, and where that came from.

    ``checkpoints`` are measured (stall, persist) seconds, the first checkpoint first: the
    config's own policy is fed the run's numbers, so interval_seconds and max_overhead
    come out as the Trainer would apply them.
    """
    if override is not None:
        return override, "--checkpoint-interval"
    policy = policy_from_config(config)
    if isinstance(policy, Never):
        return DEFAULT_INTERVAL_STEPS, "the config sets no interval: assumed"
    policy.warn_backlog = False  # diagnose says it itself, with numbers
    for seconds in step_seconds:
        policy.record_step(seconds)
    for stall, persist in checkpoints:
        policy.record_checkpoint(stall, persist)
    interval, step = policy.interval_seconds(), policy.step_seconds
    if interval is None or not step:
        return DEFAULT_INTERVAL_STEPS, f"{policy.describe()}: not measurable, assumed"
    return max(1, round(interval / step)), policy.describe()


# -- the figures each section derives -------------------------------------------------------


def _pick(figures: Any, *keys: str) -> dict[str, Number]:
    values = asdict(figures)
    return {key: values[key] for key in keys}


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


@dataclass
class Frequency:
    interval_steps: int
    interval_seconds: float
    persist_seconds: float
    pipeline_seconds: float  # between completions, sustained
    disk_seconds: float  # the state at the parallel write bandwidth
    in_flight_wanted: float  # checkpoints that would persist at once, unbounded
    backlog: bool
    fills_after: int | None  # checkpoints until max_async places are all taken
    block_wait_ms: float  # per checkpoint, once the places are full
    skip_keeps_one_in: int
    skip_interval_steps: int
    min_interval_steps: int  # the shortest interval without a backlog
    stall_ms: float
    contention_ms: float
    cost_ms: float  # per checkpoint, under the configured backpressure
    effective_interval_steps: int
    overhead_ms_per_100_steps: float
    training_ms_per_100_steps: float
    overhead_fraction: float
    settled_cost_ms: float  # per checkpoint once they are at least a persist apart
    target_interval_steps: int  # the shortest interval within the overhead target


def pipeline_seconds(m: Measurements) -> float:
    """Seconds between checkpoint completions that the pipeline sustains."""
    config, persist = m.setup.config, m.timings.persist_seconds
    if not config.use_monitor:
        return persist  # direct mode: one at a time, on the caller
    return min(persist, max(persist / config.max_async, _disk_seconds(m)))


def _disk_seconds(m: Measurements) -> float:
    gbps = m.disk.parallel_write_gbps
    return m.setup.state_bytes / (gbps * 1e9) if gbps > 0 else 0.0


def _inflation_ms(t: Timings) -> float:
    if t.persisting_step_ms is None or t.plain_step_ms is None:
        return 0.0
    return max(0.0, t.persisting_step_ms - t.plain_step_ms)


def frequency_figures(m: Measurements, th: Thresholds) -> Frequency:
    config, t = m.setup.config, m.timings
    steps, step_s = m.setup.interval_steps, t.step_ms / 1e3
    interval, persist, service = steps * step_s, t.persist_seconds, pipeline_seconds(m)
    monitor = config.use_monitor
    backlog = monitor and service > interval * (1 + 1e-6)
    keeps = _ceil(service / interval) if backlog else 1
    block_wait_ms = (service - interval) * 1e3 if backlog else 0.0
    stall = max(t.stall_ms, t.call_ms)  # the step delta is noisy; the call is a floor
    inflation = _inflation_ms(t)
    contention = inflation * (min(persist, interval) / step_s if monitor else 0.0)
    blocks = config.on_backpressure == "block"
    cost = stall + contention + (block_wait_ms if blocks else 0.0)
    every = steps if blocks else keeps * steps
    min_steps = _ceil(service / step_s) if monitor else 1
    # Once checkpoints are at least a persist apart, slower steps cover the whole persist.
    settled = stall + (inflation * persist / step_s if monitor else 0.0)
    return Frequency(
        interval_steps=steps,
        interval_seconds=interval,
        persist_seconds=persist,
        pipeline_seconds=service,
        disk_seconds=_disk_seconds(m),
        in_flight_wanted=persist / interval,
        backlog=backlog,
        fills_after=_ceil(config.max_async / (1 - interval / service)) if backlog else None,
        block_wait_ms=block_wait_ms,
        skip_keeps_one_in=keeps,
        skip_interval_steps=keeps * steps,
        min_interval_steps=min_steps,
        stall_ms=stall,
        contention_ms=contention,
        cost_ms=cost,
        effective_interval_steps=every,
        overhead_ms_per_100_steps=cost * 100 / every,
        training_ms_per_100_steps=100 * t.step_ms,
        overhead_fraction=cost / (every * t.step_ms),
        settled_cost_ms=settled,
        target_interval_steps=max(min_steps, _ceil(settled / (th.overhead_target * t.step_ms))),
    )


def _measured_run(run: IntervalRun) -> str:
    if not run.requested:
        return ""
    text = f"; measured over {run.steps} steps: {run.requested} requested"
    if run.skipped:
        text += f", {run.skipped} skipped"
    if run.queue_wait_ms is not None:
        text += (
            f", a median wait of {_ms(run.queue_wait_ms)} for a place "
            f"(max {_ms(run.queue_wait_ms_max or 0)})"
        )
    return text


def _backlog(m: Measurements, f: Frequency) -> Finding:
    config, t = m.setup.config, m.timings
    every = f"every {_plural(f.interval_steps, 'step')} x {_ms(t.step_ms)}"
    numbers = _pick(f, "persist_seconds", "interval_seconds", "pipeline_seconds", "backlog")
    if not config.use_monitor:
        message = (
            "use_monitor = false: each checkpoint is durable before checkpoint() returns "
            f"({_time(f.persist_seconds)}), so none pile up ({every})"
        )
        return Finding("frequency", "no_backlog", message, numbers)
    if not f.backlog:
        message = (
            f"persist takes {_time(f.persist_seconds)} and you checkpoint every "
            f"{_time(f.interval_seconds)} ({every}): each checkpoint is durable before the "
            "next one; no backlog"
        )
        return Finding("frequency", "no_backlog", message, numbers)
    bound = (
        f"the disk writes {_size(m.setup.state_bytes)} in {_time(f.disk_seconds)}"
        if f.disk_seconds >= f.persist_seconds / config.max_async
        else f"{_time(f.persist_seconds)} / max_async = {config.max_async}"
    )
    message = (
        f"persist takes {_time(f.persist_seconds)} but you checkpoint every "
        f"{_time(f.interval_seconds)} ({every}); the pipeline completes one every "
        f"{_time(f.pipeline_seconds)} ({bound}), so {f.in_flight_wanted:.1f} would be in "
        f"flight and the max_async = {config.max_async} places fill after ~{f.fills_after} "
        f"checkpoints. Then 'block' makes training wait ~{_ms(f.block_wait_ms)} per "
        f"checkpoint, and 'skip' keeps one request in {f.skip_keeps_one_in} (achieved "
        f"interval ~{f.skip_interval_steps} steps)" + _measured_run(m.run)
    )
    change = f"checkpoint every >= {f.min_interval_steps} steps"
    if config.on_backpressure == "block":
        change += (
            f", or set on_backpressure = 'skip' (achieved interval ~ {f.skip_interval_steps} steps)"
        )
    overlap = _ceil(f.in_flight_wanted)
    if f.disk_seconds <= f.interval_seconds and config.max_async < overlap <= 64:
        # The disk keeps up; one checkpoint's latency does not: let more of them overlap.
        change += f", or max_async = {overlap}"
    numbers.update(
        _pick(f, "fills_after", "block_wait_ms", "skip_interval_steps", "min_interval_steps")
    )
    numbers.update(
        max_async=config.max_async,
        measured_queue_wait_ms=m.run.queue_wait_ms,
        measured_skipped=m.run.skipped,
    )
    return Finding("frequency", "backlog", message, numbers, change)


def _overhead(m: Measurements, th: Thresholds, f: Frequency) -> Finding:
    parts = [f"stall {_ms(f.stall_ms)}"]
    if f.contention_ms:
        parts.append(f"{_ms(f.contention_ms)} of slower steps while it persists")
    if f.backlog and m.setup.config.on_backpressure == "block":
        parts.append(f"{_ms(f.block_wait_ms)} waiting for a place")
    every = f.effective_interval_steps
    message = (
        f"each checkpoint costs training ~{_ms(f.cost_ms)} ({' + '.join(parts)}); every "
        f"{_plural(every, 'step')} that is {_ms(f.cost_ms)} x {100 / every:.3g} checkpoints = "
        f"{_ms(f.overhead_ms_per_100_steps)} per 100 steps of "
        f"{_ms(f.training_ms_per_100_steps)} training ({f.overhead_fraction:.1%})"
    )
    numbers = _pick(
        f,
        "cost_ms",
        "stall_ms",
        "contention_ms",
        "effective_interval_steps",
        "overhead_ms_per_100_steps",
        "overhead_fraction",
        "target_interval_steps",
    )
    numbers.update(
        overhead_target=th.overhead_target,
        measured_overhead_ms_per_step=m.run.overhead_ms_per_step,
    )
    unsure = overhead_uncertainty(m, th, f)
    if f.overhead_fraction <= th.overhead_target:
        message += f": within the {th.overhead_target:.0%} target"
        return Finding("frequency", "overhead_ok", message, numbers, uncertain=unsure)
    target = f.target_interval_steps
    change = (
        f"checkpoint every >= {target} steps: {_ms(f.settled_cost_ms)} x {100 / target:.3g} = "
        f"{_ms(f.settled_cost_ms * 100 / target)} per 100 steps "
        f"({f.settled_cost_ms / (target * m.timings.step_ms):.1%}, target "
        f"{th.overhead_target:.0%})"
    )
    return Finding("frequency", "overhead", message, numbers, change, uncertain=unsure)


def overhead_uncertainty(m: Measurements, th: Thresholds, f: Frequency) -> str | None:
    """Why the overhead verdict cannot be trusted, or None when it can.

    Two ways: training's own steps vary (interquartile range of the plain steps) by more
    than the checkpoint's cost being judged, so that cost cannot be told from the noise;
    or the median stall's interval reaches both sides of the budget per checkpoint that
    the target allows, so another run could give the opposite advice.
    """
    t = m.timings
    spread = t.plain_step_ms_spread
    if spread is not None and spread > f.cost_ms:
        return (
            f"training steps vary by {_ms(spread)} (interquartile range, no checkpoint), "
            f"more than the {_ms(f.cost_ms)} a checkpoint costs: measure a larger or "
            "steadier workload, or more checkpoints (--rounds)"
        )
    if t.stall_ms_low is None or t.stall_ms_high is None:
        return None
    budget = th.overhead_target * f.effective_interval_steps * t.step_ms
    other = f.cost_ms - f.stall_ms
    if t.stall_ms_low + other <= budget <= t.stall_ms_high + other:
        return (
            f"the stall is {_ms(t.stall_ms_low)}-{_ms(t.stall_ms_high)} (95% interval of "
            f"its median over {t.isolated_checkpoints} checkpoints), on both sides of the "
            f"{_ms(budget)} per checkpoint the {th.overhead_target:.0%} target allows"
        )
    return None


@dataclass
class Queueing:
    chunks: int
    write_slots: int
    chunks_in_flight_max: int
    num_threads: int
    waves: int  # rounds of writes one checkpoint's chunks take on the writer threads
    chunk_wait_ms: float | None
    chunk_wait_ms_max: float | None
    chunk_write_ms: float | None
    single_writer_gbps: float
    parallel_writers: int
    parallel_write_gbps: float
    writers_needed: int
    writers_used: int
    write_gbps: float
    write_efficiency: float  # of the parallel write bandwidth
    queue_wait_ms: float | None  # for an in-flight place, in the interval run


def writers_needed(disk: Disk) -> int:
    """Writer threads the disk takes before it stops going faster."""
    if disk.single_writer_gbps <= 0:
        return 1
    return min(disk.writers, _ceil(disk.parallel_write_gbps / disk.single_writer_gbps))


def queueing_figures(m: Measurements) -> Queueing:
    config, t, chunks = m.setup.config, m.timings, m.setup.chunks
    write_gbps = m.setup.state_bytes / t.write_seconds / 1e9 if t.write_seconds > 0 else 0.0
    limit = m.disk.parallel_write_gbps
    return Queueing(
        chunks=chunks,
        write_slots=config.write_slots(chunks),
        chunks_in_flight_max=config.max_async * chunks,
        num_threads=config.num_threads,
        waves=-(-chunks // config.num_threads),
        chunk_wait_ms=t.chunk_wait_ms,
        chunk_wait_ms_max=t.chunk_wait_ms_max,
        chunk_write_ms=t.chunk_write_ms,
        single_writer_gbps=m.disk.single_writer_gbps,
        parallel_writers=m.disk.writers,
        parallel_write_gbps=limit,
        writers_needed=writers_needed(m.disk),
        writers_used=min(config.num_threads, chunks),
        write_gbps=write_gbps,
        write_efficiency=write_gbps / limit if limit > 0 else 0.0,
        queue_wait_ms=m.run.queue_wait_ms,
    )


def _queueing(m: Measurements, th: Thresholds, q: Queueing, pressing: bool) -> list[Finding]:
    """``pressing``: persisting faster would help (a backlog, or the overhead over target)."""
    config = m.setup.config
    found = []
    slots = (
        f"max_async x chunks = {config.max_async} x {q.chunks} = {q.write_slots} write slots "
        f"{'>=' if q.write_slots >= q.chunks_in_flight_max else '<'} "
        f"{q.chunks_in_flight_max} chunks in flight"
    )
    numbers = _pick(q, "chunks", "write_slots", "chunks_in_flight_max")
    if q.write_slots >= q.chunks_in_flight_max:
        found.append(Finding("queueing", "write_slots_ok", f"{slots}: no queueing", numbers))
    else:
        found.append(
            Finding(
                "queueing",
                "write_slots",
                f"{slots}: chunks queue at the write semaphore",
                numbers,
                f"chunk_count <= {q.write_slots // config.max_async}",
            )
        )
    measured = ""
    if q.chunk_wait_ms is not None and q.chunk_write_ms is not None:
        measured = (
            f"; measured: a chunk waits {_ms(q.chunk_wait_ms)} for a writer thread (max "
            f"{_ms(q.chunk_wait_ms_max or 0)}) and takes {_ms(q.chunk_write_ms)} to write"
        )
    numbers = _pick(q, "chunks", "num_threads", "waves", "chunk_wait_ms", "chunk_wait_ms_max")
    warnings = config.queueing_warnings(q.chunks)
    # Chunks waiting for a thread cost nothing when the threads there are already write
    # as fast as the disk goes: more of them would only compete with training.
    saturated = q.num_threads >= q.writers_needed and q.write_efficiency >= th.write_efficiency
    waves = (
        f"{_plural(q.chunks, 'chunk')} per checkpoint on num_threads = {q.num_threads} "
        f"writer threads are written in {q.waves} waves{measured}"
    )
    advise_threads = bool(warnings) and not saturated
    if advise_threads:
        found.append(Finding("queueing", "writer_threads", waves, numbers, warnings[0]))
    elif warnings:
        message = (
            f"{waves}; but {q.num_threads} threads are the ~{q.writers_needed} writers the disk "
            f"takes, and they write at {q.write_efficiency:.0%} of its parallel figure: more "
            "would not persist faster"
        )
        found.append(Finding("queueing", "writer_threads_ok", message, numbers))
    else:
        message = (
            f"num_threads = {q.num_threads} >= {_plural(q.chunks, 'chunk')} per checkpoint: "
            f"every chunk gets a writer at once{measured}"
        )
        found.append(Finding("queueing", "writer_threads_ok", message, numbers))
    numbers = _pick(
        q,
        "single_writer_gbps",
        "parallel_writers",
        "parallel_write_gbps",
        "writers_needed",
        "writers_used",
        "write_gbps",
        "write_efficiency",
    )
    message = (
        f"writing chunk-sized files as checkpoints do (checksums, write, fsync), one writer "
        f"does {q.single_writer_gbps:.2f} GB/s, {q.parallel_writers} writers "
        f"{q.parallel_write_gbps:.2f} GB/s: the disk takes ~{_plural(q.writers_needed, 'writer')}"
        f"; checkpoints use {q.writers_used} (num_threads = {q.num_threads}, "
        f"{_plural(q.chunks, 'chunk')}) and write at {q.write_gbps:.2f} GB/s "
        f"({q.write_efficiency:.0%} of the parallel figure)"
    )
    short = q.writers_used < q.writers_needed and q.write_efficiency < th.write_efficiency
    if not (short and pressing) or advise_threads:  # the thread advice says it already
        found.append(Finding("queueing", "disk_parallelism_ok", message, numbers))
        return found
    changes = []
    if q.num_threads < q.writers_needed:
        changes.append(f"num_threads >= {q.writers_needed}")
    if q.chunks < q.writers_needed:
        size = m.setup.state_bytes / q.writers_needed / 2**20
        changes.append(f"chunk_count >= {q.writers_needed} (chunk_size_mb <= {size:.3g})")
    found.append(Finding("queueing", "disk_parallelism", message, numbers, " and ".join(changes)))
    return found


@dataclass
class Copy:
    step_inflation_ms: float  # median persisting step less median plain step
    step_inflation_fraction: float
    cpu_only: bool  # contention measured with training on the CPU


def copy_figures(m: Measurements) -> Copy:
    t = m.timings
    signed = 0.0  # faster steps while persisting are noise, but shown as measured
    if t.persisting_step_ms is not None and t.plain_step_ms is not None:
        signed = t.persisting_step_ms - t.plain_step_ms
    return Copy(
        step_inflation_ms=signed,
        step_inflation_fraction=signed / t.plain_step_ms if t.plain_step_ms else 0.0,
        cpu_only=not m.setup.on_gpu,
    )


def _copy(m: Measurements, th: Thresholds, c: Copy, over_target: bool) -> list[Finding]:
    config, t = m.setup.config, m.timings
    found = []
    slower = (
        f"the step with it takes {_ms(t.stall_ms)} longer than the plain steps around it"
        if t.stall_ms > 0
        else "the step with it is no slower than the plain steps around it (within noise)"
    )
    stall = (
        f"checkpoint() returns in {_ms(t.call_ms)} (p99 {_ms(t.call_ms_p99)}): state_dict() "
        f"and flattening {_ms(t.state_dict_ms)}, staging copies {_ms(t.staging_ms)}; {slower}. "
        f"The first checkpoint took {_ms(t.first_checkpoint_ms)}: it allocates"
        f"{' and pins' if m.memory.pinned else ''} the staging memory, once"
    )
    numbers = _pick(t, "call_ms", "call_ms_p99", "stall_ms", "state_dict_ms", "staging_ms")
    if config.use_monitor:
        found.append(Finding("copy", "stall", stall, numbers))
    else:
        numbers["capture_ms"] = t.capture_ms
        message = (
            "use_monitor = false: checkpoint() returns only once the checkpoint is durable "
            f"({_ms(t.call_ms)} per call)"
        )
        change = (
            "set use_monitor = true: training then waits only for the capture "
            f"(~{_ms(t.capture_ms)})"
        )
        found.append(Finding("copy", "use_monitor", message, numbers, change))
    numbers = {
        **_pick(t, "plain_step_ms", "persisting_step_ms", "persisting_steps"),
        **_pick(c, "step_inflation_fraction", "cpu_only"),
    }
    if t.persisting_steps and t.persisting_step_ms is not None and t.plain_step_ms is not None:
        message = (
            f"steps take {_ms(t.persisting_step_ms)} while a checkpoint persists against "
            f"{_ms(t.plain_step_ms)} without ({c.step_inflation_fraction:+.0%}, "
            f"{_plural(t.persisting_steps, 'step')}, interleaved)"
        )
        if c.cpu_only:
            message += (
                ". A CPU-only figure: here training and the writer threads share the CPU; "
                "on a GPU the copies compete for the GPU as well"
            )
        needed = writers_needed(m.disk)
        busy = min(config.num_threads, m.setup.chunks)
        if c.step_inflation_fraction > th.contention_fraction and over_target and busy > needed:
            change = (
                f"num_threads = {needed} and chunk_count = {needed}: the disk takes ~{needed} "
                f"writers, and the other {busy - needed} threads only compete with training"
            )
            found.append(Finding("copy", "fewer_writer_threads", message, numbers, change))
        else:
            found.append(Finding("copy", "contention", message, numbers))
    elif config.use_monitor:
        message = (
            "no step ran while a checkpoint persisted (each was durable within a step): "
            "no contention to measure"
        )
        found.append(Finding("copy", "contention", message, numbers))
    if t.copy_gbps and m.disk.d2h_pinned_gbps:
        message = (
            f"chunks move from the GPU staging buffer to host memory at {t.copy_gbps:.1f} "
            f"GB/s (device-to-host pinned limit {m.disk.d2h_pinned_gbps:.1f} GB/s)"
        )
        numbers = {"copy_gbps": t.copy_gbps, "d2h_pinned_gbps": m.disk.d2h_pinned_gbps}
        found.append(Finding("copy", "gpu_copies", message, numbers))
    return found


@dataclass
class HostPool:
    pool_fraction: float | None  # of MemAvailable
    suggested_pinned_ratio: float  # a pool of host_pool_fraction of MemAvailable


def host_pool_figures(m: Measurements, th: Thresholds) -> HostPool:
    mem, available = m.memory, m.memory.available_bytes
    share = th.host_pool_fraction * available / max(m.setup.state_bytes, 1) if available else 0
    return HostPool(
        pool_fraction=mem.pool_bytes / available if available else None,
        suggested_pinned_ratio=math.floor(share * 100) / 100,
    )


def _memory(m: Measurements, th: Thresholds, h: HostPool) -> list[Finding]:
    config, mem = m.setup.config, m.memory
    found = []
    kind = "pinned pool" if mem.pinned else "host staging pool"
    numbers = {
        **_pick(mem, "pool_bytes", "available_bytes"),
        "pool_fraction": h.pool_fraction,
        "pinned_ratio": config.pinned_ratio,
    }
    if mem.available_bytes is None or h.pool_fraction is None:
        message = (
            f"{kind} {_size(mem.pool_bytes)}; host memory available unknown (no /proc/meminfo)"
        )
        found.append(Finding("memory", "host_pool_ok", message, numbers))
    elif h.pool_fraction > th.host_pool_fraction:
        message = (
            f"{kind} {_size(mem.pool_bytes)} (pinned_ratio = {config.pinned_ratio:g} x "
            f"{_size(m.setup.state_bytes)} of state, in whole chunks) is {h.pool_fraction:.0%} "
            f"of the {_size(mem.available_bytes)} of host memory available"
        )
        ratio = h.suggested_pinned_ratio
        change = (
            f"pinned_ratio = {ratio:g} (a pool of ~{_size(ratio * m.setup.state_bytes)})"
            if ratio >= 0.01
            else "run where more host memory is free: even a small pool does not fit here"
        )
        numbers["suggested_pinned_ratio"] = ratio
        found.append(Finding("memory", "host_pool", message, numbers, change))
    else:
        message = f"{kind} {_size(mem.pool_bytes)} of {_size(mem.available_bytes)} available: fine"
        found.append(Finding("memory", "host_pool_ok", message, numbers))
    if not m.setup.on_gpu:
        message = "CPU state: checkpoint() copies it into the host pool; no GPU memory involved"
        found.append(Finding("memory", "staging_ok", message, {"staging_mode": "cpu"}))
        return found
    numbers = {
        **_pick(
            mem,
            "gpu_free_bytes",
            "gpu_total_bytes",
            "gpu_room_bytes",
            "gpu_staging_bytes",
            "auto_staging",
        ),
        "staging": config.staging,
        "staging_mode": m.setup.staging_mode,
    }
    need, room = mem.gpu_staging_bytes or 0, mem.gpu_room_bytes or 0
    room_text = (
        f"{_size(room)} free beyond the {mem.gpu_headroom_fraction or 0:.0%} headroom "
        f"({_size(mem.gpu_free_bytes or 0)} free of {_size(mem.gpu_total_bytes or 0)})"
    )
    if config.staging == "gpu" and need > room:
        message = (
            f"staging = 'gpu' takes a {_size(need)} GPU buffer but there is {room_text}: "
            "training may run out of GPU memory"
        )
        change = "staging = 'auto' (host staging here)"
        found.append(Finding("memory", "gpu_staging_no_room", message, numbers, change))
    elif config.staging == "host" and mem.auto_staging == "gpu":
        copy = ""
        if m.disk.d2h_pinned_gbps:
            seconds = m.setup.state_bytes / (m.disk.d2h_pinned_gbps * 1e9)
            copy = f" ({_time(seconds)} at the pinned rate)"
        message = (
            f"staging = 'host' although the {_size(need)} GPU buffer fits in the {room_text}: the "
            f"next optimizer step waits, on the GPU, for the device-to-host copy{copy}"
        )
        change = "staging = 'auto' (gpu staging: one device-to-device copy)"
        found.append(Finding("memory", "host_staging_forced", message, numbers, change))
    else:
        fits = "fits in" if mem.auto_staging == "gpu" else "does not fit in"
        message = (
            f"staging = '{config.staging}' runs {m.setup.staging_mode} staging; 'auto' picks "
            f"{mem.auto_staging} as the {_size(need)} buffer {fits} the {room_text}"
        )
        found.append(Finding("memory", "staging_ok", message, numbers))
    return found


def _memory_tier(m: Measurements) -> list[Finding]:
    """Does the memory tier fit in RAM? It holds up to keep_last + in-flight copies of the
    state in tmpfs pages, which compete with the host pool and training for RAM."""
    config, mem = m.setup.config, m.memory
    if config.memory is None or mem.memory_tier_directory is None:
        return []
    # keep_last, those in flight, and those still to be copied on to the primary.
    copies = config.memory.keep_last + 2 * config.max_async
    need = copies * m.setup.state_bytes
    numbers: dict[str, Number] = {
        "memory_tier_bytes": need,
        "memory_tier_copies": copies,
        "memory_tier_free_bytes": mem.memory_tier_free_bytes,
        "available_bytes": mem.available_bytes,
    }
    where = mem.memory_tier_directory
    limits = [
        (mem.memory_tier_free_bytes, f"free on the tmpfs of {where}"),
        (None if mem.available_bytes is None else mem.available_bytes - mem.pool_bytes,
         "of host memory available beside the staging pool"),
    ]  # fmt: skip
    held = (
        f"the memory tier holds up to {copies} checkpoints (keep_last = "
        f"{config.memory.keep_last} + {2 * config.max_async} in flight or being copied on) "
        f"x {_size(m.setup.state_bytes)} = {_size(need)}"
    )
    for room, what in limits:
        if room is not None and need > room:
            fits = max(room // max(m.setup.state_bytes, 1) - 2 * config.max_async, 0)
            change = (
                f"memory.keep_last = {fits}"
                if fits >= 1
                else "leave out [checkpoint.memory], or give it a directory on a larger tmpfs"
            )
            message = f"{held}, more than the {_size(room)} {what}"
            return [Finding("memory", "memory_tier", message, numbers, change)]
    message = f"{held}: fits in RAM"
    return [Finding("memory", "memory_tier_ok", message, numbers)]


def analyze(m: Measurements, thresholds: Thresholds | None = None) -> Analysis:
    """Every finding, in the order: frequency, queueing, copy, memory."""
    th = thresholds or Thresholds.for_config(m.setup.config)
    f = frequency_figures(m, th)
    over = f.overhead_fraction > th.overhead_target
    q, c, h = queueing_figures(m), copy_figures(m), host_pool_figures(m, th)
    return Analysis(
        {"frequency": asdict(f), "queueing": asdict(q), "copy": asdict(c), "memory": asdict(h)},
        [
            _backlog(m, f),
            _overhead(m, th, f),
            *_queueing(m, th, q, f.backlog or over),
            *_copy(m, th, c, over),
            *_memory(m, th, h),
            *_memory_tier(m),
        ],
    )
