"""The commit path's small files and directory operations, as coroutines (aiofiles).

A commit is a dozen tiny operations (write and fsync the manifest, rename a directory,
fsync its parent, replace ``latest``) that each wait on the disk for microseconds to
milliseconds. Awaiting them through aiofiles keeps the event loop free for the copy and
write tasks of the next checkpoint while a commit waits, without a writer thread held for
the whole commit. Bulk chunk writes do not come here: they stay on the writer threads
(``fileio.write_pieces``), where O_DIRECT pwrite from pinned buffers is fastest.

The ``aiofiles.os`` functions are looked up when called, never bound at import, so that
whatever wraps them process-wide (a fault-injection harness) sees every call.
"""

from __future__ import annotations

import contextlib
import os

import aiofiles
import aiofiles.os

from .fileio import CREATE_NEW_FLAGS, fsync_directory

__all__ = [
    "create_file",
    "fsync_directory_async",
    "replace_file_atomically",
]


def _create_exclusive(path: str, flags: int) -> int:
    # aiofiles.open's ``opener``: the flags open() derives from "wb" would truncate
    # whatever is there; these refuse it instead.
    del flags
    return os.open(path, CREATE_NEW_FLAGS, 0o644)


def _fsync(fd: int) -> None:
    os.fsync(fd)  # looked up per call (see the module docstring)


def _fsync_directory(path: str) -> None:
    fsync_directory(path)


async def create_file(path: str | os.PathLike[str], payload: bytes, *, durable: bool) -> None:
    """Create ``path`` (it must not exist) holding ``payload``; fsync'd when ``durable``."""
    async with aiofiles.open(path, "wb", buffering=0, opener=_create_exclusive) as file:
        view = memoryview(payload)
        written = 0
        while written < len(view):
            written += await file.write(view[written:])
        if durable:
            await aiofiles.os.wrap(_fsync)(file.fileno())


async def fsync_directory_async(path: str | os.PathLike[str]) -> None:
    """Make renames and creations inside directory ``path`` durable."""
    await aiofiles.os.wrap(_fsync_directory)(os.fspath(path))


async def replace_file_atomically(path: str, payload: bytes, *, durable: bool) -> None:
    """Replace ``path`` with ``payload`` so that readers see the old or the new file, whole
    (the coroutine twin of ``fileio.write_file_atomically``, with the same steps)."""
    temporary = f"{path}.tmp"
    try:
        try:
            await create_file(temporary, payload, durable=durable)
        except FileExistsError:
            # A stale or planted temporary (even a symlink) is unlinked, never written
            # through; trying first saves the common case a round trip to a thread.
            await aiofiles.os.unlink(temporary)
            await create_file(temporary, payload, durable=durable)
        await aiofiles.os.replace(temporary, path)
    except BaseException:
        # e.g. ENOSPC: leave no half-written file behind. Not awaited: this may run while
        # the task is being cancelled, and one unlink does not stall the loop.
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if durable:
        await fsync_directory_async(os.path.dirname(path) or ".")
