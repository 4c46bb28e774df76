"""The save side of a Checkpointer: flatten the state, lay it out, capture it, hand it on.

Everything here runs on the caller's thread except what the bridge sends to the
runtime's loop (waiting for admission, draining before a new layout). ``checkpoint`` is
the one body of both front-ends' ``checkpoint()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import torch

from .._format.manifest import MAX_STEP
from .._util.bridge import Bridge
from .._util.location import Location
from .._version import __version__
from ..config import Config
from ..distributed.group import RankGroup, is_rank_zero
from ..distributed.sharding import RankShare
from ..errors import CheckpointError, ConfigError
from ..metrics import CheckpointerStats, CheckpointMetrics, LayoutSummary, StagingSummary
from ..stateful import state_to_save
from ..storage.base import CheckpointStorage
from .capture import FlatState, FlattenCache
from .capture.limits import StateLimits, check_layout
from .failures import AnyFuture, FailureLog
from .layers import tensor_layers
from .layout import ALIGNMENT, describe, layout_signature, plan_layout, plan_layout_for_count
from .memory import StagingMemory, covers, pool_sizes
from .pipeline import Admitted, Job, Pipeline
from .presize import estimate_chunk_sizes
from .runtime import Runtime
from .staging import CaptureGuard, Capturer, Snapshot, choose_staging

__all__ = ["Saver", "checkpoint"]

logger = logging.getLogger(__name__)


class Saver:
    """Capture state for one Checkpointer; every method runs on the caller's thread."""

    def __init__(
        self,
        config: Config,
        objects: dict[str, Any],
        kinds: dict[str, str],
        ranks: RankGroup | None,
        runtime: Runtime,
        memory: StagingMemory,
        pipeline: Pipeline,
        failures: FailureLog,
        stats: CheckpointerStats,
    ) -> None:
        self.config = config
        self.objects = objects
        self.kinds = kinds
        self.ranks = ranks
        self.runtime = runtime
        self.memory = memory
        self.pipeline = pipeline
        self.failures = failures
        self.stats = stats
        self.sequence = 0  # checkpoint() calls so far: the same count on every rank
        self._shares: dict[tuple[object, ...], RankShare] = {}
        self.guard = CaptureGuard()
        self.versions = {"aiockpt": __version__, "torch": torch.__version__}
        self.capturer: Capturer | None = None
        self.layers: list[str | None] = []
        self.plans = FlattenCache()
        self.limits = StateLimits()
        # The FlatState.structure last found to match the layout: the same object again
        # means the same dtypes, shapes and devices, so the layout still fits.
        self._fitting_structure: object | None = None
        self._said_in_pieces = False
        self.closed = False

    def plan_pool_early(self) -> None:
        """Start mapping (and pinning) the host pool now, from the state's likely size, so
        that the first checkpoint finds it ready instead of pinning on the training thread.

        One process only: with many ranks each writes a share the guess cannot know.
        """
        if self.ranks is not None:
            return
        chunks = estimate_chunk_sizes(self.objects, self.config.chunk_bytes)
        devices = [torch.device(d) for d in chunks if d.startswith(("cpu", "cuda"))]
        sizes = pool_sizes(
            [size for d in devices for size in chunks[str(d)]], self.config.pinned_ratio
        )
        cuda = next((d for d in devices if d.type == "cuda"), None)
        self.memory.plan_host(sizes, pin=cuda is not None, device=cuda)

    def check_can_checkpoint(self, step: int, *, one_per_step: bool = True) -> None:
        self.check_step(step)
        self.failures.raise_failures()
        if one_per_step:  # steps name the step manager's checkpoints; paths name the others
            self.failures.check_not_in_flight(step)

    def check_step(self, step: int) -> None:
        """Refuse a closed checkpointer, and a step the format cannot hold."""
        if self.closed:
            raise CheckpointError("this Checkpointer is closed; create a new one")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
            # Checked before anything is captured, committed or deleted: a step the format
            # cannot hold would be committed as a checkpoint that no reader accepts.
            raise ConfigError(
                f"step must be a non-negative int, at most {MAX_STEP} (2**63 - 1, what the "
                f"checkpoint format holds), got {step!r}; pass the training step counter"
            )

    def flatten(self) -> FlatState:
        states = {name: state_to_save(obj) for name, obj in self.objects.items()}
        flat = self.limits.flatten(states, self.plans, complete=self.ranks is None)
        self.stats.replayed = self.plans.hits
        return flat

    def next_shared_directory(self) -> str | None:
        """The suffix of the temporary directory all ranks write this checkpoint into."""
        self.sequence += 1
        return None if self.ranks is None else f"{self.ranks.token}n{self.sequence}"

    def share(self, flat: FlatState) -> tuple[FlatState, RankShare | None]:
        """The part of ``flat`` that this rank writes (all of it for one process)."""
        if self.ranks is None:
            return flat, None
        key = (tuple(flat.names), *(t.shape for t in flat.tensors))
        share = self._shares.get(key)
        if share is None:
            share = RankShare.plan(flat.tensors, flat.names, flat.shards, self.kinds, self.ranks)
            self._shares = {key: share}
        mine = FlatState(
            [flat.tensors[i] for i in share.written],
            [flat.names[i] for i in share.written],
            flat.skeleton,
        )
        return mine, share

    def needs_new_layout(self, flat: FlatState) -> bool:
        if self.capturer is None:
            return True
        if flat.structure is not None and flat.structure is self._fitting_structure:
            return False
        signature = layout_signature(flat.tensors, self.capturer.layout.chunk_bytes)
        if signature != self.capturer.layout.signature:
            return True
        self._fitting_structure = flat.structure
        return False

    def build_layout(self, flat: FlatState) -> None:
        """Plan chunks and size staging memory; only called with nothing in flight."""
        layers = tensor_layers(self.objects, flat.names)
        if self.config.chunk_count is not None:
            layout = plan_layout_for_count(
                flat.tensors, flat.names, self.config.chunk_count, layers
            )
        else:
            chunk_bytes = self.config.chunk_bytes(_aligned_total(flat))
            layout = plan_layout(flat.tensors, flat.names, chunk_bytes, layers)
        check_layout(layout)
        modes = {}
        for device in layout.devices:
            start, end = layout.device_span(device)
            modes[device] = choose_staging(self.config.staging, device, end - start)
        self.memory.drop_gpu_buffers()
        # One buffer per chunk and per whole unit of pinned_ratio, each the chunk's size:
        # buffers the pool already maps (from the guess at construction) are kept.
        sizes = pool_sizes([c.nbytes for c in layout.chunks], self.config.pinned_ratio)
        host_captured = [c.nbytes for c in layout.chunks if modes[c.device] != "gpu"]
        at_once = _held_at_once(sizes, host_captured)
        self.memory.plan_host(
            sizes,
            pin=any(d.type == "cuda" for d in layout.devices),
            device=next((d for d in layout.devices if d.type == "cuda"), None),
            chunk_bytes={c.index: c.nbytes for c in layout.chunks},
        )
        capturer = Capturer(layout, self.memory, modes, host_at_once=at_once)
        if capturer.in_pieces and not self._said_in_pieces and is_rank_zero():
            self._said_in_pieces = True
            logger.warning(
                "the host pool (pinned_ratio = %s: %.1f MiB) cannot hold the %.1f MiB "
                "captured to host memory (staging %s): each checkpoint() waits until all "
                "but the last pool-full of it is written. Raise pinned_ratio to 1 for "
                "captures in milliseconds (CheckpointMetrics.captured_in_pieces counts "
                "the chunks captured this way)",
                self.config.pinned_ratio,
                sum(sizes) / 2**20,
                sum(host_captured) / 2**20,
                {str(d): m for d, m in modes.items()},
            )
        if any(mode == "host" for mode in modes.values()):
            self.guard.install(self.objects.values())
        self.capturer = capturer
        self.layers = layers
        self._fitting_structure = flat.structure
        # Said at INFO (verbose): the tuning advice comes with the layout it is about.
        if is_rank_zero() and logger.isEnabledFor(logging.INFO):
            logger.info("layout %s; staging %s", describe(layout), modes)
            for warning in self.config.queueing_warnings(len(layout.chunks)):
                logger.warning("%s", warning)

    def capture(
        self,
        step: int,
        flat: FlatState,
        admitted: Admitted,
        metrics: CheckpointMetrics,
        origin: float,
        share: dict[str, Any] | None = None,
        shared_directory: str | None = None,
        store: CheckpointStorage | None = None,
    ) -> Job:
        assert self.capturer is not None
        admission, previous, committed = admitted
        staging_start = time.perf_counter()
        host_ready, gpu_ready = self.capturer.capture(flat.tensors, admission, self.guard)
        metrics.staging_ms = (time.perf_counter() - staging_start) * 1e3
        layout = self.capturer.layout
        metrics.nbytes = self.capturer.nbytes
        metrics.chunks = len(layout.chunks)
        snapshot = Snapshot(step, layout, flat.skeleton, admission, host_ready, gpu_ready)
        return Job(
            snapshot=snapshot,
            capturer=self.capturer,
            metrics=metrics,
            names=flat.names,
            layers=self.layers,
            versions=self.versions,
            previous_commit=previous,
            committed=committed,
            rank=0 if self.ranks is None else self.ranks.rank,
            shared_directory=shared_directory,
            share=share or {},
            kinds=self.kinds,
            origin=origin,
            late_indices=frozenset(c.index for c in self.capturer.late_chunks),
            store=store,
        )

    # -- what the last layout set up, published read-only -----------------------------------
    def staging_summary(self) -> StagingSummary | None:
        memory = self.memory
        if self.capturer is None and (self.closed or not memory.host_buffer_count):
            return None  # nothing set up yet (the pool starts at construction if it can)
        return StagingSummary(
            host_pool_bytes=memory.host_nbytes,
            host_buffers=memory.host_buffer_count,
            host_buffers_free=memory.free_host_buffer_count,
            pinned=memory.pinned,
            host_pool_ready_bytes=memory.host_ready_nbytes,
            gpu_staging_bytes={str(d): n for d, n in memory.gpu_nbytes().items()},
            modes={}
            if self.capturer is None
            else {str(d): m for d, m in self.capturer.modes.items()},
            in_flight=memory.in_flight,
        )

    def layout_summary(self) -> LayoutSummary | None:
        if self.capturer is None:
            return None
        layout = self.capturer.layout
        spans = {d: layout.device_span(d) for d in layout.devices}
        return LayoutSummary(
            chunks=len(layout.chunks),
            chunk_sizes=tuple(c.nbytes for c in layout.chunks),
            tensors=len(layout.tensors),
            nbytes=layout.nbytes,
            device_bytes={str(d): end - start for d, (start, end) in spans.items()},
        )

    def release(self) -> None:
        """Refuse further checkpoints and drop what capture holds (at close)."""
        self.closed = True
        self.capturer = None  # its cached views would keep the buffers alive
        self.guard.remove()


def _held_at_once(buffer_sizes: list[int], chunk_sizes: list[int]) -> int | None:
    """How many of these chunks, from the first, a pool of these buffers holds at once;
    None when it holds them all."""
    if covers(buffer_sizes, chunk_sizes):
        return None
    low, high = 0, len(chunk_sizes)  # covers the first `low`, not the first `high`
    while high - low > 1:
        middle = (low + high) // 2
        if covers(buffer_sizes, chunk_sizes[:middle]):
            low = middle
        else:
            high = middle
    return low


def _aligned_total(flat: FlatState) -> int:
    return sum(-(-t.numel() * t.element_size() // ALIGNMENT) * ALIGNMENT for t in flat.tensors)


# Wraps the pipeline's persist coroutine of one checkpoint (the tiers: then copy it on).
Persist = Callable[[Coroutine[Any, Any, Location | None]], Coroutine[Any, Any, Location | None]]


async def checkpoint(
    saver: Saver,
    step: int,
    block: bool | None,
    bridge: Bridge,
    persist: Persist | None = None,
    destination: CheckpointStorage | None = None,
    what: str | None = None,
) -> tuple[CheckpointMetrics, AnyFuture | None]:
    """Capture ``step`` and hand it to the pipeline; its metrics and its future (None:
    skipped on backpressure).

    ``persist`` wraps what runs in the background (the tiers' promotions);
    ``destination`` is where it goes when not to the pipeline's store (a path-level save:
    several may be in flight for one step), and ``what`` names it in a failure's message.
    """
    started = time.perf_counter()
    saver.check_can_checkpoint(step, one_per_step=destination is None)
    metrics = CheckpointMetrics(step)
    shared_directory = saver.next_shared_directory()
    block = saver.config.on_backpressure == "block" if block is None else block
    if not block and saver.capturer is not None:
        # A request that will be skipped must not pay for state_dict() and flattening.
        capturer = saver.capturer
        if not saver.memory.would_admit(capturer.gpu_devices, capturer.host_captured_chunks):
            return await _skip(saver, metrics, shared_directory, bridge), None
    full = saver.flatten()
    flat, share = saver.share(full)
    metrics.state_dict_ms = (time.perf_counter() - started) * 1e3
    if saver.needs_new_layout(flat):
        await bridge(saver.pipeline.drain())
        saver.failures.raise_failures()  # what the drain just saw fail
        saver.build_layout(flat)
    assert saver.capturer is not None
    wait_start = time.perf_counter()
    # Straight away when there is room; the loop is visited only to wait (or to skip).
    admitted = saver.pipeline.admit_now(saver.capturer, saver.runtime.event_loop())
    if admitted is None:
        admitted = await bridge(saver.pipeline.admit(saver.capturer, block=block))
    metrics.queue_wait_ms = (time.perf_counter() - wait_start) * 1e3
    if admitted is None:
        return await _skip(saver, metrics, shared_directory, bridge), None
    share_fields = None if share is None else share.fields(full.names)
    task: asyncio.Task[Location | None] | None = None
    try:
        job = saver.capture(
            step, flat, admitted, metrics, started, share_fields, shared_directory, destination
        )
        if job.late_indices:
            # The pool cannot hold it all: the first chunks must be written (and their
            # buffers freed) while the capture takes the next ones. The task runs on the
            # loop whenever the loop runs (with no monitor thread: inside each bridge call).
            task = await bridge(_launch(saver.pipeline, job))
            await _capture_in_pieces(saver, flat, job, bridge)
    except BaseException as exc:
        if task is None:
            # Nothing will persist this admission: give it back, or later checkpoints
            # would wait for its memory and its commit forever.
            saver.runtime.submit(saver.pipeline.abandon(admitted))
        else:
            # Its pipeline gives everything back as it fails; the error is this one.
            await bridge(saver.pipeline.fail_late(job, task, exc))
        raise
    metrics.capture_ms = (time.perf_counter() - started) * 1e3
    background = _start(saver.pipeline, job) if task is None else _finished(task)
    future = saver.runtime.submit(background if persist is None else persist(background))
    saver.failures.started(step, metrics, future, what)
    return metrics, future


async def _capture_in_pieces(saver: Saver, flat: FlatState, job: Job, bridge: Bridge) -> None:
    """Capture the chunks that wait for host buffers, one at a time, in order."""
    memory, capturer = saver.memory, job.capturer
    for chunk in capturer.late_chunks:
        buffer = memory.take_host_buffer_now(chunk.nbytes)
        if buffer is None:
            buffer = await bridge(memory.take_host_buffer(chunk.nbytes))
        try:
            ready = capturer.capture_piece(chunk, flat.tensors, buffer, saver.guard)
        except BaseException:
            await bridge(memory.give_back([buffer]))
            raise
        await bridge(saver.pipeline.deliver(job, chunk.index, buffer, ready))
    job.metrics.captured_in_pieces = len(capturer.late_chunks)


async def _launch(pipeline: Pipeline, job: Job) -> asyncio.Task[Location | None]:
    return pipeline.start(job)


async def _finished(task: asyncio.Task[Location | None]) -> Location | None:
    return await task


async def _skip(
    saver: Saver, metrics: CheckpointMetrics, shared_directory: str | None, bridge: Bridge
) -> CheckpointMetrics:
    if shared_directory is not None:
        # The other ranks may have taken this checkpoint: they learn from this rank's
        # vote that it will not be committed.
        await bridge(saver.pipeline.vote_skipped(metrics.step, shared_directory, saver.kinds))
    metrics.skipped = True
    saver.stats.skipped += 1
    if is_rank_zero() and logger.isEnabledFor(logging.INFO):
        logger.info("%s", metrics.summary())
    return metrics


async def _start(pipeline: Pipeline, job: Job) -> Location | None:
    return await pipeline.start(job)
