"""The storage seam: what the commit protocol, restore, listing, retention and the CLI ask
of the place checkpoints live.

The contract every backend keeps (the local directory keeps it with renames; an object
store, which has no rename, keeps it with unique names and a manifest written last):

1. **One writer.** ``open`` takes the writer lock or raises DirectoryLockedError. A local
   lock dies with its process (flock); a backend without one uses a conditional create
   (create-if-absent of a lock object, refreshed while alive), so that a second writer is
   refused instead of interleaving commits with the first. ``probe_writer`` tells tools
   whether a writer is alive without ever taking the lock.
2. **Leftovers are invisible and cleaned.** Everything a writer creates before a commit
   (the temporary checkpoint, a half-written ``latest``) is private: readers never see it,
   and the next writer's ``open`` deletes it, since its writer is dead (it held the lock).
3. **A temporary is shared by the ranks.** ``begin(step, shared)`` with the same
   ``shared`` token names the same temporary on every rank; each rank writes only its
   own data files (``data-r<rank>-c<chunk>.bin``) into it, and only the lead commits.
4. **Data is immutable once written.** ``write_chunk`` writes a whole data file and
   returns the CRC-32C of each requested range; nothing rewrites it afterwards. After
   ``make_durable`` (and after ``write_chunk`` when ``durable``) its bytes survive a
   crash of the machine.
5. **The manifest is the commit marker, written last.** ``commit`` first makes every data
   file durable, then writes the manifest, makes it durable, and only then makes the
   checkpoint visible (local: rename + fsync of the parent directory; an object store:
   the manifest's upload *is* the commit, under a key that did not exist, created
   conditionally). A crash at any instant leaves the checkpoint either committed whole or
   invisible; a commit that cannot be known durable raises, and the checkpoint is
   withdrawn. Readers trust manifests alone: a checkpoint without one does not exist.
6. **Listing is by committed manifests, newest = largest step**, never by the ``latest``
   hint, which is advisory (``point_latest``/``latest_name``), may be stale or missing,
   and never names a checkpoint that retention deleted.
7. **Deletion hides first.** ``remove`` makes a checkpoint invisible in one step (local:
   rename to ``.trash-``; object store: delete the manifest first) and then frees its
   data; a crash in between leaves only leftovers (rule 2). Retention never deletes the
   newest checkpoint this writer committed.
8. **Reads are of ranges.** ``open_file`` gives a checkpoint's manifest or a data file
   with its size (checked against the manifest before anything is allocated); readers
   fetch the manifest whole (bounded in size), then byte ranges of data files, and verify
   every range against its checksum. Nothing a checkpoint holds is followed (no links),
   executed or trusted before it is checked.

Blocking methods run on writer threads (never on the event loop); the ``async`` ones
(``begin``, ``commit``) are the commit path's small-file and directory operations, run on
the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Protocol, runtime_checkable

from .._util.location import Location

__all__ = [
    "CheckpointInfo",
    "CheckpointStorage",
    "DataFile",
    "WriterState",
    "retention_split",
]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint.

    Attributes:
        step: the step it saves.
        path: where it is, ``<directory>/step-<N>`` (a Path, or an ObjectPath for an
            object store, written as its URL).
        nbytes: the size of its files, in bytes.
        mtime: its modification time (seconds since the epoch).
    """

    step: int
    path: Location
    nbytes: int
    mtime: float

    def __str__(self) -> str:
        return f"step {self.step}: {self.path} ({self.nbytes / 2**20:.1f} MiB)"


@dataclass(frozen=True)
class WriterState:
    """Whether a live process holds the writer lock, and its pid if known."""

    live: bool
    pid: int | None = None

    def describe(self) -> str:
        if not self.live:
            return "no live writer"
        return f"pid {self.pid} is writing" if self.pid else "a live process is writing"


@runtime_checkable
class CheckpointStorage(Protocol):
    """Where one writer's checkpoints live; see the module docstring for the contract."""

    # Local: the checkpoint directory (a Path). A checkpoint and a temporary are named by
    # paths under it, which an object store treats as key prefixes (an ObjectPath).
    @property
    def root(self) -> Location: ...

    durable: bool

    # -- the writer lock -------------------------------------------------------------------
    def open(self) -> None:
        """Take the writer lock (lead only) and delete a dead writer's leftovers."""

    def close(self) -> None:
        """Give the writer lock back."""

    def probe_writer(self) -> WriterState:
        """Is a live writer holding the lock? Never blocks and never takes the lock, so
        tools can look at a directory that training is writing."""
        ...

    # -- writing one checkpoint ------------------------------------------------------------
    async def begin(self, step: int, shared: str | None = None) -> Location:
        """A fresh temporary checkpoint for ``step`` (``shared``: the one all ranks use)."""
        ...

    def shared_temporary(self, step: int, shared: str) -> Location:
        """The temporary that ``begin(step, shared)`` makes, named alike on every rank."""
        ...

    def write_chunk(
        self,
        temporary: PurePath,
        name: str,
        data: memoryview,
        ranges: Sequence[tuple[int, int]],
        room: memoryview | None = None,
    ) -> list[int]:
        """Write data file ``name`` of ``temporary`` whole; the CRC-32C of each range.

        ``room`` is the buffer ``data`` starts, when bytes past its end may be written
        up to the next block (direct I/O from pinned memory)."""
        ...

    def make_durable(self, temporary: PurePath) -> None:
        """Make every file this process wrote into ``temporary`` survive a crash."""

    async def commit(self, temporary: PurePath, step: int, manifest: bytes) -> Location:
        """Write ``manifest`` last and make ``temporary`` the committed ``step``."""
        ...

    def abort(self, temporary: PurePath) -> None:
        """Delete a temporary that will not be committed."""

    def resumed_from(self, step: int) -> None:
        """This writer's state was restored from ``step``: its next commit supersedes
        every committed step above it."""

    # -- reading ---------------------------------------------------------------------------
    def list_committed(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        ...

    def open_file(self, checkpoint: PurePath, name: str) -> DataFile:
        """File ``name`` of ``checkpoint`` (its manifest or a data file), for ranged reads.

        Raises FileNotFoundError when it is missing, and another OSError when it is not a
        regular file (never followed through a link) or cannot be opened."""
        ...

    # -- retention and the ``latest`` hint ---------------------------------------------------
    def retain(self, keep_last: int | None) -> list[PurePath]:
        """Delete all but the newest ``keep_last`` committed checkpoints; what went."""
        ...

    def remove(self, checkpoint: PurePath) -> None:
        """Hide ``checkpoint`` in one step, then delete its data."""

    def remove_all(self, doomed: list[PurePath], survivors: list[CheckpointInfo]) -> list[PurePath]:
        """Remove ``doomed`` (those already gone are skipped), first pointing ``latest`` at
        the newest of ``survivors`` or removing it; what was removed."""
        ...

    def latest_name(self) -> str | None:
        """The checkpoint the ``latest`` hint names, if it is a valid name."""
        ...

    def point_latest(self, name: str | None, *, force: bool = False) -> None:
        """Point the ``latest`` hint at ``name`` (None: remove it)."""


class DataFile(Protocol):
    """One file of a committed checkpoint, open for reads of byte ranges."""

    @property
    def size(self) -> int:
        """Its size when opened: readers compare it with the manifest before reading."""
        ...

    def read_into(self, views: Sequence[memoryview], offset: int) -> None:
        """Fill ``views`` back to back from ``offset``; a file that ends first is an
        EOFError. Called from several reader threads at once."""

    def close(self) -> None: ...


def retention_split(
    committed: list[CheckpointInfo], keep_last: int, last_committed: int | None
) -> tuple[list[CheckpointInfo], list[CheckpointInfo]]:
    """(doomed, survivors) of retention over ``committed`` (oldest first), for every backend.

    Only steps up to the writer's last commit count: it is the newest in commit order, so
    it is never doomed, nor is anything above it (steps this writer did not resume from:
    nothing newer in commit order may go while they stay). Of those, all but the newest
    ``keep_last`` are doomed.
    """
    mine = [i for i in committed if last_committed is None or i.step <= last_committed]
    doomed = mine[: max(len(mine) - keep_last, 0)]
    return doomed, [i for i in committed if i not in doomed]
