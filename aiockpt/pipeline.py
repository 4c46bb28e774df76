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
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config
from .fileio import write_pieces
from .layout import Chunk
from .manifest import manifest_from_layout
from .memory import Admission, HostBuffer, StagingMemory
from .metrics import CheckpointMetrics
from .staging import Capturer, Snapshot
from .store import CheckpointStore

__all__ = ["Admitted", "Pipeline"]

logger = logging.getLogger("aiockpt")


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
class _Job:
    snapshot: Snapshot
    capturer: Capturer
    metrics: CheckpointMetrics
    names: list[str]
    layers: list[str | None] | None
    versions: dict[str, str]
    previous_commit: asyncio.Future[None] | None
    committed: asyncio.Future[None]
    gpu_chunks_left: dict[torch.device, int] = field(default_factory=dict)


class Pipeline:
    """Admits, copies, writes and commits checkpoints; lives on one event loop."""

    def __init__(self, config: Config, store: CheckpointStore, memory: StagingMemory) -> None:
        self.config = config
        self.store = store
        self.memory = memory
        self.writers = ThreadPoolExecutor(config.num_threads, thread_name_prefix="aiockpt-write")
        # Copies on one stream finish in order, so one waiting thread serves them all.
        self.event_waiter = ThreadPoolExecutor(1, thread_name_prefix="aiockpt-cuda-event")
        self._write_slots: asyncio.Semaphore | None = None
        self._write_slot_count = 0
        self._last_commit: asyncio.Future[None] | None = None
        self._chain_lock = threading.Lock()
        self._jobs: set[asyncio.Task[Path]] = set()

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
    def start(self, job: _Job) -> asyncio.Task[Path]:
        task = asyncio.get_running_loop().create_task(self._persist(job))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    async def _persist(self, job: _Job) -> Path:
        snapshot, metrics = job.snapshot, job.metrics
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        temporary: Path | None = None
        for chunk in snapshot.layout.chunks:
            if chunk.index not in snapshot.admission.host:
                job.gpu_chunks_left[chunk.device] = job.gpu_chunks_left.get(chunk.device, 0) + 1
        try:
            try:
                temporary = await loop.run_in_executor(
                    self.writers, self.store.begin, snapshot.step
                )
            except BaseException:
                # No chunk task will run to give these back; let pending copies land first.
                for event in snapshot.host_ready.values():
                    event.synchronize()
                await self.memory.give_back(snapshot.admission.host.values())
                raise
            slots = self._semaphore(len(snapshot.layout.chunks))
            copy_spans: list[tuple[float, float]] = []
            write_spans: list[tuple[float, float]] = []
            results = await asyncio.gather(
                *(
                    self._move_chunk(job, chunk, temporary, slots, copy_spans, write_spans)
                    for chunk in snapshot.layout.chunks
                ),
                return_exceptions=True,
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                raise failures[0]
            metrics.copy_seconds = _span(copy_spans)
            metrics.write_seconds = _span(write_spans)
            checksums: dict[tuple[int, int], int] = {}
            for chunk_sums in results:
                assert isinstance(chunk_sums, dict)
                checksums.update(chunk_sums)
            manifest = manifest_from_layout(
                step=snapshot.step,
                created=time.time(),
                versions=job.versions,
                names=job.names,
                layout_tensors=snapshot.layout.tensors,
                chunk_sizes=[c.nbytes for c in snapshot.layout.chunks],
                file_names=[c.file_name for c in snapshot.layout.chunks],
                checksums=checksums,
                state=snapshot.skeleton,
                layers=job.layers,
            )
            payload = manifest.to_json()
            if job.previous_commit is not None:
                await asyncio.wait([job.previous_commit])
            commit_start = time.perf_counter()
            commit = loop.run_in_executor(
                self.writers, self.store.commit, temporary, snapshot.step, payload
            )
            try:
                final = await asyncio.shield(commit)
            except asyncio.CancelledError:
                # A commit under way is not interrupted: the rename may already have made
                # the checkpoint visible, so it completes and counts as done.
                final = await commit
            temporary = None
            metrics.commit_ms = (time.perf_counter() - commit_start) * 1e3
            metrics.persist_seconds = time.perf_counter() - started + metrics.capture_ms / 1e3
            try:
                await loop.run_in_executor(self.writers, self.store.retain, self.config.keep_last)
            except asyncio.CancelledError:
                pass  # committed; the next commit's retention does this one's work
            except OSError as exc:
                # This checkpoint is committed and durable already; failing to delete older
                # ones must not report it as failed. What was renamed to trash stays there
                # for the next open(); the next commit's retention tries again.
                logger.warning("aiockpt: %s is committed, but retention failed: %s", final, exc)
            return final
        finally:
            if temporary is not None:
                await loop.run_in_executor(self.writers, self.store.abort, temporary)
            if not job.committed.done():
                job.committed.set_result(None)
            leftover_gpu = [d for d, n in job.gpu_chunks_left.items() if n > 0]
            await self.memory.give_back(gpu=leftover_gpu, finished=True)

    async def _move_chunk(
        self,
        job: _Job,
        chunk: Chunk,
        directory: Path,
        slots: asyncio.Semaphore,
        copy_spans: list[tuple[float, float]],
        write_spans: list[tuple[float, float]],
    ) -> dict[tuple[int, int], int]:
        snapshot = job.snapshot
        buffer = snapshot.admission.host.get(chunk.index)
        buffers_to_return: list[HostBuffer] = []
        try:
            if buffer is not None:
                buffers_to_return.append(buffer)
                ready = snapshot.host_ready.get(chunk.device)
                if ready is not None:
                    await wait_cuda_event(ready, self.event_waiter)
            else:
                buffer = await self.memory.take_host_buffer()
                buffers_to_return.append(buffer)
                copy_start = time.perf_counter()
                event = job.capturer.copy_chunk_to_host(
                    chunk, buffer, snapshot.gpu_ready[chunk.device]
                )
                try:
                    await wait_cuda_event(event, self.event_waiter)
                finally:
                    event.synchronize()  # never hand back a buffer a copy still writes into
                copy_spans.append((copy_start, time.perf_counter()))
                job.gpu_chunks_left[chunk.device] -= 1
                if job.gpu_chunks_left[chunk.device] == 0:
                    await self.memory.give_back(gpu=[chunk.device])
            ranges, keys = snapshot.layout.chunk_pieces[chunk.index]
            async with slots:
                write_start = time.perf_counter()
                sums = await asyncio.get_running_loop().run_in_executor(
                    self.writers,
                    lambda: write_pieces(
                        str(directory / chunk.file_name),
                        buffer.view(chunk.nbytes),
                        ranges,
                        durable=self.config.durable,
                        room=buffer.view(buffer.data.numel()),
                    ),
                )
                write_spans.append((write_start, time.perf_counter()))
            return dict(zip(keys, sums, strict=True))
        finally:
            await self.memory.give_back(buffers_to_return)

    def close(self) -> None:
        self.writers.shutdown(wait=True)
        self.event_waiter.shutdown(wait=True)


def _span(spans: list[tuple[float, float]]) -> float:
    if not spans:
        return 0.0
    return max(end for _, end in spans) - min(start for start, _ in spans)
