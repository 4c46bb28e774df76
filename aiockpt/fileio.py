"""Blocking file operations, run on writer/reader threads.

Every call here releases the GIL for the bulk of its work (os.pwrite, os.preadv, fsync and
crc32c on large buffers all do), so background persistence costs training little Python
time per byte.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import crc32c

__all__ = [
    "CHECKSUM_ALGORITHM",
    "checksum",
    "fsync_directory",
    "read_exact",
    "write_file_atomically",
    "write_pieces",
]

CHECKSUM_ALGORITHM = "crc32c"

# One write call never moves more than this, so a single huge chunk cannot hit the
# kernel's ~2 GiB per-call limit and progress is visible between calls.
_MAX_IO = 1 << 30


def checksum(data: memoryview | bytes) -> int:
    return crc32c.crc32c(data)


def write_pieces(
    path: str, data: memoryview, ranges: Sequence[tuple[int, int]], *, durable: bool
) -> list[int]:
    """Write ``data`` as the whole file ``path``; return the checksum of each (offset, length)."""
    sums = [checksum(data[offset : offset + length]) for offset, length in ranges]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written : written + _MAX_IO], written)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return sums


def read_exact(fd: int, into: memoryview, offset: int) -> None:
    """Fill ``into`` from ``fd`` at ``offset``; a short file is an EOFError."""
    done = 0
    while done < len(into):
        got = os.preadv(fd, [into[done : done + _MAX_IO]], offset + done)
        if got == 0:
            raise EOFError(f"file ends {len(into) - done} bytes early")
        done += got


def fsync_directory(path: str) -> None:
    """Make renames and creations inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: str, payload: bytes, *, durable: bool) -> None:
    """Replace ``path`` with ``payload`` so that readers see the old or the new file, whole."""
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(payload)
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # e.g. ENOSPC: leave no half-written file behind
            os.unlink(temporary)
        raise
    if durable:
        fsync_directory(os.path.dirname(path) or ".")
