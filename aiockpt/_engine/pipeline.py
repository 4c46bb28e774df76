"""The background half of a checkpoint, as coroutines on the runtime's event loop.

One captured snapshot moves through these states::

    admitted ──capture (caller's thread)──▶ captured
        captured ──per chunk──▶ [copy task: GPU staging -> host buffer, await CUDA event]
                                      │  (chunks captured to host skip this)
                                      ▼
                                [write task: semaphore slot -> writer thread:
                                 crc32c + pwrite + fsync]  ──▶ host buffer given back
        all chunks durable ──▶ commit (in admission order): manifest, rename, latest
                           ──▶ retention ──▶ in-flight place given back

The write semaphore has max_async x chunks-per-checkpoint slots, so no chunk of any
in-flight checkpoint ever queues behind another chunk; the writer threads (num_threads)
are the only bound on concurrent I/O.

Copy tasks take host buffers in the order they ask, so a pool smaller than the state
(``pinned_ratio`` < 1) is a ring: chunks stream from the GPU staging buffer through it as
writes free its buffers. Chunks captured straight to host memory that the pool cannot
hold at once arrive late (``Job.late_indices``): the pipeline starts before the capture
ends, writes the first ones, and each later one comes through ``deliver``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._format.manifest import Manifest, manifest_from_layout
from .._format.writer import ManifestWriter
from .._util.location import Location
from ..config import Config
from ..distributed.group import RankGroup
from ..errors import CheckpointError
from ..metrics import CheckpointMetrics, ChunkSpan
from ..storage.base import CheckpointStorage
from .incremental import ChangeTracker, Tracking
from .layout import Chunk, chunk_file_name
from .memory import Admission, HostBuffer, StagingMemory
from .merge import FAILED, OK, SKIPPED, RankPart, merge_parts
from .staging import Capturer, Snapshot

__all__ = ["Admitted", "Job", "Pipeline"]

logger = logging.getLogger(__name__)


async def wait_cuda_event(event: torch.cuda.Event, waiter: ThreadPoolExecutor) -> None:
    """Await a CUDA event without blocking the loop or polling it.

    Event.synchronize() releases the GIL and sleeps (the events are created blocking), so
    waiting costs training no Python time; polling query() from the loop would take the
    GIL on every wake-up.
    """
    if not event.query():
        await asyncio.get_running_loop().run_in_executor(waiter, event.synchronize)


# An admission, the commit it must follow (None: the first) and the one it will resolve.
Admitted = tuple[Admission, asyncio.Future[None] | None, asyncio.Future[None]]


@dataclass(eq=False)
class Job:
    """One captured checkpoint, handed from capture to the pipeline."""

    snapshot: Snapshot
    capturer: Capturer
    metrics: CheckpointMetrics
    names: list[str]
    layers: list[str | None] | None
    versions: dict[str, str]
    previous_commit: asyncio.Future[None] | None
    committed: asyncio.Future[None]
    gpu_chunks_left: dict[torch.device, int] = field(default_factory=dict)
    # Many ranks: this rank's number, the temporary all ranks share, what this rank wrote
    # of the full state (RankPart fields), and each object's kind.
    rank: int = 0
    shared_directory: str | None = None
    share: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    # perf_counter() when the capture began: chunk spans are measured from it.
    origin: float = 0.0
    # Chunks captured in pieces after the pipeline started (the pool could not hold them
    # all): each arrives through ``Pipeline.deliver`` with its buffer and its copy's event.
    late_indices: frozenset[int] = frozenset()
    late: dict[int, asyncio.Future[tuple[HostBuffer, torch.cuda.Event | None]]] = field(
        default_factory=dict
    )
    ended: bool = False

    def late_piece(self, index: int) -> asyncio.Future[tuple[HostBuffer, torch.cuda.Event | None]]:
        """The future of a late chunk (on the loop; made by whichever side comes first)."""
        future = self.late.get(index)
        if future is None:
            future = self.late[index] = asyncio.get_running_loop().create_future()
        return future

    # Where this one goes, when not to the pipeline's store: a path-level save names its
    # own path (storage.paths.PathStorage).
    store: CheckpointStorage | None = None
    # Incremental checkpoints: what this one shares with the previous (None: writes all).
    tracking: Tracking | None = None


@dataclass(frozen=True)
class _Ballot:
    """One checkpoint as the vote of the ranks sees it."""

    step: int
    shared_directory: str
    kinds: dict[str, str]
    versions: dict[str, str]


class Pipeline:
    """Admits, copies, writes and commits checkpoints; lives on one event loop."""

    def __init__(
        self,
        config: Config,
        store: CheckpointStorage | None,
        memory: StagingMemory,
        ranks: RankGroup | None = None,
    ) -> None:
        self.config = config
        # Where checkpoints go unless a job names its own store (None: every job does).
        self.store = store
        self.memory = memory
        self.ranks = ranks
        # Collectives of the rank group, one at a time and in commit order.
        self.coordinator = ThreadPoolExecutor(1, thread_name_prefix="aiockpt-ranks")
        self.writers = ThreadPoolExecutor(config.num_threads, thread_name_prefix="aiockpt-write")
        # Copies on one stream finish in order, so one waiting thread serves them all.
        self.event_waiter = ThreadPoolExecutor(1, thread_name_prefix="aiockpt-cuda-event")
        self._write_slots: asyncio.Semaphore | None = None
        self._write_slot_count = 0
        self._last_commit: asyncio.Future[None] | None = None
        self._chain_lock = threading.Lock()
        self._jobs: set[asyncio.Task[Any]] = set()
        # One process's manifests, encoded at the cost of what changed between them.
        self.manifests = ManifestWriter()
        # Incremental checkpoints share unchanged tensors with this pipeline's previous
        # commit; under torch.distributed each rank shares its own files (their names
        # carry its rank), and the merged manifest lists them all.
        # (A path-level saver has no store of its own: its saves are written whole.)
        self.changes = (
            ChangeTracker(store)
            if store is not None and config.incremental and ChangeTracker.applies_to(store)
            else None
        )

    def restored(self, checkpoint: Location, manifest: Manifest) -> None:
        """The state was restored from ``checkpoint``: when it is one of this pipeline's
        store, the next incremental checkpoint shares what is still the same with it."""
        if (
            self.changes is not None
            and self.store is not None
            and isinstance(checkpoint, Path)
            and isinstance(self.store.root, Path)
            and checkpoint.parent.resolve() == self.store.root.resolve()
        ):
            self.changes.restored(checkpoint, manifest)

    # -- admission -----------------------------------------------------------------------
    def admit_now(self, capturer: Capturer, loop: asyncio.AbstractEventLoop) -> Admitted | None:
        """Admit on the caller's thread, without a trip to ``loop`` (the loop this pipeline
        runs on), when nothing has to be waited for; None means: go through ``admit``."""
        admission = self.memory.admit_now(capturer.gpu_devices, capturer.host_captured_chunks)
        return None if admission is None else self._chain(admission, loop)

    async def admit(self, capturer: Capturer, *, block: bool) -> Admitted | None:
        admission = await self.memory.admit(
            capturer.gpu_devices, capturer.host_captured_chunks, block=block
        )
        if admission is None:
            return None
        return self._chain(admission, asyncio.get_running_loop())

    def _chain(self, admission: Admission, loop: asyncio.AbstractEventLoop) -> Admitted:
        # Commit order is admission order, so `latest` only ever moves forward. The future
        # is only ever awaited and resolved on the loop; admissions come from both threads.
        with self._chain_lock:
            previous, committed = self._last_commit, loop.create_future()
            self._last_commit = committed
        return admission, previous, committed

    async def abandon(self, admitted: Admitted) -> None:
        """Give back an admission whose capture failed, so nothing waits for it."""
        admission, _, committed = admitted
        if not committed.done():
            committed.set_result(None)
        await self.memory.give_back(admission.host.values(), admission.gpu_devices, finished=True)

    async def deliver(
        self, job: Job, index: int, buffer: HostBuffer, ready: torch.cuda.Event | None
    ) -> None:
        """Hand a chunk captured in pieces to its pipeline (on the loop)."""
        if job.ended:  # it failed meanwhile: nothing will write this chunk
            if ready is not None:
                ready.synchronize()
            await self.memory.give_back([buffer])
            return
        job.late_piece(index).set_result((buffer, ready))

    async def fail_late(self, job: Job, task: asyncio.Task[Any], exc: BaseException) -> None:
        """The capture in pieces of ``job`` failed: its pipeline (``task``) stops waiting,
        fails and gives everything back; its error is the capture's, raised by the caller."""
        if not job.ended:
            for index in job.late_indices:
                future = job.late_piece(index)
                if not future.done():
                    future.set_exception(
                        CheckpointError(f"step {job.snapshot.step} was not captured: {exc}")
                    )
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: reported once, as the capture's error

    async def drain(self, *, cancel: bool = False) -> None:
        """Wait until nothing is in flight (errors stay with their handles).

        With ``cancel``, checkpoints in flight are abandoned instead: each removes its
        temporary directory and gives its memory back, and nothing of it becomes visible.
        """
        if cancel:
            for job in list(self._jobs):
                job.cancel()
        while self._jobs:
            await asyncio.wait(list(self._jobs))

    def _semaphore(self, chunks: int) -> asyncio.Semaphore:
        wanted = self.config.write_slots(chunks)
        if self._write_slots is None or wanted != self._write_slot_count:
            self._write_slots = asyncio.Semaphore(wanted)
            self._write_slot_count = wanted
        return self._write_slots

    # -- one checkpoint -------------------------------------------------------------------
    def store_of(self, job: Job) -> CheckpointStorage:
        store = job.store or self.store
        assert store is not None, "a job without a store on a pipeline without one"
        return store

    def start(self, job: Job) -> asyncio.Task[Location | None]:
        task = asyncio.get_running_loop().create_task(self._persist(job))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    async def _persist(self, job: Job) -> Location | None:
        if self.ranks is not None:
            return await self._persist_ranked(job, self.ranks)
        snapshot, metrics = job.snapshot, job.metrics
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        temporary: Location | None = None
        try:
            temporary = await self._begin(job)
            if self.changes is not None and job.store is None:  # not a path-level save
                job.tracking = self.changes.start(snapshot.step, snapshot.layout, job.names)
            checksums = await self._write_chunks(job, temporary)
            payload = self.manifests.encode(**self._manifest_fields(job, checksums))
            if job.previous_commit is not None:
                await asyncio.wait([job.previous_commit])
            commit_start = time.perf_counter()
            # A task of its own, so that cancelling this job cannot interrupt it.
            store = self.store_of(job)
            commit = loop.create_task(store.commit(temporary, snapshot.step, payload))
            try:
                final = await asyncio.shield(commit)
            except asyncio.CancelledError:
                # A commit under way is not interrupted: the rename may already have made
                # the checkpoint visible, so it completes and counts as done.
                final = await commit
            temporary = None
            if job.tracking is not None and self.changes is not None:
                self.changes.committed(job.tracking, Path(final))
                metrics.shared_bytes = job.tracking.shared_bytes
            metrics.commit_ms = (time.perf_counter() - commit_start) * 1e3
            metrics.persist_seconds = time.perf_counter() - started + metrics.capture_ms / 1e3
            await self._retain(final, self.store_of(job))
            return final
        finally:
            if temporary is not None:
                await loop.run_in_executor(self.writers, self.store_of(job).abort, temporary)
            await self._finish(job)

    async def _begin(self, job: Job) -> Location:
        snapshot = job.snapshot
        for chunk in snapshot.layout.chunks:
            if chunk.index not in snapshot.admission.host and chunk.index not in job.late_indices:
                job.gpu_chunks_left[chunk.device] = job.gpu_chunks_left.get(chunk.device, 0) + 1
        try:
            return await self.store_of(job).begin(snapshot.step, job.shared_directory)
        except BaseException:
            # No chunk task will run to give these back; let pending copies land first.
            for event in snapshot.host_ready.values():
                event.synchronize()
            await self.memory.give_back(snapshot.admission.host.values())
            raise

    async def _write_chunks(self, job: Job, temporary: Location) -> dict[tuple[int, int], int]:
        """Copy and write every chunk of ``job``; the checksum of each (tensor index, piece
        number) this process wrote."""
        snapshot, metrics = job.snapshot, job.metrics
        slots = self._semaphore(len(snapshot.layout.chunks))
        spans: list[ChunkSpan] = []
        results = await asyncio.gather(
            *(
                self._move_chunk(job, chunk, temporary, slots, spans)
                for chunk in snapshot.layout.chunks
            ),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        metrics.chunk_spans = sorted(spans, key=lambda span: span.index)
        metrics.copy_seconds = _span(
            [
                (s.copy_started, s.copy_finished)
                for s in spans
                if s.copy_started is not None and s.copy_finished is not None
            ]
        )
        metrics.write_seconds = _span([(s.write_started, s.write_finished) for s in spans])
        checksums: dict[tuple[int, int], int] = {}
        for chunk_sums in results:
            assert isinstance(chunk_sums, dict)
            checksums.update(chunk_sums)
        return checksums

    def _manifest_fields(self, job: Job, checksums: dict[tuple[int, int], int]) -> dict[str, Any]:
        """What the manifest of ``job``'s part says, given its checksums."""
        snapshot = job.snapshot
        return {
            "step": snapshot.step,
            "created": time.time(),
            "versions": job.versions,
            "names": job.names,
            "layout_tensors": snapshot.layout.tensors,
            "chunk_sizes": [c.nbytes for c in snapshot.layout.chunks],
            "file_names": [chunk_file_name(c.index, job.rank) for c in snapshot.layout.chunks],
            "checksums": checksums,
            "state": snapshot.skeleton,
            "layers": job.layers,
            "shared": None if job.tracking is None else job.tracking.shared_files(),
            "digests": None if job.tracking is None else job.tracking.digests(),
        }

    async def _retain(self, final: Location, store: CheckpointStorage) -> None:
        try:
            # On the loop's default executor, where the commit's aiofiles calls run too:
            # deleting old checkpoints must not take writer threads from the next one's
            # chunks, nor wait behind them (the handle resolves after retention).
            await asyncio.get_running_loop().run_in_executor(
                None, store.retain, self.config.keep_last
            )
        except asyncio.CancelledError:
            pass  # committed; the next commit's retention does this one's work
        except OSError as exc:
            # This checkpoint is committed and durable already; failing to delete older
            # ones must not report it as failed. What was renamed to trash stays there
            # for the next open(); the next commit's retention tries again.
            logger.warning("%s is committed, but retention failed: %s", final, exc)

    async def _finish(self, job: Job) -> None:
        job.ended = True
        if not job.committed.done():
            job.committed.set_result(None)
        # Late chunks delivered but never taken (the job failed first) give their buffer back.
        for future in job.late.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                buffer, ready = future.result()
                if ready is not None:
                    ready.synchronize()
                await self.memory.give_back([buffer])
        leftover_gpu = [d for d, n in job.gpu_chunks_left.items() if n > 0]
        await self.memory.give_back(gpu=leftover_gpu, finished=True)

    # -- many ranks -------------------------------------------------------------------------
    async def _persist_ranked(self, job: Job, ranks: RankGroup) -> Location | None:
        """Write this rank's part, then agree with the other ranks; rank 0 commits.

        Whatever happens to this rank's part (written, failed, cancelled), it still takes
        its turn in the vote, in commit order, so the ranks' collectives stay matched.
        """
        snapshot, metrics = job.snapshot, job.metrics
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        part = RankPart(ranks.rank, snapshot.step, FAILED)
        temporary: Location | None = None
        error: BaseException | None = None
        try:
            temporary = await self._begin(job)
            if self.changes is not None:
                job.tracking = self.changes.start(snapshot.step, snapshot.layout, job.names)
            manifest = manifest_from_layout(
                **self._manifest_fields(job, await self._write_chunks(job, temporary))
            )
            # This rank's files, durable on any filesystem before it votes to commit.
            await loop.run_in_executor(self.writers, self.store_of(job).make_durable, temporary)
            part = dataclasses.replace(part, status=OK, manifest=manifest, **job.share)
        except BaseException as exc:  # the vote below reports it; it is re-raised after
            error = exc
            part.error = f"{type(exc).__name__}: {exc}"
        try:
            final = await self._vote(job, part, temporary)
        finally:
            await self._finish(job)
        if error is not None:
            raise error
        if final is not None and job.tracking is not None and self.changes is not None:
            self.changes.committed(job.tracking, Path(final))
            metrics.shared_bytes = job.tracking.shared_bytes
        if final is not None:
            metrics.persist_seconds = time.perf_counter() - started + metrics.capture_ms / 1e3
            if ranks.is_zero:
                await self._retain(final, self.store_of(job))
        return final

    async def _vote(self, job: Job, part: RankPart, temporary: Location | None) -> Location | None:
        """Every rank's vote for one checkpoint; its directory once committed, None when a
        rank skipped it. The vote runs to its end even if this task is cancelled."""
        if job.previous_commit is not None:
            await asyncio.wait([job.previous_commit])
        loop = asyncio.get_running_loop()
        assert job.shared_directory is not None
        ballot = _Ballot(job.snapshot.step, job.shared_directory, job.kinds, job.versions)
        vote = loop.run_in_executor(self.coordinator, self._agree, ballot, part, temporary, loop)
        try:
            status, detail = await asyncio.shield(vote)
        except asyncio.CancelledError:
            status, detail = await vote
        if status == OK:
            name, job.metrics.commit_ms = detail
            return self.store_of(job).root / name
        if status == SKIPPED:
            job.metrics.skipped = True
            return None
        raise CheckpointError(f"checkpoint of step {job.snapshot.step} was not committed: {detail}")

    def _agree(
        self,
        ballot: _Ballot,
        part: RankPart,
        temporary: Location | None,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[str, Any]:
        """On the coordinator thread: gather the votes; rank 0 commits (on ``loop``) or
        gives up, and tells everyone (status, detail)."""
        assert self.ranks is not None
        parts: list[RankPart] = self.ranks.all_gather(part)
        outcome = self._decide(ballot, parts, temporary, loop) if self.ranks.is_zero else None
        decided = self.ranks.broadcast(outcome)
        return decided  # type: ignore[no-any-return]

    def _decide(
        self,
        ballot: _Ballot,
        parts: list[RankPart],
        temporary: Location | None,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[str, Any]:
        # Ranks save through the checkpointer's own store (path-level saves have no ranks).
        store = self.store
        assert store is not None
        failed = [f"rank {p.rank}: {p.error}" for p in parts if p.status == FAILED]
        skipped = [p.rank for p in parts if p.status == SKIPPED]
        outcome: tuple[str, Any]
        if failed:
            outcome = (FAILED, "; ".join(failed))
        elif skipped:
            outcome = (SKIPPED, None)
        else:
            try:
                manifest = merge_parts(
                    parts, ballot.kinds, step=ballot.step, created=time.time(),
                    versions=ballot.versions,
                )  # fmt: skip
                start = time.perf_counter()
                assert temporary is not None
                # The commit's file operations are awaited on the loop, which is free:
                # its vote task only waits for this thread.
                final = asyncio.run_coroutine_threadsafe(
                    store.commit(temporary, ballot.step, manifest.to_json()), loop
                ).result()
                return OK, (final.name, (time.perf_counter() - start) * 1e3)
            except Exception as exc:  # reported to every rank
                outcome = (FAILED, f"rank 0 could not commit: {type(exc).__name__}: {exc}")
        # Every rank has stopped writing (each voted after its writes): rank 0 removes the
        # shared temporary, whoever created it.
        store.abort(temporary or store.shared_temporary(ballot.step, ballot.shared_directory))
        return outcome

    async def vote_skipped(self, step: int, shared_directory: str, kinds: dict[str, str]) -> None:
        """Take this rank's turn in the vote for a checkpoint it skipped (on the loop)."""
        loop = asyncio.get_running_loop()
        with self._chain_lock:  # admissions join the same chain from the caller's thread
            previous, committed = self._last_commit, loop.create_future()
            self._last_commit = committed

        async def vote() -> None:
            try:
                if previous is not None:
                    await asyncio.wait([previous])
                assert self.ranks is not None
                part = RankPart(self.ranks.rank, step, SKIPPED)
                ballot = _Ballot(step, shared_directory, kinds, {})
                await loop.run_in_executor(self.coordinator, self._agree, ballot, part, None, loop)
            finally:
                committed.set_result(None)

        task = loop.create_task(vote())
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _move_chunk(
        self,
        job: Job,
        chunk: Chunk,
        directory: Location,
        slots: asyncio.Semaphore,
        spans: list[ChunkSpan],
    ) -> dict[tuple[int, int], int]:
        snapshot = job.snapshot
        copy_start: float | None = None
        copy_end: float | None = None
        buffer = snapshot.admission.host.get(chunk.index)
        buffers_to_return: list[HostBuffer] = []
        try:
            if chunk.index in job.late_indices:
                buffer, late_ready = await job.late_piece(chunk.index)
                del job.late[chunk.index]  # taken: this task gives the buffer back
                buffers_to_return.append(buffer)
                if late_ready is not None:
                    await wait_cuda_event(late_ready, self.event_waiter)
            elif buffer is not None:
                buffers_to_return.append(buffer)
                ready = snapshot.host_ready.get(chunk.device)
                if ready is not None:
                    await wait_cuda_event(ready, self.event_waiter)
            else:
                buffer = await self.memory.take_host_buffer(chunk.nbytes)
                buffers_to_return.append(buffer)
                copy_start = time.perf_counter()
                event = job.capturer.copy_chunk_to_host(
                    chunk, buffer, snapshot.gpu_ready[chunk.device]
                )
                try:
                    await wait_cuda_event(event, self.event_waiter)
                finally:
                    event.synchronize()  # never hand back a buffer a copy still writes into
                copy_end = time.perf_counter()
                job.gpu_chunks_left[chunk.device] -= 1
                if job.gpu_chunks_left[chunk.device] == 0:
                    await self.memory.give_back(gpu=[chunk.device])
            ranges, keys = snapshot.layout.chunk_pieces[chunk.index]
            write_queued = time.perf_counter()
            write_start = write_end = write_queued

            def write() -> list[int]:
                # Timed on the writer thread: its wait in the queue is not write time, nor
                # is the loop's wake-up after it.
                nonlocal write_start, write_end
                write_start = time.perf_counter()
                if job.tracking is not None:
                    sums = job.tracking.write_chunk(
                        Path(directory),  # tracked only on a backend that shares: local
                        chunk.index,
                        chunk_file_name(chunk.index, job.rank),
                        buffer.view(chunk.nbytes),
                        ranges,
                        keys,
                        buffer.view(buffer.data.numel()),
                    )
                else:
                    sums = self.store_of(job).write_chunk(
                        directory,
                        chunk_file_name(chunk.index, job.rank),
                        buffer.view(chunk.nbytes),
                        ranges,
                        buffer.view(buffer.data.numel()),
                    )
                write_end = time.perf_counter()
                return sums

            async with slots:
                sums = await asyncio.get_running_loop().run_in_executor(self.writers, write)
            origin = job.origin
            spans.append(
                ChunkSpan(
                    index=chunk.index,
                    nbytes=chunk.nbytes,
                    copy_started=None if copy_start is None else copy_start - origin,
                    copy_finished=None if copy_end is None else copy_end - origin,
                    write_queued=write_queued - origin,
                    write_started=write_start - origin,
                    write_finished=write_end - origin,
                )
            )
            return dict(zip(keys, sums, strict=True))
        finally:
            await self.memory.give_back(buffers_to_return)

    def close(self) -> None:
        self.writers.shutdown(wait=True)
        self.event_waiter.shutdown(wait=True)
        self.coordinator.shutdown(wait=True)


def _span(spans: list[tuple[float, float]]) -> float:
    if not spans:
        return 0.0
    return max(end for _, end in spans) - min(start for start, _ in spans)
