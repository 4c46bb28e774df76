"""The checkpoint directory: atomic commits, the ``latest`` pointer, retention, the lock.

Layout of a checkpoint directory::

    checkpoints/
      .aiockpt.lock            flock'd by the one live writer (released by the kernel on death)
      .tmp-step-300-1a2b/      a checkpoint being written: invisible to readers
      step-100/                committed: manifest.json + data-r00000-c00000.bin ...
      step-200/
      latest                   "step-200": a hint for tools; readers trust step-N dirs
      .trash-...               a directory on its way out (replaced or pruned)

A checkpoint becomes visible by one rename, after its data files and manifest are durable,
so a crash at any instant leaves only committed directories and temporaries that the next
writer deletes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

from .._format.manifest import MANIFEST_NAME
from ..errors import DirectoryLockedError
from .fileio import fsync_directory, write_file_atomically

__all__ = ["CheckpointInfo", "CheckpointStore", "list_checkpoints"]

LOCK_NAME = ".aiockpt.lock"
LATEST_NAME = "latest"
_STEP_DIR = re.compile(r"step-(\d{1,19})")
_TEMPORARY_PREFIXES = (".tmp-", ".trash-")

logger = logging.getLogger("aiockpt")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint directory."""

    step: int
    path: Path
    nbytes: int
    mtime: float

    def __str__(self) -> str:
        return f"step {self.step}: {self.path} ({self.nbytes / 2**20:.1f} MiB)"


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
    return int(match.group(1)) if match else None


def list_checkpoints(directory: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Committed checkpoints under ``directory``, oldest first (newest last).

    A directory counts as committed when it is named ``step-<N>`` and holds a manifest;
    its checksums are checked only when it is loaded (or by ``aiockpt verify``).
    """
    root = Path(directory)
    found = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for entry in entries:
        step = parse_step_dir(entry.name)
        if step is None or not entry.is_dir(follow_symlinks=False):
            continue
        manifest = Path(entry.path) / MANIFEST_NAME
        try:
            stat = manifest.stat()
        except FileNotFoundError:
            continue
        nbytes = sum(f.stat().st_size for f in Path(entry.path).iterdir() if f.is_file())
        found.append(CheckpointInfo(step, Path(entry.path), nbytes, stat.st_mtime))
    return sorted(found, key=lambda info: info.step)


class CheckpointStore:
    """One writer's view of a checkpoint directory (blocking calls; run them off the loop)."""

    def __init__(self, root: str | os.PathLike[str], *, durable: bool, lead: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable
        # In a run of several ranks only rank 0 leads: it holds the lock, clears leftovers,
        # commits and deletes. The others only write data files into shared temporaries.
        self.lead = lead
        self._lock_fd: int | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def open(self) -> None:
        """Create the directory, take the writer lock, and clear a dead writer's leftovers."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.lead:
            return
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise DirectoryLockedError(
                    f"{self.root} is being written by another process (pid {holder}); "
                    "give each run its own checkpoint directory, or stop the other writer"
                ) from exc
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

    def close(self) -> None:
        _open_stores.discard(self)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _recover(self) -> None:
        # A replaced checkpoint whose successor never got renamed in comes back first.
        for entry in os.scandir(self.root):
            if entry.name.startswith(".trash-replace-"):
                original = entry.name.removeprefix(".trash-replace-").rsplit("-", 1)[0]
                if parse_step_dir(original) is not None and not (self.root / original).exists():
                    os.rename(entry.path, self.root / original)
        for entry in os.scandir(self.root):
            if entry.name.startswith(_TEMPORARY_PREFIXES) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
        (self.root / f"{LATEST_NAME}.tmp").unlink(missing_ok=True)

    # -- writing one checkpoint -------------------------------------------------------
    def begin(self, step: int, shared: str | None = None) -> Path:
        """A fresh temporary directory for the files of ``step``.

        ``shared`` names one that all ranks write into (each creates it if it is first).
        """
        if shared is None:
            path = self.root / f".tmp-{step_dir_name(step)}-{secrets.token_hex(4)}"
            path.mkdir()
        else:
            path = self.root / f".tmp-{step_dir_name(step)}-{shared}"
            path.mkdir(exist_ok=True)
        return path

    def abort(self, temporary: Path) -> None:
        shutil.rmtree(temporary, ignore_errors=True)

    def commit(self, temporary: Path, step: int, manifest: bytes) -> Path:
        """Write the manifest last, then make the checkpoint visible with one rename."""
        manifest_path = temporary / MANIFEST_NAME
        fd = os.open(manifest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(manifest)
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self.durable:
            fsync_directory(str(temporary))
        final = self.root / step_dir_name(step)
        replaced = None
        if final.exists():
            # Re-saving a step: move the old one aside; _recover() restores it if we die here.
            replaced = self.root / f".trash-replace-{final.name}-{secrets.token_hex(4)}"
            os.rename(final, replaced)
        os.rename(temporary, final)
        if self.durable:
            try:
                fsync_directory(str(self.root))
            except OSError:
                # Not known durable, so not committed: take it back out of sight (the
                # caller deletes the temporary), or a checkpoint reported as failed would
                # be the one restore() picks.
                self._unpublish(final, temporary, replaced)
                raise
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        try:
            self.point_latest(final.name)
        except OSError as exc:
            # Committed and durable already; `latest` is only a hint for tools, so a disk
            # too full for it must not report this checkpoint as failed (nor stop retention).
            logger.warning(
                "aiockpt: %s is committed, but %s was not updated: %s", final, LATEST_NAME, exc
            )
        return final

    def _unpublish(self, final: Path, temporary: Path, replaced: Path | None) -> None:
        try:
            os.rename(final, temporary)
            if replaced is not None:
                os.rename(replaced, final)
        except OSError as exc:  # the disk is failing; the next open() sorts it out
            logger.warning("aiockpt: could not take back %s after a failed fsync: %s", final, exc)

    def point_latest(self, name: str) -> None:
        current = self.latest_name()
        current_step = parse_step_dir(current) if current else None
        new_step = parse_step_dir(name)
        moves_back = current_step is not None and new_step is not None and current_step > new_step
        if moves_back and (self.root / str(current)).exists():
            return  # never move the pointer backwards to an older step
        write_file_atomically(
            str(self.root / LATEST_NAME), f"{name}\n".encode(), durable=self.durable
        )

    def latest_name(self) -> str | None:
        try:
            return (self.root / LATEST_NAME).read_text().strip() or None
        except FileNotFoundError:
            return None

    # -- retention ----------------------------------------------------------------------
    def retain(self, keep_last: int | None) -> list[Path]:
        """Delete all but the newest ``keep_last`` committed checkpoints; returns what went."""
        if keep_last is None:
            return []
        committed = list_checkpoints(self.root)
        doomed = committed[: max(len(committed) - keep_last, 0)]
        removed = []
        for info in doomed:
            self.remove(info.path)
            removed.append(info.path)
        return removed

    def remove(self, path: Path) -> None:
        # Rename first: a directory half-deleted under its step name would look torn.
        trash = self.root / f".trash-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, trash)
        if self.durable:
            fsync_directory(str(self.root))
        shutil.rmtree(trash, ignore_errors=True)
