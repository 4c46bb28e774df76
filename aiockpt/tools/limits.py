"""Physical limits of this machine, measured the way aiockpt uses the hardware.

Benchmarks report every aiockpt figure next to these (persist GB/s against raw parallel
fsync'd write bandwidth of the same directory, stall against the device-to-device copy of
the same bytes), so a number can be judged without knowing the machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._engine.memory import byte_view
from ..storage.fileio import read_exact, write_all, write_pieces

_BLOCK = 4096
# Host memory copies are timed on at most this much: the rate is flat well below it.
_HOST_COPY_BYTES = 1 << 30

__all__ = [
    "Limits",
    "capture_bound_seconds",
    "fsync_write_seconds",
    "measure_chunk_writes",
    "measure_limits",
    "restore_bound_seconds",
]


@dataclass
class Limits:
    d2d_gbps: float | None = None
    d2h_pinned_gbps: float | None = None
    d2h_pageable_gbps: float | None = None
    h2d_pinned_gbps: float | None = None
    fsync_write_gbps: float = 0.0
    pagecache_write_gbps: float = 0.0
    read_gbps: float = 0.0
    host_copy_gbps: float = 0.0
    device: str = "cpu"
    nbytes: int = 0  # bytes each disk figure moved
    threads: int = 0  # files written and read at once

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def _best_of(repeats: int, run) -> float:  # type: ignore[no-untyped-def]
    return min(run() for _ in range(repeats))


def _cuda_copy_seconds(dst: torch.Tensor, src: torch.Tensor) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_copies(nbytes: int, limits: Limits) -> None:
    """Device-to-device, device-to-host (pinned and pageable) and host-to-device rates."""
    if not torch.cuda.is_available():
        return
    limits.device = torch.cuda.get_device_name()
    buffers = {
        "source": torch.empty(nbytes, dtype=torch.uint8, device="cuda"),
        "gpu": torch.empty(nbytes, dtype=torch.uint8, device="cuda"),
        "pinned": torch.empty(nbytes, dtype=torch.uint8, pin_memory=True),
        "pageable": torch.empty(nbytes, dtype=torch.uint8),
    }
    gb = nbytes / 1e9
    limits.d2d_gbps = gb / _best_of(
        5, lambda: _cuda_copy_seconds(buffers["gpu"], buffers["source"])
    )
    limits.d2h_pinned_gbps = gb / _best_of(
        3, lambda: _cuda_copy_seconds(buffers["pinned"], buffers["source"])
    )
    limits.d2h_pageable_gbps = gb / _best_of(
        2, lambda: _cuda_copy_seconds(buffers["pageable"], buffers["source"])
    )
    limits.h2d_pinned_gbps = gb / _best_of(
        3, lambda: _cuda_copy_seconds(buffers["source"], buffers["pinned"])
    )
    buffers.clear()
    torch.cuda.empty_cache()
    # The pinned buffer goes back to torch's host allocator, which keeps it cached for the
    # life of the process: 4 GiB of locked memory that nothing measured later may use.
    release_pinned = getattr(torch._C, "_host_emptyCache", None)
    if release_pinned is not None:
        release_pinned()


def measure_host_copy(nbytes: int, limits: Limits) -> None:
    """Host-to-host memcpy rate: what capturing CPU state into a host buffer can reach."""
    size = max(min(nbytes, _HOST_COPY_BYTES), 1 << 20)
    source = torch.ones(size, dtype=torch.uint8)
    target = torch.empty_like(source)
    target.copy_(source)  # fault the pages in first: first-touch costs are not the copy's

    def copy() -> float:
        start = time.perf_counter()
        target.copy_(source)
        return time.perf_counter() - start

    limits.host_copy_gbps = size / 1e9 / _best_of(3, copy)


def _parallel_seconds(work: Callable[[int], None], files: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(files) as pool:
        list(pool.map(work, range(files)))
    return time.perf_counter() - start


def _write_files(directory: Path, data: memoryview, files: int, *, fsync: bool) -> float:
    def write_one(i: int) -> None:
        fd = os.open(directory / f"limit-{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    return _parallel_seconds(write_one, files)


def _read_files(directory: Path, into: memoryview, files: int) -> float:
    def read_one(i: int) -> None:
        fd = os.open(directory / f"limit-{i}.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from disk, not cache
            read_exact(fd, into, 0)
        finally:
            os.close(fd)

    return _parallel_seconds(read_one, files)


def measure_disk(
    directory: str | os.PathLike[str], nbytes: int, threads: int, limits: Limits
) -> None:
    """Parallel fsync'd writes, page-cache writes and cold reads of ``nbytes`` in total."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".limits-", dir=root))
    per_file = max(nbytes // threads, 1 << 20)
    limits.nbytes = per_file * threads
    limits.threads = threads
    buffer = torch.randint(0, 255, (per_file,), dtype=torch.uint8)
    data = byte_view(buffer)
    try:
        total = per_file * threads / 1e9
        limits.pagecache_write_gbps = total / _write_files(scratch, data, threads, fsync=False)
        limits.fsync_write_gbps = total / _write_files(scratch, data, threads, fsync=True)
        limits.read_gbps = total / _read_files(scratch, data, threads)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure_chunk_writes(
    directory: str | os.PathLike[str], per_file: int, writers: int, *, pinned: bool = False
) -> float:
    """GB/s of ``writers`` threads each writing a file of ``per_file`` bytes the way the
    pipeline writes a chunk: from a buffer allocated like its staging pool (``pinned``
    when GPU state is saved), checksummed, around the page cache where the buffer and the
    filesystem allow it, fsync'd.

    One writer against several shows how many writer threads the disk takes before it
    stops going faster.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".limits-", dir=root))
    size = max(per_file, 1)
    padded = -(-size // _BLOCK) * _BLOCK  # the pool's buffers are whole blocks too
    buffer = torch.empty(padded, dtype=torch.uint8, pin_memory=pinned)
    buffer.random_(0, 256)
    room = byte_view(buffer)

    def write_one(i: int) -> None:
        path = str(scratch / f"limit-{i}.bin")
        write_pieces(path, room[:size], [(0, size)], durable=True, room=room)

    try:
        return size * writers / 1e9 / _parallel_seconds(write_one, writers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure_limits(directory: str | os.PathLike[str], nbytes: int, threads: int = 8) -> Limits:
    limits = Limits()
    measure_copies(min(nbytes, 4 << 30), limits)
    measure_host_copy(nbytes, limits)
    measure_disk(directory, nbytes, threads, limits)
    return limits


def fsync_write_seconds(directory: str | os.PathLike[str], nbytes: int, threads: int) -> float:
    """Seconds to write ``nbytes`` as ``threads`` parallel fsync'd files under ``directory``
    (for several ranks writing at once, each timing its own part)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".limits-", dir=root))
    per_file = max(nbytes // threads, 1 << 20)
    buffer = torch.randint(0, 255, (per_file,), dtype=torch.uint8)
    try:
        return _write_files(scratch, byte_view(buffer), threads, fsync=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _seconds(nbytes: int, gbps: float | None) -> float:
    return nbytes / (gbps * 1e9) if gbps else 0.0


def capture_bound_seconds(nbytes: int, limits: Mapping[str, object]) -> float:
    """The least a capture of ``nbytes`` can take: one device-to-device copy on a GPU,
    one host memcpy on the CPU."""
    d2d = limits.get("d2d_gbps")
    rate = d2d if isinstance(d2d, (int, float)) and d2d else limits.get("host_copy_gbps")
    return _seconds(nbytes, rate if isinstance(rate, (int, float)) else None)


def restore_bound_seconds(nbytes: int, limits: Mapping[str, object]) -> float:
    """Reading every byte from disk, plus moving it to the device, at the measured rates."""
    read, h2d = limits.get("read_gbps"), limits.get("h2d_pinned_gbps")
    return _seconds(nbytes, read if isinstance(read, (int, float)) else None) + _seconds(
        nbytes, h2d if isinstance(h2d, (int, float)) else None
    )
