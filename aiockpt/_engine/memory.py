"""Staging memory, allocated once and reused, and the admission of checkpoints into it.

Pinning host memory is slow (seconds for a few GiB), so the host pool is a fixed set of
chunk-sized buffers that every checkpoint reuses, pinned only when GPU tensors are saved.
Each GPU device gets one staging buffer the size of its part of the state.

Admission takes everything a capture needs at once (an in-flight place, the GPU staging
buffers, host buffers for the chunks captured straight to host), so no checkpoint holds
one resource while it waits for another at admission. Copy tasks later take host buffers
one at a time; they only wait on writes that are already running, so the pool cannot
deadlock as long as it has room for one checkpoint's host-captured chunks plus one more.

Admission is on the training thread's critical path, so when everything is free and no one
waits ahead, it happens right there (``admit_now``), without a round trip to the event
loop. Everything else, waiting included, happens on the loop, which alone gives back; a
lock makes each check-and-take atomic between the two threads.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

__all__ = ["Admission", "HostBuffer", "StagingMemory", "byte_view"]


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


@dataclass(eq=False)
class HostBuffer:
    """One chunk-sized host buffer of the pool."""

    ident: int
    data: torch.Tensor  # uint8, 1-D

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
        self.buffer_bytes = 0
        self.pinned = False
        self._buffers: list[HostBuffer] = []
        self._free: list[HostBuffer] = []
        self._gpu: dict[torch.device, torch.Tensor] = {}
        self._gpu_busy: set[torch.device] = set()
        self._in_flight = 0
        self._changed: asyncio.Condition | None = None
        self._lock = threading.Lock()
        # Waiting on the loop: an admission on the caller's thread must not overtake them.
        self._queued_admissions = 0
        self._buffer_waiters = 0

    # -- sizing (called when the layout changes, with nothing in flight) --------------
    @property
    def host_nbytes(self) -> int:
        return len(self._buffers) * self.buffer_bytes

    def resize_host(self, buffer_bytes: int, count: int, *, pin: bool) -> None:
        """Grow the pool to ``count`` buffers of ``buffer_bytes`` (never shrinks a fit pool)."""
        with self._lock:
            self._resize_host(buffer_bytes, count, pin=pin)

    def _resize_host(self, buffer_bytes: int, count: int, *, pin: bool) -> None:
        if buffer_bytes != self.buffer_bytes or pin != self.pinned:
            if len(self._free) != len(self._buffers):
                raise RuntimeError("cannot reshape the host pool while buffers are in use")
            self._buffers.clear()
            self._free.clear()
            self.buffer_bytes = buffer_bytes
            self.pinned = pin
        while len(self._buffers) < count:
            data = torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=pin)
            buffer = HostBuffer(len(self._buffers), data)
            self._buffers.append(buffer)
            self._free.append(buffer)

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
        with self._lock:
            self._buffers.clear()
            self._free.clear()
            self._gpu.clear()

    # -- admission and release ---------------------------------------------------------
    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def _fits(self, gpu: set[torch.device], host_chunks: int) -> bool:
        return (
            self._in_flight < self.max_async
            and not (self._gpu_busy & gpu)
            and len(self._free) >= host_chunks
        )

    def _take(self, gpu: set[torch.device], host_chunks: list[int]) -> Admission | None:
        # The caller holds the lock.
        if not self._fits(gpu, len(host_chunks)):
            return None
        self._in_flight += 1
        self._gpu_busy |= gpu
        return Admission(
            host={chunk: self._free.pop() for chunk in host_chunks}, gpu_devices=set(gpu)
        )

    def would_admit(self, gpu: set[torch.device], host_chunks: int) -> bool:
        """Whether an admission would succeed right now (a cheap pre-check for "skip")."""
        with self._lock:
            return not self._queued_admissions and self._fits(gpu, host_chunks)

    def admit_now(self, gpu: set[torch.device], host_chunks: list[int]) -> Admission | None:
        """Admit on the calling thread (any thread) if everything is free and no one waits
        ahead for what this takes; None means: go through ``admit`` on the loop."""
        with self._lock:
            if self._queued_admissions or (host_chunks and self._buffer_waiters):
                return None
            return self._take(gpu, host_chunks)

    async def admit(
        self, gpu: set[torch.device], host_chunks: list[int], *, block: bool
    ) -> Admission | None:
        """Take an in-flight place and the staging a capture needs; None when skipped."""
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

    async def take_host_buffer(self) -> HostBuffer:
        changed = self._condition()
        async with changed:
            with self._lock:
                if self._free:
                    return self._free.pop()
                self._buffer_waiters += 1
            try:
                while True:
                    await changed.wait()
                    with self._lock:
                        if self._free:
                            return self._free.pop()
            finally:
                with self._lock:
                    self._buffer_waiters -= 1

    def lend_pinned(self) -> list[HostBuffer]:
        """Take every free pinned buffer for another use (restore's reads); on the loop,
        with give_back() to return them. Admissions wait for them meanwhile."""
        if not self.pinned:
            return []
        lent, self._free = self._free, []
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
                self._free.extend(buffers)
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
        return len(self._buffers)

    @property
    def free_host_buffer_count(self) -> int:
        return len(self._free)

    def gpu_nbytes(self) -> dict[torch.device, int]:
        """The size of each device's GPU staging buffer (devices staged on the host: none)."""
        return {device: buffer.numel() for device, buffer in self._gpu.items()}
