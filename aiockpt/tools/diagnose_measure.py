"""The measuring half of ``aiockpt diagnose``: one short run with a real SyncCheckpointer.

In a scratch directory under the target directory (so the disk is the one training
writes to, and nothing of the user's is touched), in this order:

1. the host and GPU memory free before anything is allocated;
2. the disk: one writer against several, each writing and fsyncing a file (how many
   writer threads the disk takes), and on a GPU the copy rates;
3. a first checkpoint (layout, staging memory), then plain steps;
4. ``rounds`` isolated checkpoints, each between plain steps, with steps timed while it
   persists (interleaved, so the machine's drift cancels out) and every chunk write timed;
5. ``num_steps`` training steps checkpointing at the configured interval, as training
   would: backpressure waits and skipped requests are what this run saw.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._engine.staging import GPU_HEADROOM_FRACTION, choose_staging
from .._util.location import local_directory
from .._util.shm import derived_memory_directory
from .._util.stats import median, p99
from ..checkpointer import SyncCheckpointer, SyncCheckpointHandle
from ..config import Config
from .diagnose_advice import checkpoint_interval, format_bytes
from .diagnose_data import Disk, IntervalRun, Measurements, Memory, Setup, Timings
from .limits import Limits, measure_chunk_writes, measure_copies
from .noise import median_interval
from .workloads import Workload, sync

__all__ = ["host_memory_available", "measure", "synthetic_workload"]


WARMUP_STEPS = 3
PLAIN_STEPS = 3
# Plain steps after each isolated checkpoint: the baseline for the persisting steps.
PLAIN_AFTER = 3
# More isolated checkpoints are taken, up to this many times --rounds, until half the
# interval of the median stall is at most KNOWN_FRACTION of the stall (or of
# KNOWN_STEP_FRACTION of a step, for stalls too small to matter).
ROUNDS_CAP_FACTOR = 4
KNOWN_FRACTION = 0.25
KNOWN_STEP_FRACTION = 0.05
# Disk probes: enough writers to find where the disk stops scaling, files large enough
# that fsync latency does not dominate, small enough to take seconds.
PROBE_WRITERS = 8
PROBE_MAX_WRITERS = 32
PROBE_FILE_MIN = 1 << 20
PROBE_FILE_MAX = 256 << 20
COPY_PROBE_MAX = 1 << 30
# The synthetic state: a few tensors of at most this size each.
SYNTHETIC_TENSOR_MAX = 1 << 30

Progress = Callable[[str], None]


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class SyntheticState(nn.Module):
    """A state of a given size, held in a few large buffers on one device."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        super().__init__()
        count = max(4, math.ceil(nbytes / SYNTHETIC_TENSOR_MAX))
        elements = max(1, nbytes // (4 * count))  # float32
        for i in range(count):
            self.register_buffer(f"tensor{i}", torch.ones(elements, device=device))


def busy_step(step_ms: float, device: torch.device) -> Callable[[], None]:
    """A step that keeps ``device`` busy for about ``step_ms`` with matrix products.

    Products, not sleeps: on a GPU they occupy the SMs and memory bandwidth that the
    checkpoint's copies compete for; on a CPU the cores that the writer threads need.
    """
    if device.type != "cuda":
        a = torch.randn(128, 128)
        out = torch.empty_like(a)

        def cpu_step() -> None:
            # Until the time is up rather than a calibrated count: a CPU shared with other
            # work runs a fixed count slower or faster from one step to the next.
            end = time.perf_counter() + step_ms / 1e3
            while time.perf_counter() < end:
                torch.mm(a, a, out=out)

        return cpu_step
    # Large enough that a product is GPU work, not a kernel launch.
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)

    def products(count: int) -> None:
        for _ in range(count):
            torch.mm(a, a, out=out)

    products(3)
    count, seconds = 1, 0.0
    while seconds < 0.05 and count < 1 << 20:
        count *= 2
        seconds = _timed(functools.partial(products, count), device)
    seconds = min(seconds, *(_timed(functools.partial(products, count), device) for _ in range(3)))
    reps = max(1, round(step_ms / 1e3 / (seconds / count)))

    def gpu_step() -> None:
        products(reps)
        sync(device)  # as a loop's loss.item() would

    return gpu_step


def synthetic_workload(step_ms: float, state_bytes: int, device: torch.device) -> Workload:
    """The user's own figures: a state of ``state_bytes`` and steps of ``step_ms``."""
    state = SyntheticState(state_bytes, device)
    workload = Workload(state, None, busy_step(step_ms, device))
    nbytes = workload.state_bytes()
    workload.name = f"synthetic state of {format_bytes(nbytes)}, steps of {step_ms:g} ms asked for"
    return workload


def host_memory_available() -> int | None:
    """MemAvailable from /proc/meminfo (bytes); None where there is none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class _Rounds:
    """What the isolated checkpoints measured, per checkpoint (milliseconds)."""

    plain: list[float] = field(default_factory=list)
    persisting: list[float] = field(default_factory=list)
    call: list[float] = field(default_factory=list)
    stall: list[float] = field(default_factory=list)
    state_dict: list[float] = field(default_factory=list)
    staging: list[float] = field(default_factory=list)
    capture: list[float] = field(default_factory=list)
    persist: list[float] = field(default_factory=list)  # seconds
    write: list[float] = field(default_factory=list)  # seconds
    commit: list[float] = field(default_factory=list)
    copy_gbps: list[float] = field(default_factory=list)
    chunk_wait: list[float] = field(default_factory=list)
    chunk_write: list[float] = field(default_factory=list)


def _known(out: _Rounds) -> bool:
    """Whether the median stall is known well enough to judge: its interval is narrow
    against the stall itself, or against the step (a stall that small is small anyway)."""
    low, high = median_interval(out.stall)
    size = max(abs(statistics.median(out.stall)), KNOWN_STEP_FRACTION * _median_or_zero(out.plain))
    return (high - low) / 2 <= KNOWN_FRACTION * size


def _median_or_zero(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _isolated_rounds(ckpt: SyncCheckpointer, workload: Workload, rounds: int) -> _Rounds:
    """At least ``rounds`` isolated checkpoints, more (up to ``ROUNDS_CAP_FACTOR`` x) until
    the median stall is known: the verdict is only as good as the stall's interval."""
    step, device = workload.step, workload.device
    out = _Rounds()
    cap = max(rounds, ROUNDS_CAP_FACTOR * rounds)
    number = 0
    while number < rounds or (number < cap and not _known(out)):
        number += 1
        box: dict[str, Any] = {}

        def checkpoint_then_step(at: int = number, box: dict[str, Any] = box) -> None:
            start = time.perf_counter()
            box["handle"] = ckpt.checkpoint(at)
            box["call"] = time.perf_counter() - start
            step()

        plain = [_timed(step, device) * 1e3]
        with_checkpoint = _timed(checkpoint_then_step, device) * 1e3
        handle: SyncCheckpointHandle = box["handle"]
        while not handle.done():
            out.persisting.append(_timed(step, device) * 1e3)
        handle.wait()
        plain.extend(_timed(step, device) * 1e3 for _ in range(PLAIN_AFTER))
        out.plain.extend(plain)
        metrics = handle.metrics
        out.call.append(box["call"] * 1e3)
        # Against the plain steps of the same round, just before and after: the machine's
        # speed drifts by more than one checkpoint's stall between rounds.
        out.stall.append(with_checkpoint - statistics.median(plain))
        out.state_dict.append(metrics.state_dict_ms)
        out.staging.append(metrics.staging_ms)
        out.capture.append(metrics.capture_ms)
        out.persist.append(metrics.persist_seconds)
        out.write.append(metrics.write_seconds)
        out.commit.append(metrics.commit_ms)
        if metrics.copy_seconds:
            out.copy_gbps.append(metrics.copy_gbps)
        # Each chunk's wait for a write slot and a writer thread, and its write.
        for span in metrics.chunk_spans:
            out.chunk_wait.append(span.queue_seconds * 1e3)
            out.chunk_write.append(span.write_seconds * 1e3)
    return out


def _interval_run(
    ckpt: SyncCheckpointer,
    workload: Workload,
    interval: int,
    num_steps: int,
    max_seconds: float,
    first_step: int,
    plain_ms: float,
) -> IntervalRun:
    step, device = workload.step, workload.device
    handles: list[SyncCheckpointHandle] = []
    requested = steps = 0
    sync(device)
    start = time.perf_counter()
    for number in range(1, num_steps + 1):
        step()
        sync(device)
        steps = number
        if number % interval == 0:
            requested += 1
            handles.append(ckpt.checkpoint(first_step + number))
        if time.perf_counter() - start > max_seconds:
            break
    seconds = time.perf_counter() - start
    ckpt.wait()  # the tail is not training time: a real run goes on stepping
    kept = [h for h in handles if not h.skipped]
    waits = [h.metrics.queue_wait_ms for h in kept]
    return IntervalRun(
        steps=steps,
        seconds=seconds,
        requested=requested,
        committed=len(kept),
        skipped=len(handles) - len(kept),
        queue_wait_ms=median(waits),
        queue_wait_ms_max=max(waits) if waits else None,
        overhead_ms_per_step=(seconds * 1e3 - steps * plain_ms) / steps if steps else None,
    )


def _measure_disk(directory: Path, workload: Workload, config: Config) -> Disk:
    writers = min(max(config.num_threads, PROBE_WRITERS), PROBE_MAX_WRITERS)
    # Files the size of one chunk, as each writer thread writes them.
    state_bytes = workload.state_bytes()
    chunk = min(config.chunk_bytes(state_bytes), state_bytes)
    per_file = min(max(chunk, PROBE_FILE_MIN), PROBE_FILE_MAX)
    pinned = workload.device.type == "cuda"  # the pool is pinned for GPU state
    single = measure_chunk_writes(directory, per_file, 1, pinned=pinned)
    parallel = measure_chunk_writes(directory, per_file, writers, pinned=pinned)
    limits = Limits()
    if workload.device.type == "cuda":
        measure_copies(min(state_bytes, COPY_PROBE_MAX), limits)
    return Disk(parallel, writers, single, limits.d2h_pinned_gbps)


def _gpu_memory(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def measure(
    workload: Workload,
    config: Config,
    *,
    rounds: int,
    num_steps: int,
    max_seconds: float,
    interval_override: int | None,
    progress: Progress,
) -> Measurements:
    """Run the whole measurement against ``config.directory``; it is left as it was."""
    device = workload.device
    available = host_memory_available()
    gpu = _gpu_memory(device)
    # Asked before the checkpointer allocates its own GPU buffer, as at its first checkpoint.
    auto = choose_staging("auto", device, workload.state_bytes()) if gpu is not None else None
    root = local_directory(config.directory)  # it measures a local disk
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".diagnose-", dir=root))
    try:
        progress(f"disk: one writer against several, in {root}")
        disk = _measure_disk(scratch / "probe", workload, config)
        ckpt = SyncCheckpointer(
            config.replace(directory=scratch / "checkpoints"), **workload.state()
        )
        try:
            progress("first checkpoint (plans the layout, allocates staging memory)")
            first = _timed(lambda: ckpt.checkpoint(0).wait(), device)
            plain = [_timed(workload.step, device) for _ in range(PLAIN_STEPS)]
            progress(f"{rounds} isolated checkpoints, steps timed while each persists")
            measured = _isolated_rounds(ckpt, workload, rounds)
            step_ms = statistics.median([p * 1e3 for p in plain] + measured.plain)
            interval, source = checkpoint_interval(
                config,
                interval_override,
                [p / 1e3 for p in measured.plain] + plain,
                [(first, first)]
                + [(c / 1e3, p) for c, p in zip(measured.call, measured.persist, strict=True)],
            )
            progress(f"{num_steps} steps checkpointing every {interval} ({source})")
            run = _interval_run(
                ckpt, workload, interval, num_steps, max_seconds, rounds + 1, step_ms
            )
            setup, memory = _layout_facts(ckpt, workload, config, interval, source, gpu)
        finally:
            ckpt.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if config.memory is not None and config.memory.directory is None:
            # The scratch run's own memory tier, derived from the scratch directory.
            shutil.rmtree(derived_memory_directory(scratch / "checkpoints"), ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # someone else put something there
                root.rmdir()
    memory.available_bytes = available
    memory.auto_staging = auto
    timings = Timings(
        step_ms=step_ms,
        call_ms=statistics.median(measured.call),
        stall_ms_low=median_interval(measured.stall)[0],
        stall_ms_high=median_interval(measured.stall)[1],
        plain_step_ms_spread=_interquartile(measured.plain + [p * 1e3 for p in plain]),
        isolated_checkpoints=len(measured.stall),
        call_ms_p99=p99(measured.call) or 0.0,
        stall_ms=statistics.median(measured.stall),
        stall_ms_p99=p99(measured.stall) or 0.0,
        state_dict_ms=statistics.median(measured.state_dict),
        staging_ms=statistics.median(measured.staging),
        capture_ms=statistics.median(measured.capture),
        persist_seconds=statistics.median(measured.persist),
        write_seconds=statistics.median(measured.write),
        commit_ms=statistics.median(measured.commit),
        first_checkpoint_ms=first * 1e3,
        copy_gbps=median(measured.copy_gbps),
        plain_step_ms=median(measured.plain),
        persisting_step_ms=median(measured.persisting),
        persisting_steps=len(measured.persisting),
        chunk_write_ms=median(measured.chunk_write),
        chunk_wait_ms=median(measured.chunk_wait),
        chunk_wait_ms_max=max(measured.chunk_wait) if measured.chunk_wait else None,
    )
    return Measurements(setup, timings, disk, run, memory)


def _free_bytes(directory: Path) -> int | None:
    """Bytes free on the filesystem that holds ``directory`` (its tmpfs, for the memory
    tier); None when it cannot be looked at."""
    try:
        info = os.statvfs(directory)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


def _layout_facts(
    ckpt: SyncCheckpointer,
    workload: Workload,
    config: Config,
    interval: int,
    source: str,
    gpu: tuple[int, int] | None,
) -> tuple[Setup, Memory]:
    """Chunks, staging and the pool as the checkpointer set them up for this state."""
    layout, staging = ckpt.layout, ckpt.staging
    assert layout is not None and staging is not None, "measured after the first checkpoint"
    modes = sorted(set(staging.modes.values()))
    device = workload.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setup = Setup(
        config=config,
        device=name,
        on_gpu=device.type == "cuda",
        state_bytes=layout.nbytes,
        chunks=layout.chunks,
        staging_mode="+".join(modes),
        interval_steps=interval,
        interval_source=source,
    )
    memory = Memory(available_bytes=None, pool_bytes=staging.host_pool_bytes, pinned=staging.pinned)
    tier = ckpt.stats.tiers.get("memory")
    if tier is not None:
        memory.memory_tier_directory = tier.location
        memory.memory_tier_free_bytes = _free_bytes(Path(tier.location))
    if gpu is not None:
        free, total = gpu
        need = sum(n for d, n in layout.device_bytes.items() if torch.device(d).type == "cuda")
        memory.gpu_free_bytes, memory.gpu_total_bytes = free, total
        memory.gpu_headroom_fraction = GPU_HEADROOM_FRACTION
        memory.gpu_room_bytes = int(free - GPU_HEADROOM_FRACTION * total)
        memory.gpu_staging_bytes = need
    return setup, memory


def _interquartile(values: list[float]) -> float | None:
    if len(values) < 4:
        return None
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]
