"""Blocking file operations, run on writer/reader threads.

Every call here releases the GIL for the bulk of its work (os.pwrite, os.preadv, fsync and
crc32c on large buffers all do), so background persistence costs training little Python
time per byte.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Sequence

import crc32c

__all__ = [
    "CHECKSUM_ALGORITHM",
    "CREATE_NEW_FLAGS",
    "checksum",
    "NotRegularFileError",
    "fsync_directory",
    "open_regular",
    "read_exact",
    "read_small_file",
    "read_scatter",
    "write_file_atomically",
    "write_all",
    "write_pieces",
]

CHECKSUM_ALGORITHM = "crc32c"

# One write call never moves more than this, so a single huge chunk cannot hit the
# kernel's ~2 GiB per-call limit and progress is visible between calls.
_MAX_IO = 1 << 30


def checksum(data: memoryview | bytes, running: int = 0) -> int:
    """crc32c of ``data``; ``running`` continues the checksum of the bytes before it."""
    return crc32c.crc32c(data, running)


def write_pieces(
    path: str,
    data: memoryview,
    ranges: Sequence[tuple[int, int]],
    *,
    durable: bool,
    room: memoryview | None = None,
) -> list[int]:
    """Write ``data`` as the whole file ``path``; return the checksum of each (offset, length).

    ``room`` is the buffer ``data`` starts, when it may be written past ``data``'s end up to
    the next block. Then durable writes go around the page cache (O_DIRECT): the disk
    reads the pinned buffer itself, and no copy of the checkpoint streams through the CPU
    caches that the training thread works in. Filesystems without O_DIRECT (tmpfs) get
    ordinary writes.
    """
    sums = [checksum(data[offset : offset + length]) for offset, length in ranges]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    padded = -(-len(data) // _DIRECT_BLOCK) * _DIRECT_BLOCK
    if durable and room is not None and len(room) >= padded and _aligned(room):
        try:
            _write_direct(path, room[:padded], len(data), flags)
            return sums
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    fd = os.open(path, flags, 0o644)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return sums


_DIRECT_BLOCK = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _aligned(view: memoryview) -> bool:
    address = ctypes.addressof(ctypes.c_char.from_buffer(view)) if not view.readonly else 1
    return bool(_O_DIRECT) and address % _DIRECT_BLOCK == 0


def write_all(fd: int, data: memoryview) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written : written + _MAX_IO], written)


def _write_direct(path: str, padded: memoryview, size: int, flags: int) -> None:
    # EINVAL (no O_DIRECT here) surfaces at open or at the first write: the caller falls
    # back to buffered writes, which truncate the file again.
    fd = os.open(path, flags | _O_DIRECT, 0o644)
    try:
        write_all(fd, padded)
        os.ftruncate(fd, size)  # drop the padding up to the block boundary
        os.fsync(fd)
    finally:
        os.close(fd)


def read_exact(fd: int, into: memoryview, offset: int) -> None:
    """Fill ``into`` from ``fd`` at ``offset``; a short file is an EOFError."""
    done = 0
    while done < len(into):
        got = os.preadv(fd, [into[done : done + _MAX_IO]], offset + done)
        if got == 0:
            raise EOFError(f"file ends {len(into) - done} bytes early")
        done += got


_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


def read_scatter(fd: int, views: Sequence[memoryview], offset: int) -> None:
    """Fill ``views`` back to back from ``fd`` starting at ``offset``: one preadv call reads
    a run of many buffers (e.g. the tensors of one file) at once. A short file is an
    EOFError."""
    pending = [v for v in views if len(v)]
    first = 0
    while first < len(pending):
        batch = pending[first : first + _IOV_MAX]
        got = os.preadv(fd, batch, offset)
        if got == 0:
            missing = sum(len(v) for v in pending[first:])
            raise EOFError(f"file ends {missing} bytes early")
        offset += got
        # A short read (signals, the kernel's per-call cap) stops inside some buffer:
        # resume from there.
        while got:
            size = len(pending[first])
            if got >= size:
                got -= size
                first += 1
            else:
                pending[first] = pending[first][got:]
                got = 0


class NotRegularFileError(OSError):
    """A name in a checkpoint directory is something other than a regular file."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def open_regular(
    path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o644
) -> tuple[int, os.stat_result]:
    """Open ``path`` without following a symlink and without blocking; (fd, its fstat).

    Every name in a checkpoint directory may have been replaced by something hostile: a
    symlink (to /dev/zero, or to a file of someone else's that a write would clobber)
    fails with ELOOP; a FIFO opens at once instead of waiting for a writer, and is then
    refused with everything else that is not a regular file. The type is checked on the
    open descriptor, so nothing can be swapped in between the check and the use.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(
                errno.EINVAL, f"is not a regular file ({_kind(info.st_mode)})", str(path)
            )
        if flags & (os.O_WRONLY | os.O_RDWR) == 0:
            return fd, info
        # Writes must block as usual (O_NONBLOCK only kept the open from hanging).
        os.set_blocking(fd, True)
        return fd, info
    except BaseException:
        os.close(fd)
        raise


def read_small_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (checked before reading)."""
    fd, info = open_regular(path)
    try:
        if info.st_size > limit:
            raise NotRegularFileError(
                errno.EFBIG,
                f"holds {info.st_size} bytes, more than the {limit} expected",
                str(path),
            )
        data = bytearray(info.st_size)
        read_exact(fd, memoryview(data), 0)
        return bytes(data)
    finally:
        os.close(fd)


def fsync_directory(path: str) -> None:
    """Make renames and creations inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A new file of our own: never an existing one, never through a symlink planted there.
CREATE_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_file_atomically(path: str, payload: bytes, *, durable: bool) -> None:
    """Replace ``path`` with ``payload`` so that readers see the old or the new file, whole."""
    temporary = f"{path}.tmp"
    # A stale or planted temporary (even a symlink) is unlinked, never written through:
    # O_EXCL | O_NOFOLLOW then creates a fresh file of our own.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    fd = os.open(temporary, CREATE_NEW_FLAGS, 0o644)
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
