"""The checkpoint directory: atomic commits, the ``latest`` pointer, retention, the lock.

Layout of a checkpoint directory::

    checkpoints/
      .aiockpt.lock            flock'd by the one live writer (released by the kernel on death)
      .tmp-step-300-1a2b/      a checkpoint being written: invisible to readers
      step-100/                committed: manifest.json + data-r00000-c00000.bin ...
      step-200/
      latest                   "step-200": a hint for tools; readers trust step-N dirs
      .trash-...               a directory on its way out (replaced or pruned)
      .superseded-step-250-..  a step above the one a run resumed from, moved aside by the
                               resumed run's first commit (see ``CheckpointStore.commit``)

A checkpoint becomes visible by one rename, after its data files and manifest are durable,
so a crash at any instant leaves only committed directories and temporaries that the next
writer deletes.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path, PurePath
from typing import Any, TypeVar

import aiofiles.os

from .._format.manifest import MANIFEST_NAME, MAX_STEP
from .._util.location import local_directory
from ..errors import CheckpointError, ConfigError, DirectoryLockedError
from .base import CheckpointInfo, WriterState, retention_split
from .commitio import fsync_directory_async, replace_file_atomically
from .fileio import (
    fsync_directory,
    open_regular,
    read_scatter,
    read_small_file,
    write_file_atomically,
    write_pieces,
)
from .locking import try_lock, unlock
from .publish import REPLACED_PREFIX, publish_directory
from .sharing import link_shared, write_spans

__all__ = ["CheckpointInfo", "CheckpointStore", "list_checkpoints", "read_latest"]

LOCK_NAME = ".aiockpt.lock"
LATEST_NAME = "latest"
SUPERSEDED_PREFIX = ".superseded-"
# step-<N> names have at most 19 digits: MAX_STEP (FORMAT.md section 3) has 19.
_STEP_DIR = re.compile(r"step-(0|[1-9]\d{0,18})")
_TEMPORARY_PREFIXES = (".tmp-", ".trash-")
# `latest` holds one step-<N> name; anything longer is not ours and is never read whole.
_LATEST_MAX_BYTES = 64
# A read-only probe (`aiockpt ls`) holds a shared lock for a few microseconds; a writer
# that collides with one retries for this long before it believes a writer is alive.
_LOCK_PATIENCE_S = 0.5

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


async def _in_thread(function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """A blocking function of ours awaited through aiofiles' executor, like its os calls."""
    return await aiofiles.os.wrap(function)(*args, **kwargs)  # type: ignore[no-any-return]


_open_stores: weakref.WeakSet[CheckpointStore] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    # A forked child shares the parent's lock (flock belongs to the open file). Closing the
    # child's copy leaves the parent's lock held, and makes the lock go away with the parent
    # instead of lingering in orphaned children (DataLoader workers) after a crash.
    for store in list(_open_stores):
        if store._lock_fd is not None:
            os.close(store._lock_fd)
            store._lock_fd = None
    _open_stores.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP_DIR.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if step <= MAX_STEP else None


def parse_private_step(name: str, prefix: str) -> int | None:
    """The step of a private entry ``<prefix>step-<N>-<hex>`` (None if it is not one)."""
    if not name.startswith(prefix):
        return None
    return parse_step_dir(name.removeprefix(prefix).rsplit("-", 1)[0])


def read_latest(root: str | os.PathLike[str]) -> str | None:
    """The checkpoint name ``latest`` holds, or None when it is absent or not a valid hint.

    ``latest`` is only a hint, so anything odd about it (a FIFO, a symlink to /dev/zero, a
    huge or non-UTF-8 file, a name that is not ``step-<N>``) reads as "no hint" instead of
    blocking, exhausting memory or failing the caller.
    """
    try:
        text = read_small_file(Path(root) / LATEST_NAME, _LATEST_MAX_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    name = text.strip()
    return name if parse_step_dir(name) is not None else None


def _has_manifest(directory: str) -> bool:
    """Does ``directory`` hold an entry named manifest.json (whatever it is)?

    Only ENOENT means "no manifest". Anything else (a manifest that is a symlink loop, a
    directory that cannot be searched) lists the checkpoint, so that loading it fails as
    corrupt and restore falls back past it, instead of the listing itself failing.
    """
    try:
        os.lstat(os.path.join(directory, MANIFEST_NAME))
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def files_size(directory: str | os.PathLike[str]) -> int:
    """Bytes of the regular files directly in ``directory`` (0 when it cannot be read)."""
    total = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue  # vanished (retention) or unreadable: it adds nothing
    return total


def list_checkpoints(directory: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Committed checkpoints under ``directory``, oldest first (newest last).

    A directory counts as committed when it is named ``step-<N>`` and holds a manifest;
    its checksums are checked only when it is loaded (or by ``aiockpt verify``).
    ``directory`` may be a ``file://`` URL; a scheme no backend serves is a ConfigError.

    Args:
        directory: the checkpoint directory (the Config's ``directory``).

    Returns:
        The committed checkpoints, oldest first; empty when ``directory`` does not exist.

    Raises:
        ConfigError: ``directory`` is a file, or a URL of a scheme no backend serves.
    """
    root = local_directory(directory)
    found = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    except NotADirectoryError as exc:
        raise ConfigError(
            f"{root} is a file, not a checkpoint directory; pass the directory that holds "
            "step-<N> checkpoints"
        ) from exc
    for entry in entries:
        step = parse_step_dir(entry.name)
        try:
            if step is None or not entry.is_dir(follow_symlinks=False):
                continue
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # renamed away (retention) between scandir and stat
        if not _has_manifest(entry.path):
            continue
        found.append(CheckpointInfo(step, Path(entry.path), files_size(entry.path), info.st_mtime))
    return sorted(found, key=lambda info: info.step)


class CheckpointStore:
    """One writer's view of a checkpoint directory: the local backend of the storage seam
    (``base.CheckpointStorage``). Blocking methods run off the loop; ``begin`` and
    ``commit`` are coroutines for the loop (their file operations go through aiofiles)."""

    def __init__(self, root: str | os.PathLike[str], *, durable: bool, lead: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable
        # In a run of several ranks only rank 0 leads: it holds the lock, clears leftovers,
        # commits and deletes. The others only write data files into shared temporaries.
        self.lead = lead
        self._lock_fd: int | None = None
        # The step this writer's state was restored from, until its next commit: that
        # commit supersedes every step above it (see commit()).
        self._resumed_from: int | None = None
        self._last_committed: int | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def open(self) -> None:
        """Create the directory, take the writer lock, and clear a dead writer's leftovers."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ConfigError(
                f"checkpoint directory {self.root}: {exc.filename or self.root} is a file, "
                "so no directory can be made there; set `directory` to a directory path"
            ) from exc
        if not self.root.is_dir():
            raise ConfigError(
                f"checkpoint directory {self.root} is not a directory; set `directory` to one"
            )
        if not self.lead:
            return
        fd = self._open_lock_file()
        try:
            self._acquire(fd)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        _open_stores.add(self)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)  # ENOSPC on a full disk
            self._recover()
        except BaseException:
            self.close()  # a failed open must not keep the lock (or the mount) busy
            raise

    def _open_lock_file(self) -> int:
        path = self.root / LOCK_NAME
        try:
            fd, _ = open_regular(path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            # Never followed, truncated or written: a symlink here could point at any file.
            kind = "a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
            if exc.errno == errno.EISDIR:
                kind = "a directory"
            raise CheckpointError(
                f"{path} is {kind}, not aiockpt's lock file ({exc}); aiockpt never follows "
                "or writes through it: remove it (no writer is using it) and open the "
                "directory again"
            ) from exc
        return fd

    def _acquire(self, fd: int) -> None:
        # Tools probe for a live writer by trying a shared lock for a few microseconds;
        # a writer that collides with such a probe tries again instead of failing. A
        # writer that is really alive keeps its lock for good, so after the retries the
        # directory is really taken.
        deadline = time.monotonic() + _LOCK_PATIENCE_S
        pause = 0.001
        while not try_lock(fd):
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise DirectoryLockedError(
                    f"{self.root} is being written by another process (pid {holder}); "
                    "give each run its own checkpoint directory, or stop the other writer"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def probe_writer(self) -> WriterState:
        """Is the lock held by a live writer? Never blocks, never holds the lock.

        The lock file is opened read-only (no create, no truncate, no link followed, no
        waiting on a FIFO) and a shared lock is tried and dropped at once. A writer holds
        LOCK_EX for its whole life, so our LOCK_SH fails exactly when one is alive. A writer
        opening the directory in the same microseconds retries its own attempt for a moment
        (``open``), so a probe never makes it fail. Something other than a regular file
        under the lock's name is no writer's lock: no writer can be alive.
        """
        try:
            fd, _ = open_regular(self.root / LOCK_NAME)
        except OSError:
            return WriterState(False)  # never opened by a writer, or not a writer's lock
        try:
            if not try_lock(fd, shared=True):
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return WriterState(True, int(text) if text.isdigit() else None)
            unlock(fd)
            return WriterState(False)
        finally:
            os.close(fd)

    def close(self) -> None:
        _open_stores.discard(self)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _recover(self) -> None:
        # A replaced checkpoint whose successor never got renamed in comes back first.
        for entry in os.scandir(self.root):
            original = parse_private_step(entry.name, REPLACED_PREFIX)
            if original is not None and not (self.root / step_dir_name(original)).exists():
                os.rename(entry.path, self.root / step_dir_name(original))
        for entry in os.scandir(self.root):
            if entry.name.startswith(_TEMPORARY_PREFIXES) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
        self._discard(self.root / f"{LATEST_NAME}.tmp")

    def _discard(self, path: Path) -> None:
        """Remove ``path`` whatever it is (file, symlink, FIFO, directory), if it exists."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            trash = self.root / f".trash-{path.name}-{secrets.token_hex(4)}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    # -- writing one checkpoint -------------------------------------------------------
    async def begin(self, step: int, shared: str | None = None) -> Path:
        """A fresh temporary directory for the files of ``step``.

        ``shared`` names one that all ranks write into (each creates it if it is first).
        """
        if shared is None:
            path = self.root / f".tmp-{step_dir_name(step)}-{secrets.token_hex(4)}"
            await aiofiles.os.mkdir(path)
            return path
        path = self.shared_temporary(step, shared)
        try:
            await aiofiles.os.mkdir(path)
        except FileExistsError:
            if not await aiofiles.os.path.isdir(path):
                raise  # the same refusal Path.mkdir(exist_ok=True) gives
        return path

    def shared_temporary(self, step: int, shared: str) -> Path:
        return self.root / f".tmp-{step_dir_name(step)}-{shared}"

    def write_chunk(
        self,
        temporary: PurePath,
        name: str,
        data: memoryview,
        ranges: Sequence[tuple[int, int]],
        room: memoryview | None = None,
    ) -> list[int]:
        # The hot path, on a writer thread: crc32c, then O_DIRECT pwrite from the pinned
        # buffer (buffered pwrite where the filesystem has no O_DIRECT); fsync'd if durable.
        return write_pieces(str(temporary / name), data, ranges, durable=self.durable, room=room)

    def share_file(self, checkpoint: Path, name: str, temporary: Path, as_name: str) -> bool:
        # A hard link: the filesystem then keeps the bytes while any checkpoint lists them,
        # whatever retention, prune or a crash deletes (storage/sharing.py).
        return link_shared(checkpoint / name, temporary / as_name)

    def write_spans(
        self, temporary: Path, name: str, data: memoryview, spans: Sequence[tuple[int, int]]
    ) -> list[int]:
        return write_spans(str(temporary / name), data, spans, durable=self.durable)

    def make_durable(self, temporary: PurePath) -> None:
        # Data files are fsync'd as they are written; what is left is their names.
        if self.durable:
            fsync_directory(str(temporary))

    def abort(self, temporary: PurePath) -> None:
        shutil.rmtree(temporary, ignore_errors=True)

    def resumed_from(self, step: int) -> None:
        """This writer's state was just restored from ``step`` (restore, or its fallback)."""
        self._resumed_from = step

    async def commit(self, temporary: PurePath, step: int, manifest: bytes) -> Path:
        """Write the manifest last, then make the checkpoint visible with one rename.

        Runs on the event loop; every file and directory operation is awaited through
        aiofiles, in this order: the commit primitive (``publish.publish_directory``:
        manifest written and fsync'd, the temporary directory fsync'd, renamed into place,
        the parent directory fsync'd, the replaced copy deleted), then ``latest``.

        After a restore, the run's own timeline decides what restore finds next: once the
        first commit after it is durable, every committed step above the one restored
        (steps this run never wrote: a torn newest checkpoint that restore fell back past,
        or a future that the run rewound from) is moved aside as
        ``.superseded-step-<M>-<hex>``. Otherwise a crash would restore a step of the
        abandoned timeline (or a corrupt one), and retention, which ranks by step, would
        delete this run's newer commits and keep those.
        """
        final = await publish_directory(
            Path(temporary), self.root / step_dir_name(step), manifest, durable=self.durable
        )
        self._last_committed = step
        try:
            # Before anything is moved aside, so that `latest` never names a step that
            # is gone (forced: after a restore it moves back below superseded steps).
            await self._point_latest_async(final.name, force=self._resumed_from is not None)
        except OSError as exc:
            # Committed and durable already; `latest` is only a hint for tools, so a disk
            # too full for it must not report this checkpoint as failed (nor stop retention).
            logger.warning("%s is committed, but %s was not updated: %s", final, LATEST_NAME, exc)
        resumed, self._resumed_from = self._resumed_from, None
        if resumed is not None:
            try:
                await self._supersede_above(min(step, resumed), keep=step)
            except OSError as exc:
                # Committed already. What was not moved aside is moved by the next
                # commit; meanwhile restore still falls back past a corrupt step.
                logger.warning("%s is committed; steps above it stay: %s", final, exc)
                self._resumed_from = resumed
        return final

    async def _supersede_above(self, floor: int, keep: int) -> None:
        committed = await _in_thread(list_checkpoints, self.root)
        above = [i for i in committed if i.step > floor and i.step != keep]
        for info in above:
            aside = self.root / f"{SUPERSEDED_PREFIX}{info.path.name}-{secrets.token_hex(4)}"
            await aiofiles.os.rename(info.path, aside)
            logger.warning(
                "%s is above the step this run resumed from; moved aside as %s",
                info.path,
                aside.name,
            )
        if above and self.durable:
            await fsync_directory_async(self.root)

    def _make_way_for_latest(self, name: str, *, force: bool) -> bool:
        """Should ``latest`` be pointed at ``name``? If so, clear what would stop the
        rename (a directory in its place).

        Without ``force`` it never moves back to an older step that still exists.
        """
        if not force:
            current = self.latest_name()  # a valid step-<N> name or None
            current_step = -1 if current is None else parse_step_dir(current)
            new_step = parse_step_dir(name)
            moves_back = new_step is not None and (current_step or -1) > new_step
            if moves_back and (self.root / str(current)).is_dir():
                return False
        path = self.root / LATEST_NAME
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                self._discard(path)  # rename() cannot replace a directory with a file
        except FileNotFoundError:
            pass
        return True

    def point_latest(self, name: str | None, *, force: bool = False) -> None:
        """Point ``latest`` at ``name`` (None: remove it).

        Without ``force`` it never moves back to an older step that still exists. A bad
        ``latest`` (not a regular file, not UTF-8, ...) is replaced, never read or followed.
        """
        path = self.root / LATEST_NAME
        if name is None:
            self._discard(path)
            if self.durable:
                fsync_directory(str(self.root))
            return
        if not self._make_way_for_latest(name, force=force):
            return
        write_file_atomically(str(path), f"{name}\n".encode(), durable=self.durable)

    async def _point_latest_async(self, name: str, *, force: bool) -> None:
        """``point_latest`` on the loop: the same checks (a few stat calls, on a thread),
        then the file written and renamed through aiofiles."""
        path = self.root / LATEST_NAME
        if not await _in_thread(self._make_way_for_latest, name, force=force):
            return
        await replace_file_atomically(str(path), f"{name}\n".encode(), durable=self.durable)

    def latest_name(self) -> str | None:
        return read_latest(self.root)

    # -- reading ----------------------------------------------------------------------
    def list_committed(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.root)

    def open_file(self, checkpoint: PurePath, name: str) -> LocalFile:
        # Never through a link, never blocking on a FIFO; the type is checked on the
        # open descriptor, so nothing can be swapped in between the check and the reads.
        fd, info = open_regular(checkpoint / name)
        return LocalFile(fd, info.st_size)

    # -- retention ----------------------------------------------------------------------
    def retain(self, keep_last: int | None) -> list[PurePath]:
        """Delete all but the newest ``keep_last`` committed checkpoints; returns what went.

        Only steps up to this writer's last commit count: it is the newest in commit
        order, so it is never deleted, nor is anything above it (after a restore the
        commit moved those aside; without one they are steps this writer did not resume
        from, and nothing newer in commit order may go while they stay). Superseded steps
        at or below the last commit are deleted too: the run has gone past them.
        """
        if keep_last is None:
            return []
        committed = list_checkpoints(self.root)
        doomed, survivors = retention_split(committed, keep_last, self._last_committed)
        removed = self.remove_all([info.path for info in doomed], survivors)
        if self._last_committed is not None:
            for entry in os.scandir(self.root):
                step = parse_private_step(entry.name, SUPERSEDED_PREFIX)
                if step is not None and step <= self._last_committed:
                    self.remove(Path(entry.path))
                    removed.append(Path(entry.path))
        return removed

    def remove_all(self, doomed: list[PurePath], survivors: list[CheckpointInfo]) -> list[PurePath]:
        """Remove ``doomed``, first pointing ``latest`` at the newest of ``survivors`` (or
        removing it), so that a crash at any point leaves it naming an existing checkpoint
        or absent."""
        if not doomed:
            return []
        latest = self.latest_name()
        gone = {path.name for path in doomed}
        if latest is None or latest in gone or not (self.root / latest).is_dir():
            self.point_latest(survivors[-1].path.name if survivors else None, force=True)
        removed = []
        for path in doomed:
            try:
                self.remove(path)
            except FileNotFoundError:
                continue  # a live writer's own retention got there first
            removed.append(path)
        return removed

    def remove(self, path: PurePath) -> None:
        # Rename first: a directory half-deleted under its step name would look torn.
        trash = self.root / f".trash-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, trash)
        if self.durable:
            fsync_directory(str(self.root))
        shutil.rmtree(trash, ignore_errors=True)


class LocalFile:
    """A checkpoint file open for reading: positioned reads (preadv) on one descriptor,
    safe from several threads at once."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def read_into(self, views: Sequence[memoryview], offset: int) -> None:
        read_scatter(self.fd, views, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
