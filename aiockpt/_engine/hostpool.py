"""Host memory for the staging pool, mapped and page-locked off the training thread.

Pinning through ``torch.empty(pin_memory=True)`` goes through the caching host allocator,
which takes a global lock while the driver pins: on an H200, a thread pinning 4 GiB that way
held a training step for the whole 2.7 s it took. Here each buffer is an anonymous mapping
of its own, advised to use huge pages where the kernel gives them, its pages faulted in by
the kernel and then registered with the driver (``cudaHostRegister``), which pins it without
that lock. One background thread does this one buffer at a time, pausing between buffers so
that the training thread's own driver calls get through. Measured on an H200 host (torch
2.11, huge pages granted): mapping and faulting in 256 MiB took ~60 ms and registering it
~12 ms, both with the GIL released, so a 4.25 GB pool is ready about 1.2 s after the
Checkpointer is made; copies from the GPU into it ran at 46 GB/s (55 GB/s into memory
torch pinned, 5.4 GB/s pageable).

A buffer is exactly one registration, so no copy ever spans two of them (a range spanning
two registrations is not promised to be treated as page-locked). Without GPU state the
buffers are mapped and faulted in the same way and not registered: the pool fills in the
background and is waited for alike.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

import torch

__all__ = ["MappedMemory", "PAGE_BYTES", "PoolFiller", "map_host_memory", "page_rounded"]

logger = logging.getLogger(__name__)

PAGE_BYTES = mmap.PAGESIZE
# cudaHostRegisterPortable: page-locked for every device's context, not only the current one.
_REGISTER_PORTABLE = 1
# Between two buffers the filler sleeps this long: the training thread's driver calls (a
# launch, a synchronize) that queued behind a registration get through.
_PAUSE_SECONDS = 0.002


def page_rounded(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages (at least one)."""
    return max(PAGE_BYTES, -(-nbytes // PAGE_BYTES) * PAGE_BYTES)


@dataclass(eq=False)
class MappedMemory:
    """One mapping and whether the driver holds it page-locked."""

    data: torch.Tensor  # uint8, 1-D, the whole mapping
    pinned: bool
    _mapping: mmap.mmap

    def release(self) -> None:
        """Unregister the memory; the mapping goes when the last view of it does."""
        if self.pinned:
            self.pinned = False
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())


def map_host_memory(nbytes: int, *, pin: bool) -> MappedMemory:
    """Map ``nbytes`` (rounded up to pages), fault it in and, with ``pin``, page-lock it.

    A registration the driver refuses leaves the memory pageable (copies into it are slower
    but correct): the caller learns it from ``pinned``.

    Raises:
        OSError: the kernel refused the mapping (not enough memory).
    """
    size = page_rounded(nbytes)
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Huge pages: fewer faults to fill it in and fewer pages for the driver to lock.
    with suppress(AttributeError, OSError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    data = torch.frombuffer(mapping, dtype=torch.uint8)
    # One write per page faults it all in, through torch, which releases the GIL while it
    # runs: madvise(MADV_POPULATE_WRITE) was as fast on an H200 host (~50 ms per 256 MiB)
    # but Python's mmap.madvise holds the GIL, which slowed another thread tenfold.
    data[::PAGE_BYTES].fill_(0)
    pinned = False
    if pin:
        status = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), size, _REGISTER_PORTABLE)
        pinned = int(status) == 0
        if not pinned:
            logger.warning(
                "could not page-lock %d bytes of host memory for the staging pool (CUDA "
                "error %s); copies to it run at pageable speed. Raise the locked-memory "
                "limit (ulimit -l) or lower pinned_ratio",
                size,
                int(status),
            )
    return MappedMemory(data, pinned, mapping)


class PoolFiller:
    """One daemon thread that maps the buffers asked for, one at a time, in order.

    ``ready(size, memory)`` is called on the filler thread for every buffer mapped, and
    ``failed(exc)`` when the kernel refuses one (the rest of the queue is dropped).
    """

    def __init__(
        self,
        ready: Callable[[int, MappedMemory], None],
        failed: Callable[[BaseException], None],
    ) -> None:
        self._ready = ready
        self._failed = failed
        self._queue: list[tuple[int, bool]] = []
        self._device: torch.device | None = None
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def replace_queue(self, sizes: list[int], *, pin: bool, device: torch.device | None) -> None:
        """Map these sizes next, instead of whatever was still queued."""
        with self._wake:
            self._queue = [(size, pin) for size in sizes]
            self._device = device
            if self._queue and self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="aiockpt-host-pool", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def close(self) -> None:
        """Drop the queue and stop the thread after the buffer it maps now, if any."""
        with self._wake:
            self._closed = True
            self._queue.clear()
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        device_set = False
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                size, pin = self._queue.pop(0)
                device = self._device
            try:
                if pin and not device_set and device is not None:
                    # The driver registers in the context of the thread's current device:
                    # the device the state lives on, not an extra context on device 0.
                    torch.cuda.set_device(device)
                    device_set = True
                memory = map_host_memory(size, pin=pin)
            except BaseException as exc:
                with self._wake:
                    self._queue.clear()
                self._failed(exc)
                continue
            self._ready(size, memory)
            time.sleep(_PAUSE_SECONDS)
