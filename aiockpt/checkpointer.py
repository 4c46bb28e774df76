"""Checkpointer and SyncCheckpointer: the public face of the pipeline.

``checkpoint(step)`` does the part training must wait for on the caller's thread (call
state_dict(), flatten, copy into staging memory) and hands the rest to the runtime's
event loop, returning a handle at once. Both front-ends share one core; they differ only
in how they wait: by awaiting a future, or by blocking on it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch

from ._engine.capture.flatten import FlatState, flatten_state
from ._engine.capture.replay import FlattenCache
from ._engine.layers import tensor_layers
from ._engine.layout import (
    ALIGNMENT,
    describe,
    layout_signature,
    plan_layout,
    plan_layout_for_count,
)
from ._engine.memory import StagingMemory
from ._engine.pipeline import Admitted, Pipeline, _Job
from ._engine.reader import Placement, TensorFilter, read_checkpoint, tensor_filter
from ._engine.reshard import RankSelection, place_shards
from ._engine.runtime import CallerLoop, MonitorLoop, PrivateLoop, Runtime
from ._engine.staging import CaptureGuard, Capturer, Snapshot, choose_staging
from ._format.manifest import TensorRecord
from ._version import __version__
from .config import Config
from .distributed.group import RankGroup, is_rank_zero
from .distributed.sharding import RankShare, Replicated, object_kinds, optimizer_parameters
from .errors import (
    BackgroundError,
    CheckpointError,
    CheckpointInProgressError,
    ConfigError,
    CorruptCheckpointError,
    NoCheckpointError,
    RestoreError,
    UnsupportedStateError,
    WorldSizeError,
)
from .metrics import CheckpointerStats, CheckpointMetrics
from .stateful import Stateful
from .storage import CheckpointStorage, open_storage
from .storage.local import MAX_STEP, CheckpointInfo

__all__ = ["CheckpointHandle", "Checkpointer", "SyncCheckpointHandle", "SyncCheckpointer"]

logger = logging.getLogger("aiockpt")

AnyFuture = concurrent.futures.Future[Path | None] | asyncio.Future[Path | None]
T = TypeVar("T")


@dataclass
class _Failure:
    step: int
    error: BaseException
    reported: bool = False

    def as_error(self) -> BackgroundError:
        self.reported = True
        error = BackgroundError(
            f"checkpoint of step {self.step} failed in the background: "
            f"{type(self.error).__name__}: {self.error}. The previous committed checkpoint is "
            "intact; fix the cause (see the chained exception) and checkpoint again"
        )
        error.__cause__ = self.error
        return error


@dataclass(frozen=True)
class _RestoreRequest:
    """Which objects a restore loads, and which of them only in part (by layer)."""

    names: list[str]
    partial: set[str]
    layers: str | None

    def select(self) -> TensorFilter | None:
        # Non-module objects are restored whole, whatever the layer pattern.
        return tensor_filter(self.names, self.layers, layered=self.partial)


class _HandleBase:
    def __init__(
        self, core: _Core, step: int, metrics: CheckpointMetrics, future: AnyFuture | None
    ):
        self.step = step
        self.metrics = metrics
        self._core = core
        self._future = future

    @property
    def skipped(self) -> bool:
        return self.metrics.skipped

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def _outcome(self) -> CheckpointInfo | None:
        if self._future is None:
            return None
        if self._future.cancelled():
            raise CheckpointError(
                f"checkpoint of step {self.step} was cancelled (close(cancel=True)) and "
                "never became visible"
            )
        try:
            path = self._future.result()
        except BaseException as exc:
            raise self._core.failure_for(self.step, exc).as_error() from exc
        if path is None:  # another rank skipped it: nothing was committed
            return None
        return CheckpointInfo(self.step, path, self.metrics.nbytes, time.time())

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else ("done" if self.done() else "in flight")
        return f"<{type(self).__name__} step={self.step} {state}>"


class CheckpointHandle(_HandleBase):
    """A captured checkpoint on its way to disk; ``await`` it for the durable commit."""

    async def wait(self) -> CheckpointInfo | None:
        """The committed checkpoint (None if skipped); raises BackgroundError on failure."""
        if self._future is not None and not self._future.done():
            if isinstance(self._future, concurrent.futures.Future):
                waiter = asyncio.wrap_future(self._future)
                await asyncio.wait([waiter])
                # _outcome() raises the failure; mark the copy's as seen, or asyncio logs
                # "Future exception was never retrieved" when it is collected.
                if not waiter.cancelled():
                    waiter.exception()
            else:
                await asyncio.wait([self._future])
        return self._outcome()

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.wait().__await__()


class SyncCheckpointHandle(_HandleBase):
    """A captured checkpoint on its way to disk; ``wait()`` blocks until it is durable."""

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        if isinstance(self._future, concurrent.futures.Future):
            concurrent.futures.wait([self._future], timeout=timeout)
            if not self._future.done():
                raise TimeoutError(
                    f"checkpoint of step {self.step} still in flight after {timeout} s"
                )
        return self._outcome()


class _Core:
    """State shared by both front-ends; every method runs on the caller's thread."""

    def __init__(self, config: Config, stateful: Mapping[str, Any], runtime: Runtime) -> None:
        if not stateful:
            raise TypeError(
                "Checkpointer needs at least one object to save, e.g. "
                "Checkpointer(config, model=model, optimizer=optimizer)"
            )
        for name, obj in stateful.items():
            if not isinstance(obj, Stateful):
                raise TypeError(
                    f"{name}={type(obj).__name__} has no state_dict()/load_state_dict(); pass "
                    "modules, optimizers, schedulers, aiockpt.RNGState() or your own Stateful"
                )
        self.config = config
        self.kinds = object_kinds(stateful)
        self.objects = {
            name: obj.wrapped if isinstance(obj, Replicated) else obj
            for name, obj in stateful.items()
        }
        self.runtime = runtime
        self.ranks = RankGroup.current(config.rank_timeout_s)
        self.store: CheckpointStorage = open_storage(
            config.directory,
            durable=config.durable,
            lead=self.ranks is None or self.ranks.is_zero,
        )
        self._open_store()
        self.memory = StagingMemory(max_async=config.max_async)
        self.pipeline = Pipeline(config, self.store, self.memory, self.ranks)
        self.sequence = 0  # checkpoint() calls so far: the same count on every rank
        self._shares: dict[tuple[object, ...], RankShare] = {}
        self.guard = CaptureGuard()
        self.stats = CheckpointerStats()
        self.versions = {"aiockpt": __version__, "torch": torch.__version__}
        self.capturer: Capturer | None = None
        self.layers: list[str | None] = []
        self.plans = FlattenCache()
        # The FlatState.structure last found to match the layout: the same object again
        # means the same dtypes, shapes and devices, so the layout still fits.
        self._fitting_structure: object | None = None
        self.closed = False
        self.pid = os.getpid()
        _open_cores.add(self)
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        self._in_flight: dict[int, AnyFuture] = {}

    def _open_store(self) -> None:
        if self.ranks is None:
            self.store.open()
            return
        # Rank 0 takes the lock and clears a dead run's leftovers before any rank writes;
        # every rank learns whether that worked, so none is left waiting for the others.
        problem = None
        try:
            self.store.open()
        except Exception as exc:
            problem = exc
        problems = self.ranks.all_gather(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        failed = [f"rank {rank}: {p}" for rank, p in enumerate(problems) if p is not None]
        if failed:
            self.store.close()
            raise CheckpointError(f"another rank could not open {self.config.directory}: {failed}")

    # -- failures --------------------------------------------------------------------------
    def failure_for(self, step: int, exc: BaseException) -> _Failure:
        with self._lock:
            for failure in self._failures:
                if failure.error is exc:
                    return failure
            failure = _Failure(step, exc)
            self._failures.append(failure)
            return failure

    def raise_failures(self) -> None:
        # A future is done a moment before its done-callback registers the failure; look
        # at the futures themselves so the very next call reports it.
        for step, future in list(self._in_flight.items()):
            if future.done() and not future.cancelled() and future.exception() is not None:
                failure = self.failure_for(step, future.exception())  # type: ignore[arg-type]
                if self.config.on_error == "warn":
                    failure.reported = True
        with self._lock:
            # Failures stay listed once reported, so a late done-callback finds them seen.
            pending = [f for f in self._failures if not f.reported]
            for failure in pending[1:]:
                failure.reported = True
        if pending and self.config.on_error == "raise":
            raise pending[0].as_error()

    def _on_done(self, step: int, metrics: CheckpointMetrics, future: AnyFuture) -> None:
        self._in_flight.pop(step, None)
        if future.cancelled():
            return
        error = future.exception()
        if error is None and future.result() is None:  # another rank skipped it
            self.stats.skipped += 1
            return
        if error is None:
            self.stats.committed += 1
            if self.config.verbose and is_rank_zero():
                logger.info("aiockpt: %s", metrics.summary())
            return
        self.stats.failed += 1
        failure = self.failure_for(step, error)
        if self.config.on_error == "warn":
            failure.reported = True
            logger.warning("aiockpt: checkpoint of step %d failed", step, exc_info=error)

    # -- capture -----------------------------------------------------------------------------
    def check_can_checkpoint(self, step: int) -> None:
        if self.closed:
            raise CheckpointError("this Checkpointer is closed; create a new one")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
            # Checked before anything is captured, committed or deleted: a step the format
            # cannot hold would be committed as a checkpoint that no reader accepts.
            raise ConfigError(
                f"step must be a non-negative int, at most {MAX_STEP} (2**63 - 1, what the "
                f"checkpoint format holds), got {step!r}; pass the training step counter"
            )
        self.raise_failures()
        if step in self._in_flight and not self._in_flight[step].done():
            raise CheckpointInProgressError(
                f"a checkpoint of step {step} is still in flight; await its handle first "
                "or use a new step number"
            )

    def flatten(self) -> FlatState:
        states = {name: obj.state_dict() for name, obj in self.objects.items()}
        return flatten_state(states, self.plans)

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
        modes = {}
        for device in layout.devices:
            start, end = layout.device_span(device)
            modes[device] = choose_staging(self.config.staging, device, end - start)
        self.memory.drop_gpu_buffers()
        capturer = Capturer(layout, self.memory, modes)
        largest = max((c.nbytes for c in layout.chunks), default=0)
        buffer_bytes = max(-(-largest // 4096) * 4096, 4096)
        # Whole chunks: pinned_ratio = 2 must hold two whole checkpoints, even when the
        # last chunk is small.
        wanted = math.ceil(self.config.pinned_ratio * len(layout.chunks))
        floor = len(capturer.host_captured_chunks) + (1 if capturer.gpu_devices else 0)
        pin = any(d.type == "cuda" for d in layout.devices)
        self.memory.resize_host(buffer_bytes, max(wanted, floor, 1), pin=pin)
        if any(mode == "host" for mode in modes.values()):
            self.guard.install(self.objects.values())
        self.capturer = capturer
        self.layers = layers
        self._fitting_structure = flat.structure
        if self.config.verbose and is_rank_zero():
            logger.info("aiockpt: layout %s; staging %s", describe(layout), modes)
            for warning in self.config.queueing_warnings(len(layout.chunks)):
                logger.warning("aiockpt: %s", warning)

    def capture(
        self,
        step: int,
        flat: FlatState,
        admitted: Admitted,
        metrics: CheckpointMetrics,
        share: dict[str, Any] | None = None,
        shared_directory: str | None = None,
    ) -> _Job:
        assert self.capturer is not None
        admission, previous, committed = admitted
        staging_start = time.perf_counter()
        host_ready, gpu_ready = self.capturer.capture(flat.tensors, admission, self.guard)
        metrics.staging_ms = (time.perf_counter() - staging_start) * 1e3
        layout = self.capturer.layout
        metrics.nbytes = self.capturer.nbytes
        metrics.chunks = len(layout.chunks)
        snapshot = Snapshot(step, layout, flat.skeleton, admission, host_ready, gpu_ready)
        return _Job(
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
        )

    def started(self, step: int, metrics: CheckpointMetrics, future: AnyFuture) -> None:
        self.stats.requested += 1
        self._in_flight[step] = future
        future.add_done_callback(lambda f: self._on_done(step, metrics, f))

    # -- restore -----------------------------------------------------------------------------
    def candidates(self, step: int | None) -> list[CheckpointInfo]:
        committed = self.store.list_committed()
        if step is None:
            return committed[::-1]
        chosen = [info for info in committed if info.step == step]
        if not chosen:
            steps = [info.step for info in committed]
            raise NoCheckpointError(
                f"no committed checkpoint of step {step} in {self.config.directory} "
                f"(committed steps: {steps or 'none'})"
            )
        return chosen

    async def agreed_candidates(self, step: int | None) -> list[CheckpointInfo]:
        """The checkpoints to try, newest first: rank 0's list, on every rank."""
        if self.ranks is None:
            return self.candidates(step)
        ranks = self.ranks
        loop = asyncio.get_running_loop()
        mine: list[CheckpointInfo] | BaseException
        try:
            mine = self.candidates(step)
        except NoCheckpointError as exc:
            mine = exc
        chosen = await loop.run_in_executor(self.pipeline.coordinator, ranks.broadcast, mine)
        if isinstance(chosen, BaseException):
            raise chosen
        return [
            info
            if isinstance(mine, BaseException)
            else next((m for m in mine if m.step == info.step), info)
            for info in chosen
        ]

    async def agree_on_read(
        self, info: CheckpointInfo, error: BaseException | None
    ) -> BaseException | None:
        """This rank's read error, or the first other rank's; None when all read well."""
        if self.ranks is None:
            return error
        loop = asyncio.get_running_loop()
        vote = None if error is None else (type(error).__name__, str(error))
        votes = await loop.run_in_executor(self.pipeline.coordinator, self.ranks.all_gather, vote)
        if error is not None:
            return error
        for rank, other in enumerate(votes):
            if other is not None:
                kind = WorldSizeError if other[0] == "WorldSizeError" else CorruptCheckpointError
                return kind(f"rank {rank} could not read {info.path}: {other[1]}")
        return None

    async def read(
        self, info: CheckpointInfo, request: _RestoreRequest, place: Placement | None
    ) -> dict[str, Any]:
        """Read, verify and decode one checkpoint off the loop; corrupt ones raise here."""
        loop = asyncio.get_running_loop()
        # With nothing in flight (restore drained) the staging pool's pinned buffers are
        # idle: reads to the GPU borrow them instead of pinning a ring of their own.
        lent = self.memory.lend_pinned() if place is not None else []
        work = loop.run_in_executor(
            None, self._read_state, info, request, place, [b.data for b in lent]
        )
        try:
            return await asyncio.shield(work)
        finally:
            if lent:
                # A cancelled restore's reads still run: the buffers go back when they end.
                await asyncio.wait([work])
                await self.memory.give_back(lent)

    def _read_state(
        self,
        info: CheckpointInfo,
        request: _RestoreRequest,
        place: Placement | None,
        pinned: list[torch.Tensor],
    ) -> dict[str, Any]:
        # The manifest is read once, inside read_checkpoint; a missing key reads nothing
        # for that key, so checking after the read costs no extra I/O.
        rank = 0 if self.ranks is None else self.ranks.rank
        selection = RankSelection({n: self.objects[n] for n in request.names}, rank)
        loaded = read_checkpoint(
            info.path,
            select=request.select(),
            threads=self.config.num_threads,
            rank_select=selection.filter,
            place=place,
            pinned=pinned,
        )
        missing = [name for name in request.names if name not in loaded.manifest.state]
        if missing:
            raise RestoreError(
                f"{info.path} has no state for {missing} (it holds "
                f"{sorted(loaded.manifest.state)}); pass the same keyword names that saved it"
            )
        self.stats.last_restore_bytes = loaded.bytes_read
        state = loaded.state(None, keys=request.names, rank=rank, dtensor=lambda saved: saved)
        # DTensors come back sharded as the live objects shard them now.
        return {name: place_shards(state[name], self.objects[name]) for name in state}

    def placement(self, request: _RestoreRequest) -> Placement | None:
        """Where each restored tensor should be read to (None: all to host memory).

        A tensor goes where the object keeps the tensor of the same name now: modules'
        parameters and buffers on their device, so load_state_dict copies device to
        device. Optimizer state an optimizer does not hold yet follows its parameter,
        where load_state_dict would move it anyway (all but "step", which stays where it
        is loaded, as torch keeps it).
        """
        if not torch.cuda.is_available():
            return None
        devices: dict[str, torch.device] = {}
        for name in request.names:
            obj = self.objects[name]
            try:
                flat = flatten_state({name: obj.state_dict()})
            except UnsupportedStateError:  # restore never needed to save it: read to host
                continue
            devices.update(
                (n, t.device) for n, t in zip(flat.names, flat.tensors, strict=True) if t.is_cuda
            )
            if isinstance(obj, torch.optim.Optimizer):
                params = optimizer_parameters(obj)
                devices.update(
                    (f"{name}/state/{i}", p.device) for i, p in enumerate(params) if p.is_cuda
                )
        if not devices:
            return None
        cpu = torch.device("cpu")

        def place(record: TensorRecord) -> torch.device:
            device = devices.get(record.name)
            if device is None:
                owner, _, key = record.name.rpartition("/")
                device = devices.get(owner) if key != "step" else None
            return device or cpu

        return place

    def request(self, only: Iterable[str] | None, layers: str | None) -> _RestoreRequest:
        names = list(self.objects) if only is None else list(only)
        unknown = [name for name in names if name not in self.objects]
        if unknown:
            raise ValueError(f"restore(only=...) names {unknown}; known: {list(self.objects)}")
        modules = {n for n in names if isinstance(self.objects[n], torch.nn.Module)}
        if layers is not None and not modules:
            raise ValueError("restore(layers=...) needs a module among the restored objects")
        return _RestoreRequest(names, modules if layers is not None else set(), layers)

    def apply(self, state: dict[str, Any], request: _RestoreRequest) -> None:
        for name in request.names:
            obj = self.objects[name]
            if name in request.partial:
                # Only the matching layers were read; the rest of the module keeps its values.
                obj.load_state_dict(state[name], strict=False)
            else:
                obj.load_state_dict(state[name])

    def corrupt(
        self, info: CheckpointInfo, error: CorruptCheckpointError, tried: list[str]
    ) -> None:
        tried.append(f"step {info.step}: {error}")
        logger.warning("aiockpt: skipping corrupt checkpoint %s: %s", info.path, error)

    def close_resources(self) -> None:
        _open_cores.discard(self)
        self.closed = True
        self.pipeline.close()
        self.capturer = None  # its cached views would keep the buffers alive
        self.memory.release()
        self.guard.remove()
        self.store.close()
        self.runtime.close()
        if self.ranks is not None:
            self.ranks.destroy()


_open_cores: weakref.WeakSet[_Core] = weakref.WeakSet()


def _finish_at_exit() -> None:
    """Let checkpoints in flight commit when the interpreter exits without close().

    The monitor thread is a daemon and would die mid-write, leaving a temporary
    directory for the next run to delete. This runs at the start of interpreter shutdown,
    before concurrent.futures stops accepting work (it registers the same way, earlier,
    and these hooks run last-registered first), so in-flight checkpoints finish.
    """
    for core in list(_open_cores):
        if core.closed or core.pid != os.getpid() or not isinstance(core.runtime, MonitorLoop):
            continue
        try:
            core.runtime.run_sync(core.pipeline.drain())
        except Exception:  # exiting anyway; the next open cleans up
            logger.exception("aiockpt: could not finish checkpoints at exit")
        finally:
            core.close_resources()


# The hook concurrent.futures itself uses to run before executors shut down; plain atexit
# would run after, when the writer threads no longer take work.
_register_shutdown_hook = getattr(threading, "_register_atexit", atexit.register)
_register_shutdown_hook(_finish_at_exit)
# A forked child (a DataLoader worker) has none of the parent's threads: it must not try to
# drain the parent's checkpoints at its exit.
os.register_at_fork(after_in_child=_open_cores.clear)


def _aligned_total(flat: FlatState) -> int:
    return sum(-(-t.numel() * t.element_size() // ALIGNMENT) * ALIGNMENT for t in flat.tensors)


Bridge = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]


class _Ready:
    """An awaitable whose value is already there: awaiting it never suspends.

    The sync front-end runs the same operation coroutines as the async one, with a bridge
    that blocks on the runtime and hands back _Ready values, so one body serves both.
    """

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, Any]:
        return self.value
        yield  # a generator that returns at once


def _drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that only awaits _Ready values, on the caller's thread."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("aiockpt: a blocking call tried to suspend")


async def _checkpoint(
    core: _Core, step: int, block: bool | None, bridge: Bridge
) -> tuple[CheckpointMetrics, AnyFuture | None]:
    started = time.perf_counter()
    core.check_can_checkpoint(step)
    metrics = CheckpointMetrics(step)
    shared_directory = core.next_shared_directory()
    block = core.config.on_backpressure == "block" if block is None else block
    if not block and core.capturer is not None:
        # A request that will be skipped must not pay for state_dict() and flattening.
        capturer = core.capturer
        if not core.memory.would_admit(capturer.gpu_devices, len(capturer.host_captured_chunks)):
            return await _skip(core, metrics, shared_directory, bridge), None
    full = core.flatten()
    flat, share = core.share(full)
    metrics.state_dict_ms = (time.perf_counter() - started) * 1e3
    if core.needs_new_layout(flat):
        await bridge(core.pipeline.drain())
        core.raise_failures()  # what the drain just saw fail
        core.build_layout(flat)
    assert core.capturer is not None
    wait_start = time.perf_counter()
    # Straight away when there is room; the loop is visited only to wait (or to skip).
    admitted = core.pipeline.admit_now(core.capturer, core.runtime.event_loop())
    if admitted is None:
        admitted = await bridge(core.pipeline.admit(core.capturer, block=block))
    metrics.queue_wait_ms = (time.perf_counter() - wait_start) * 1e3
    if admitted is None:
        return await _skip(core, metrics, shared_directory, bridge), None
    share_fields = None if share is None else share.fields(full.names)
    try:
        job = core.capture(step, flat, admitted, metrics, share_fields, shared_directory)
    except BaseException:
        # Nothing will persist this admission: give it back, or later checkpoints would
        # wait for its memory and its commit forever.
        core.runtime.submit(core.pipeline.abandon(admitted))
        raise
    metrics.capture_ms = (time.perf_counter() - started) * 1e3
    future = core.runtime.submit(_start(core.pipeline, job))
    core.started(step, metrics, future)
    return metrics, future


async def _skip(
    core: _Core, metrics: CheckpointMetrics, shared_directory: str | None, bridge: Bridge
) -> CheckpointMetrics:
    if shared_directory is not None:
        # The other ranks may have taken this checkpoint: they learn from this rank's
        # vote that it will not be committed.
        await bridge(core.pipeline.vote_skipped(metrics.step, shared_directory, core.kinds))
    metrics.skipped = True
    core.stats.skipped += 1
    if core.config.verbose and is_rank_zero():
        logger.info("aiockpt: %s", metrics.summary())
    return metrics


async def _wait(core: _Core, bridge: Bridge) -> None:
    await bridge(core.pipeline.drain())
    core.raise_failures()


async def _restore(
    core: _Core, step: int | None, only: Iterable[str] | None, layers: str | None, bridge: Bridge
) -> int | None:
    request = core.request(only, layers)
    await bridge(core.pipeline.drain())
    tried: list[str] = []
    place = core.placement(request)  # on the caller's thread, like checkpoint()'s state_dict()
    for info in await bridge(core.agreed_candidates(step)):
        error: BaseException | None = None
        try:
            state = await bridge(core.read(info, request, place))
        except (CorruptCheckpointError, WorldSizeError) as exc:
            error = exc
        # Ranks load the same step or none: each rank reads only its own bytes, so a
        # corrupt file is seen by some ranks alone.
        error = await bridge(core.agree_on_read(info, error))
        if isinstance(error, CorruptCheckpointError):
            if step is not None:
                raise error
            core.corrupt(info, error, tried)
            continue
        if error is not None:
            raise error
        core.apply(state, request)
        # The run goes on from here: its next commit supersedes the steps above this one.
        core.store.resumed_from(info.step)
        return info.step
    if tried:
        raise CorruptCheckpointError(
            f"every checkpoint in {core.config.directory} failed verification:\n  "
            + "\n  ".join(tried)
        )
    return None


async def _close(core: _Core, bridge: Bridge, cancel: bool) -> None:
    if core.closed:
        return
    try:
        await bridge(core.pipeline.drain(cancel=cancel))
    finally:
        core.close_resources()
    core.raise_failures()


async def _start(pipeline: Pipeline, job: _Job) -> Path | None:
    return await pipeline.start(job)


class _FrontEnd:
    def __init__(self, config: Config | None, stateful: Mapping[str, Any], sync: bool) -> None:
        config = config or Config()
        if config.use_monitor:
            runtime: Runtime = MonitorLoop()
        else:
            runtime = PrivateLoop() if sync else CallerLoop()
        try:
            self._core = _Core(config, stateful, runtime)
        except BaseException:
            runtime.close()
            raise

    @property
    def config(self) -> Config:
        return self._core.config

    @property
    def stats(self) -> CheckpointerStats:
        return self._core.stats


class Checkpointer(_FrontEnd):
    """Asynchronous checkpoints of any Stateful objects, given as keyword arguments.

    >>> ckpt = aiockpt.Checkpointer(cfg, model=model, optimizer=opt, rng=aiockpt.RNGState())
    >>> handle = await ckpt.checkpoint(step)   # returns once captured
    >>> await handle                           # durable
    """

    def __init__(self, config: Config | None = None, /, **stateful: Any) -> None:
        super().__init__(config, stateful, sync=False)

    async def checkpoint(self, step: int, *, block: bool | None = None) -> CheckpointHandle:
        """Capture the state now and persist it in the background.

        Returns once the snapshot is exact (training may change tensors right after).
        ``block`` overrides on_backpressure for this call.
        """
        metrics, future = await _checkpoint(self._core, step, block, self._core.runtime.run)
        return CheckpointHandle(self._core, step, metrics, future)

    async def wait(self) -> None:
        """Wait for every checkpoint in flight; re-raise a background failure."""
        await _wait(self._core, self._core.runtime.run)

    async def restore(
        self,
        step: int | None = None,
        *,
        only: Iterable[str] | None = None,
        layers: str | None = None,
    ) -> int | None:
        """Load the newest valid checkpoint (or ``step``) into the objects; its step or None.

        ``only`` restores some of the objects (e.g. ``["model"]``, without the optimizer);
        ``layers`` (a regular expression on layer names such as ``"model/blocks\\.[0-3]\\."``)
        restores only those layers of the modules. Either way only the needed bytes are
        read (``stats.last_restore_bytes``).
        """
        return await _restore(self._core, step, only, layers, self._core.runtime.run)

    async def close(self, *, cancel: bool = False) -> None:
        """Drain what is in flight, release memory, threads and the directory lock.

        ``cancel=True`` abandons checkpoints in flight instead of finishing them: none of
        them becomes visible, and their handles raise CheckpointError.
        """
        await _close(self._core, self._core.runtime.run, cancel)

    async def __aenter__(self) -> Checkpointer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class SyncCheckpointer(_FrontEnd):
    """The same checkpoints from plain (non-async) scripts: every call blocks the caller
    only as long as the async version would be awaited.

    With ``use_monitor = false`` there is no background loop, so ``checkpoint()`` returns
    only once the checkpoint is durable (the direct, blocking mode).
    """

    def __init__(self, config: Config | None = None, /, **stateful: Any) -> None:
        super().__init__(config, stateful, sync=True)

    def _bridge(self, coro: Coroutine[Any, Any, Any]) -> _Ready:
        return _Ready(self._core.runtime.run_sync(coro))

    def checkpoint(self, step: int, *, block: bool | None = None) -> SyncCheckpointHandle:
        metrics, future = _drive(_checkpoint(self._core, step, block, self._bridge))
        return SyncCheckpointHandle(self._core, step, metrics, future)

    def wait(self) -> None:
        _drive(_wait(self._core, self._bridge))

    def restore(
        self,
        step: int | None = None,
        *,
        only: Iterable[str] | None = None,
        layers: str | None = None,
    ) -> int | None:
        return _drive(_restore(self._core, step, only, layers, self._bridge))

    def close(self, *, cancel: bool = False) -> None:
        _drive(_close(self._core, self._bridge, cancel))

    def __enter__(self) -> SyncCheckpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
