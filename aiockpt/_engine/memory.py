"""Staging memory, allocated once and reused, and the admission of checkpoints into it.

Pinning host memory is slow (seconds for a few GiB), so the host pool is a fixed set of
buffers that every checkpoint reuses. Each buffer is sized to a chunk (chunks are full, so
all but the last of each device have the same size), which keeps the pool at
``pinned_ratio`` x the state plus page rounding. The buffers are mapped (and pinned when
GPU tensors are saved) by a background thread (``hostpool.PoolFiller``), started as soon
as the state's size is known; whoever needs a buffer before it is ready waits for it on
the loop, exactly as for a buffer in use. Each GPU device gets one staging buffer the
size of its part of the state.

Admission takes everything a capture needs at once (an in-flight place, the GPU staging
buffers, host buffers for the chunks captured straight to host), so no checkpoint holds
one resource while it waits for another at admission. Copy tasks later take host buffers
one at a time, in the order they asked; they only wait on writes that are already running
or on buffers being mapped, so the pool cannot deadlock as long as one buffer fits the
largest chunk. A pool too small for a checkpoint's host-captured chunks makes its capture
take them one at a time instead (``Capturer.in_pieces``), while the first are written.

Admission is on the training thread's critical path, so when everything is free and no one
waits ahead, it happens right there (``admit_now``), without a round trip to the event
loop. Everything else, waiting included, happens on the loop, which alone gives back; a
lock makes each check-and-take atomic between the two threads (and the filler thread).
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import threading
from collections import Counter
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from .hostpool import MappedMemory, PoolFiller, map_host_memory, page_rounded

__all__ = ["Admission", "HostBuffer", "StagingMemory", "byte_view", "covers", "pool_sizes"]


def byte_view(tensor: torch.Tensor, nbytes: int | None = None) -> memoryview:
    """A zero-copy memoryview of a contiguous CPU tensor's first ``nbytes`` bytes.

    The view does not keep ``tensor`` alive: its owner must. ctypes gives the buffer
    protocol without going through numpy, so os.pwrite and readinto work on it directly
    and release the GIL while the kernel copies.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    size = tensor.numel() * tensor.element_size() if nbytes is None else nbytes
    if size == 0:
        return memoryview(b"")
    array = (ctypes.c_char * size).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def pool_sizes(chunk_sizes: list[int], pinned_ratio: float) -> list[int]:
    """The buffer sizes of a pool of ``pinned_ratio`` x a state cut into these chunks.

    A whole set of buffers, one per chunk, for each whole unit of the ratio; for what is
    left of it, that fraction of the chunks' count rounded down (the pool stays within
    ``pinned_ratio`` x the state), the largest first. Never empty for a state with chunks:
    one buffer fits the largest chunk, so that every chunk can pass through the pool one
    after the other.
    """
    whole, fraction = divmod(pinned_ratio, 1)
    sizes = list(chunk_sizes) * int(whole)
    extra = math.floor(round(fraction * len(chunk_sizes), 6))
    sizes += sorted(chunk_sizes, reverse=True)[:extra]
    if not sizes and chunk_sizes:
        sizes = [max(chunk_sizes)]
    return sizes


def covers(buffer_sizes: list[int], chunk_sizes: list[int]) -> bool:
    """Whether buffers of these sizes hold all those chunks at once."""
    buffers = sorted(buffer_sizes, reverse=True)
    chunks = sorted(chunk_sizes, reverse=True)
    return len(chunks) <= len(buffers) and all(
        b >= c for b, c in zip(buffers, chunks, strict=False)
    )


# A pool this small is mapped (and pinned) on the calling thread: a few milliseconds.
MAP_NOW_BYTES = 16 * 2**20


@dataclass(eq=False)
class HostBuffer:
    """One buffer of the pool, sized to a chunk (page-rounded)."""

    ident: int
    data: torch.Tensor  # uint8, 1-D
    mapped: MappedMemory | None = None  # None: memory torch owns

    @property
    def capacity(self) -> int:
        return self.data.numel()

    def view(self, nbytes: int) -> memoryview:
        return byte_view(self.data, nbytes)


@dataclass(eq=False)
class Admission:
    """What one admitted checkpoint holds until its pipeline gives it back."""

    host: dict[int, HostBuffer] = field(default_factory=dict)  # chunk index -> buffer
    gpu_devices: set[torch.device] = field(default_factory=set)


class StagingMemory:
    """The host pool, the GPU staging buffers, and who may use them."""

    def __init__(self, *, max_async: int) -> None:
        self.max_async = max_async
        self.pinned = False
        self._buffers: list[HostBuffer] = []
        self._free: list[HostBuffer] = []
        # Sizes asked of the filler and not mapped yet (the one it maps now included).
        self._pending: Counter[int] = Counter()
        self._fill_error: BaseException | None = None
        self._filler = PoolFiller(self._mapped, self._fill_failed)
        self._next_ident = 0
        # Bytes each chunk of the current layout needs from a buffer (0: any buffer fits).
        self._chunk_bytes: dict[int, int] = {}
        self._gpu: dict[torch.device, torch.Tensor] = {}
        self._gpu_busy: set[torch.device] = set()
        self._in_flight = 0
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notifiers: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        # Waiting on the loop: an admission on the caller's thread must not overtake them.
        self._queued_admissions = 0
        # Copy tasks waiting for a buffer, served in the order they asked.
        self._buffer_queue: list[object] = []

    # -- sizing (called when the layout changes, with nothing in flight) --------------
    @property
    def host_nbytes(self) -> int:
        """Bytes of the pool once every buffer asked for is mapped."""
        with self._lock:
            return self._ready_nbytes() + sum(size * n for size, n in self._pending.items())

    @property
    def host_ready_nbytes(self) -> int:
        """Bytes of the pool mapped (and pinned) so far."""
        with self._lock:
            return self._ready_nbytes()

    def _ready_nbytes(self) -> int:
        return sum(b.capacity for b in self._buffers)

    def plan_host(
        self,
        sizes: Iterable[int],
        *,
        pin: bool,
        device: torch.device | None = None,
        chunk_bytes: dict[int, int] | None = None,
    ) -> None:
        """Make the pool these buffer sizes, mapping what is missing in the background.

        Buffers of a wanted size are kept, the rest released; with nothing in flight (only
        lent buffers may be out: one not wanted is released when it comes back).
        ``device``: where the state lives, whose context pins the memory.
        ``chunk_bytes``: what each chunk needs.
        """
        wanted = Counter(page_rounded(size) for size in sizes)
        with self._lock:
            if pin != self.pinned:
                self._drop_free_buffers()
                self.pinned = pin
            keep: list[HostBuffer] = []
            room = Counter(wanted)
            for buffer in self._buffers:
                if room[buffer.capacity] > 0:
                    room[buffer.capacity] -= 1
                    keep.append(buffer)
                elif buffer in self._free:
                    self._free.remove(buffer)
                    _release(buffer)
                # else lent out (to a restore's reads): released when it comes back
            self._buffers = keep
            self._pending = +room
            self._fill_error = None
            self._chunk_bytes = dict(chunk_bytes or {})
            queue = sorted(self._pending.elements(), reverse=True)
        if sum(queue) <= MAP_NOW_BYTES:
            # A small pool is mapped faster than a thread could be asked to.
            self._filler.replace_queue([], pin=pin, device=device)
            for size in queue:
                try:
                    mapped = map_host_memory(size, pin=pin)
                except OSError as exc:  # said where a buffer is waited for
                    self._fill_failed(exc)
                    return
                self._mapped(size, mapped)
            return
        # Largest first: the first buffer ready fits any chunk.
        self._filler.replace_queue(queue, pin=pin, device=device)

    def resize_host(self, buffer_bytes: int, count: int, *, pin: bool) -> None:
        """``count`` buffers of ``buffer_bytes``, mapped now on the calling thread."""
        self.plan_host([], pin=pin)
        size = page_rounded(buffer_bytes)
        for _ in range(count):
            self._mapped(size, map_host_memory(size, pin=pin), expected=False)

    def _mapped(self, size: int, memory: MappedMemory, *, expected: bool = True) -> None:
        # On the filler thread (or resize_host's): a buffer is ready for use.
        with self._lock:
            if expected:
                if self._pending[size] <= 0:  # the plan changed while it was mapped
                    memory.release()
                    return
                self._pending[size] -= 1
                self._pending = +self._pending
            buffer = HostBuffer(self._next_ident, memory.data, memory)
            self._next_ident += 1
            self._buffers.append(buffer)
            self._free.append(buffer)
        self._notify_from_any_thread()

    def _fill_failed(self, exc: BaseException) -> None:
        with self._lock:
            self._fill_error = exc
            self._pending.clear()
        self._notify_from_any_thread()

    def _notify_from_any_thread(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with suppress(RuntimeError):  # the loop closed meanwhile: no one waits on it
            loop.call_soon_threadsafe(self._start_notify)

    def _start_notify(self) -> None:
        task = asyncio.get_running_loop().create_task(self._notify())
        self._notifiers.add(task)
        task.add_done_callback(self._notifiers.discard)

    async def _notify(self) -> None:
        changed = self._condition()
        async with changed:
            changed.notify_all()

    def _check_fill(self) -> None:
        # The caller holds the lock. Nothing more will be mapped: say why, or waiting for
        # a buffer that will never come would hang.
        if self._fill_error is not None and not self._pending:
            exc = self._fill_error
            raise CheckpointError(
                f"could not map host memory for the staging pool ({exc}); free host memory "
                "or lower pinned_ratio (the pool holds pinned_ratio x the state's bytes)"
            ) from exc

    def _drop_free_buffers(self) -> None:
        # The caller holds the lock.
        if len(self._free) != len(self._buffers):
            raise RuntimeError("cannot reshape the host pool while buffers are in use")
        for buffer in self._buffers:
            _release(buffer)
        self._buffers.clear()
        self._free.clear()

    def gpu_buffer(self, device: torch.device, nbytes: int) -> torch.Tensor:
        """The staging buffer of ``device``, (re)allocated to hold at least ``nbytes``."""
        buffer = self._gpu.get(device)
        if buffer is None or buffer.numel() < nbytes:
            self._gpu.pop(device, None)
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._gpu[device] = buffer
        return buffer

    def drop_gpu_buffers(self) -> None:
        self._gpu.clear()

    def release(self) -> None:
        """Drop every buffer (at close, with nothing in flight)."""
        self._filler.close()
        with self._lock:
            for buffer in self._buffers:
                _release(buffer)
            self._buffers.clear()
            self._free.clear()
            self._pending.clear()
            self._gpu.clear()

    # -- admission and release ---------------------------------------------------------
    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
            self._loop = asyncio.get_running_loop()
        return self._changed

    def _need(self, chunk: int) -> int:
        return self._chunk_bytes.get(chunk, 0)

    def _pick(self, nbytes: int, among: list[HostBuffer]) -> HostBuffer | None:
        # The smallest free buffer that fits: a small last chunk leaves the full-size
        # buffers to full chunks.
        fitting = [b for b in among if b.capacity >= nbytes]
        return min(fitting, key=lambda b: b.capacity) if fitting else None

    def _assign(self, host_chunks: list[int]) -> dict[int, HostBuffer] | None:
        # The caller holds the lock. Largest needs first, each the smallest that fits.
        free = list(self._free)
        taken: dict[int, HostBuffer] = {}
        for chunk in sorted(host_chunks, key=self._need, reverse=True):
            buffer = self._pick(self._need(chunk), free)
            if buffer is None:
                return None
            free.remove(buffer)
            taken[chunk] = buffer
        return taken

    def _fits(self, gpu: set[torch.device], host_chunks: list[int]) -> bool:
        return (
            self._in_flight < self.max_async
            and not (self._gpu_busy & gpu)
            and self._assign(host_chunks) is not None
        )

    def _take(self, gpu: set[torch.device], host_chunks: list[int]) -> Admission | None:
        # The caller holds the lock.
        if self._in_flight >= self.max_async or self._gpu_busy & gpu:
            return None
        host = self._assign(host_chunks)
        if host is None:
            self._check_fill()
            return None
        for buffer in host.values():
            self._free.remove(buffer)
        self._in_flight += 1
        self._gpu_busy |= gpu
        return Admission(host=host, gpu_devices=set(gpu))

    def would_admit(self, gpu: set[torch.device], host_chunks: int | list[int]) -> bool:
        """Whether an admission would succeed right now (a cheap pre-check for "skip")."""
        chunks = list(range(host_chunks)) if isinstance(host_chunks, int) else host_chunks
        with self._lock:
            return not self._queued_admissions and self._fits(gpu, chunks)

    def admit_now(self, gpu: set[torch.device], host_chunks: list[int]) -> Admission | None:
        """Admit on the calling thread (any thread) if everything is free and no one waits
        ahead for what this takes; None means: go through ``admit`` on the loop."""
        with self._lock:
            if self._queued_admissions or (host_chunks and self._buffer_queue):
                return None
            if self._fill_error is not None:
                return None  # admit() raises it
            return self._take(gpu, host_chunks)

    async def admit(
        self, gpu: set[torch.device], host_chunks: list[int], *, block: bool
    ) -> Admission | None:
        """Take an in-flight place and the staging a capture needs; None when skipped.

        Raises:
            CheckpointError: the host pool could not be mapped, so it never will fit.
        """
        changed = self._condition()
        async with changed:
            with self._lock:
                # Behind admissions already waiting (they are woken first, in order).
                admission = None if self._queued_admissions else self._take(gpu, host_chunks)
                if admission is not None or not block:
                    return admission
                self._queued_admissions += 1
            try:
                while admission is None:
                    await changed.wait()
                    with self._lock:
                        admission = self._take(gpu, host_chunks)
                return admission
            finally:
                with self._lock:
                    self._queued_admissions -= 1
                # Those queued behind may fit in what is left, or may have arrived after
                # the last give-back woke everyone: let them look again.
                changed.notify_all()

    def take_host_buffer_now(self, nbytes: int = 0) -> HostBuffer | None:
        """A free buffer of at least ``nbytes`` if one is free and no one waits for one."""
        with self._lock:
            if self._buffer_queue:
                return None
            buffer = self._pick(nbytes, self._free)
            if buffer is not None:
                self._free.remove(buffer)
            return buffer

    async def take_host_buffer(self, nbytes: int = 0) -> HostBuffer:
        """A buffer of at least ``nbytes``, waiting (in the order asked) until one is free.

        Raises:
            CheckpointError: the host pool could not be mapped, so none will come.
        """
        changed = self._condition()
        ticket = object()
        async with changed:
            with self._lock:
                self._buffer_queue.append(ticket)
            try:
                while True:
                    with self._lock:
                        if self._buffer_queue[0] is ticket:
                            buffer = self._pick(nbytes, self._free)
                            if buffer is not None:
                                self._free.remove(buffer)
                                return buffer
                            self._check_fill()
                    await changed.wait()
            finally:
                with self._lock:
                    self._buffer_queue.remove(ticket)
                changed.notify_all()  # the next in line may fit in what is left

    def lend_pinned(self) -> list[HostBuffer]:
        """Take every free pinned buffer for another use (restore's reads); on the loop,
        with give_back() to return them. Admissions wait for them meanwhile."""
        with self._lock:
            if not self.pinned:
                return []
            lent = [b for b in self._free if b.mapped is not None and b.mapped.pinned]
            self._free = [b for b in self._free if b not in lent]
            return lent

    async def give_back(
        self,
        buffers: Iterable[HostBuffer] = (),
        gpu: Iterable[torch.device] = (),
        *,
        finished: bool = False,
    ) -> None:
        changed = self._condition()
        async with changed:
            with self._lock:
                for buffer in buffers:
                    if buffer in self._buffers:
                        self._free.append(buffer)
                    else:  # released by a new plan while it was out
                        _release(buffer)
                self._gpu_busy.difference_update(gpu)
                if finished:
                    self._in_flight -= 1
            changed.notify_all()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- read-only figures, for the published staging summary ---------------------------
    @property
    def host_buffer_count(self) -> int:
        """Buffers of the pool, mapped or asked for."""
        with self._lock:
            return len(self._buffers) + sum(self._pending.values())

    @property
    def free_host_buffer_count(self) -> int:
        return len(self._free)

    def gpu_nbytes(self) -> dict[torch.device, int]:
        """The size of each device's GPU staging buffer (devices staged on the host: none)."""
        return {device: buffer.numel() for device, buffer in self._gpu.items()}


def _release(buffer: HostBuffer) -> None:
    if buffer.mapped is not None:
        buffer.mapped.release()
