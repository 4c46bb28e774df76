"""Data files that several checkpoints of one directory hold once: incremental checkpoints.

A checkpoint whose tensors are partly unchanged since the previous one lists, for the
unchanged ones, a *shared* data file: ``data-r<R>-c<C>-s<M>.bin``, the bytes that step
``M`` wrote as its ``data-r<R>-c<C>.bin`` (docs/FORMAT.md, "Shared data files"). The local
backend makes it a hard link, inside the new checkpoint's own directory, to the previous
checkpoint's file. So:

- a reader never leaves the checkpoint directory: the shared file is one of its names;
- the filesystem counts the references. Bytes are freed only when the last checkpoint
  that names them is deleted, so retention, ``aiockpt prune`` and a crash at any instant
  (a link made into a temporary that is then deleted, a checkpoint renamed to trash) can
  never delete bytes a committed checkpoint still lists, and no manifest has to be
  consulted to delete one;
- a tier is its own directory: links never cross tiers (nor filesystems).

Files are written once and never changed (storage/base.py, rule 4), which is what makes
sharing one inode between checkpoints safe. A checkpoint's own file of a chunk whose
tensors are only partly changed holds just the changed tensors' bytes at their places
(the rest of the file is a hole, never read: no piece names those bytes).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from .._format.manifest import DATA_FILE_PATTERN, SHARED_FILE_PATTERN
from .fileio import checksum

__all__ = [
    "SharedPieces",
    "disk_usage",
    "link_shared",
    "shared_name",
    "sharing_checkpoints",
    "write_spans",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class SharedPieces(Protocol):
    """A backend that can list a committed checkpoint's data file in a new checkpoint
    without copying it (a backend without this writes every checkpoint whole)."""

    def share_file(self, checkpoint: Path, name: str, temporary: Path, as_name: str) -> bool:
        """Make ``as_name`` of ``temporary`` the very bytes of file ``name`` of committed
        ``checkpoint``; False when that cannot be done (the caller writes the bytes)."""
        ...

    def write_spans(
        self, temporary: Path, name: str, data: memoryview, spans: Sequence[tuple[int, int]]
    ) -> list[int]:
        """Write only the (offset, length) ``spans`` of ``data`` as file ``name``, each at
        its offset; the file ends where the last span ends. The CRC-32C of each span."""
        ...


def shared_name(name: str, step: int) -> str:
    """The name under which a later checkpoint lists data file ``name`` of step ``step``.

    A file that is shared already keeps its name: it still names the step that wrote it.
    """
    if SHARED_FILE_PATTERN.fullmatch(name):
        return name
    if not DATA_FILE_PATTERN.fullmatch(name):
        raise ValueError(f"{name!r} is not a data file name")
    return f"{name.removesuffix('.bin')}-s{step}.bin"


def link_shared(source: Path, target: Path) -> bool:
    """Hard-link ``source`` (a committed, never rewritten file) as ``target``.

    False when the link cannot be made: the source is gone (retention deleted its
    checkpoint after the change detection looked at it), the filesystem has no hard links,
    or ``target`` exists and is another file. The caller then writes the bytes itself.
    """
    try:
        os.link(source, target, follow_symlinks=False)
        return True
    except FileExistsError:
        try:
            same = os.path.samestat(os.lstat(source), os.lstat(target))
        except OSError:
            same = False
        if not same:
            logger.debug("%s exists and is not %s; its bytes are written instead", target, source)
        return same
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            logger.warning("could not share %s (%s); its bytes are written instead", source, exc)
        return False


def write_spans(
    path: str, data: memoryview, spans: Sequence[tuple[int, int]], *, durable: bool
) -> list[int]:
    """Write the ``spans`` of ``data`` at their offsets of a new file ``path``.

    The gaps stay holes: a filesystem with sparse files (ext4, xfs, tmpfs) spends no space
    on them. Ordinary buffered writes: spans start on 64-byte boundaries, not on the
    blocks direct I/O needs.
    """
    sums = [checksum(data[offset : offset + length]) for offset, length in spans]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for offset, length in spans:
            part = data[offset : offset + length]
            written = 0
            while written < length:
                written += os.pwrite(fd, part[written:], offset + written)
        end = max((offset + length for offset, length in spans), default=0)
        os.ftruncate(fd, end)  # a zero-length last span still ends the file where it says
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return sums


def sharing_checkpoints(checkpoint: Path, name: str) -> list[str]:
    """The other checkpoints beside ``checkpoint`` that hold file ``name`` of it (the same
    file, not a copy): what a damaged shared file damages too. Empty when it is not shared
    or cannot be looked at."""
    try:
        target = os.lstat(checkpoint / name)
    except OSError:
        return []
    if target.st_nlink < 2:
        return []
    found = []
    try:
        siblings = [e for e in os.scandir(checkpoint.parent) if e.name.startswith("step-")]
    except OSError:
        return []
    for sibling in siblings:
        if sibling.name == checkpoint.name:
            continue
        try:
            entries = list(os.scandir(sibling.path))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.name.startswith("data-") and os.path.samestat(
                    entry.stat(follow_symlinks=False), target
                ):
                    found.append(sibling.name)
                    break
            except OSError:
                continue
    return found


def disk_usage(checkpoints: Sequence[Path]) -> list[tuple[int, int, int]]:
    """Per checkpoint, in order: (bytes on disk of its data files, of those the bytes in
    files that another checkpoint also holds, the bytes no checkpoint before it in
    ``checkpoints`` holds). Sparse files count what they take, not their length; a file
    that vanishes (a live writer's retention) counts nothing."""
    seen: set[tuple[int, int]] = set()
    usage = []
    for checkpoint in checkpoints:
        held = shared = new = 0
        try:
            entries = list(os.scandir(checkpoint))
        except OSError:
            entries = []
        for entry in entries:
            if not entry.name.startswith("data-"):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            size = info.st_blocks * 512
            held += size
            if info.st_nlink > 1:
                shared += size
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                new += size
        usage.append((held, shared, new))
    return usage
