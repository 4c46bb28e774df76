"""One checkpoint at a path the caller names: the storage of a path-level save.

Frameworks that own their paths and retention (Lightning's ``ModelCheckpoint``, ...) save
each checkpoint to a path of their choosing. ``PathStorage`` keeps the commit rule of
every backend there, with no step directories, ``latest``, retention or lock:

- the checkpoint is written into a temporary sibling, ``.tmp-<name>-p<pid>-<hex>``, and
  published by the commit primitive (``publish.publish_directory``): manifest last, a
  checkpoint already at the path renamed aside, the new one renamed in, the parent
  fsync'd. A crash at any instant leaves the old or the new checkpoint at the path, or
  (between the two renames) the old one as ``.trash-replace-<name>-<hex>`` next to it,
  which ``resolve_checkpoint`` (and so ``aiockpt.load``) reads instead;
- a path that holds anything but an aiockpt checkpoint (a file, a link, a non-empty
  directory without an aiockpt manifest) is refused before anything is touched;
- what a dead writer left next to the path (temporaries of processes that are gone,
  replaced copies once a newer checkpoint is at the path) is deleted by the next commit
  to that path.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path, PurePath

import aiofiles.os

from .._format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from ..errors import ConfigError
from .base import CheckpointInfo, WriterState
from .fileio import fsync_directory, open_regular, read_small_file, write_pieces
from .local import LocalFile, files_size
from .publish import publish_directory, replaced_copies

__all__ = [
    "PathStorage",
    "check_destination",
    "is_checkpoint",
    "remove_checkpoint",
    "resolve_checkpoint",
]

# What every aiockpt manifest starts with (its first field, written compactly).
_MANIFEST_START = b'{"format":"aiockpt"'


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory holding an aiockpt manifest (checked by its first
    bytes only: whether it is valid is for a reader to find out)."""
    try:
        fd, _ = open_regular(path / MANIFEST_NAME)
    except OSError:
        return False
    try:
        return os.pread(fd, len(_MANIFEST_START), 0) == _MANIFEST_START
    except OSError:
        return False
    finally:
        os.close(fd)


def check_destination(path: Path) -> None:
    """Refuse a path that a save must not replace: anything but nothing, an empty
    directory, or an aiockpt checkpoint.

    Raises:
        ConfigError: ``path`` is a file, a link or something else that is not a
            directory, or a non-empty directory without an aiockpt manifest.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot save to {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "a file"
        raise ConfigError(
            f"cannot save to {path}: it is {kind}, not an aiockpt checkpoint directory, and a "
            "save would replace it; choose another path or remove it first"
        )
    if is_checkpoint(path):
        return
    try:
        empty = not any(True for _ in os.scandir(path))
    except FileNotFoundError:
        return  # another save to the path just moved it aside: as good as absent
    except OSError as exc:
        raise ConfigError(f"cannot save to {path}: {exc.strerror or exc}") from exc
    # Looked at again: another save to the path may have renamed its checkpoint in
    # between the two looks above.
    if not empty and not is_checkpoint(path):
        raise ConfigError(
            f"cannot save to {path}: it is a directory that holds other files and no aiockpt "
            "checkpoint, and a save would replace it whole; choose another path or empty it"
        )


def resolve_checkpoint(path: Path) -> Path:
    """Where the checkpoint saved at ``path`` is: ``path`` itself, or, when a save that
    replaced it was killed between its two renames, the old copy moved aside."""
    if os.path.lexists(path):
        return path
    copies = [c for c in replaced_copies(path) if is_checkpoint(c)]
    if not copies:
        return path
    return max(copies, key=lambda copy: copy.stat().st_mtime)


def remove_checkpoint(path: Path, *, durable: bool = True) -> bool:
    """Delete the checkpoint at ``path``, hiding it first (one rename), and any copy a
    killed save left of it; whether there was one.

    Raises:
        ConfigError: ``path`` holds something other than an aiockpt checkpoint.
    """
    check_destination(path)
    doomed = [path, *replaced_copies(path)] if os.path.lexists(path) else replaced_copies(path)
    for victim in doomed:
        trash = victim.parent / f".trash-{victim.name}-{secrets.token_hex(4)}"
        try:
            os.rename(victim, trash)
        except FileNotFoundError:
            continue
        if durable:
            fsync_directory(str(victim.parent))
        shutil.rmtree(trash, ignore_errors=True)
    return bool(doomed)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class PathStorage:
    """The checkpoint at ``final`` (see the module docstring): begin, write, commit."""

    def __init__(self, final: str | os.PathLike[str], *, durable: bool) -> None:
        self.final = Path(os.path.abspath(final))
        self.root = self.final.parent
        self.durable = durable
        self._temporaries = re.compile(
            re.escape(f".tmp-{self.final.name}-p") + r"(\d+)-[0-9a-f]{8}"
        )

    # -- no lock: the caller owns the path ----------------------------------------------
    def open(self) -> None:
        """Check, touching nothing, that the path can take a checkpoint (``make_parents``
        makes the missing parent directories once the state is captured).

        Raises:
            ConfigError: the path holds something else, or a parent is not a directory.
        """
        check_destination(self.final)
        for parent in self.final.parents:  # the nearest one that exists must be a directory
            if os.path.lexists(parent):
                if not parent.is_dir():
                    raise ConfigError(
                        f"cannot save to {self.final}: {parent} is a file, so no directory "
                        "can be made there; choose a path under a directory"
                    )
                break

    def make_parents(self) -> None:
        """Make the missing parent directories now: callers (Lightning's ``save_last=
        "link"``) put files beside a checkpoint as soon as its save returns."""
        self.root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        pass

    def probe_writer(self) -> WriterState:
        return WriterState(False)  # a path-level save takes no lock to be seen by

    # -- writing ------------------------------------------------------------------------
    async def begin(self, step: int, shared: str | None = None) -> Path:
        del step, shared  # one process writes it; the path names it
        path = self.root / f".tmp-{self.final.name}-p{os.getpid()}-{secrets.token_hex(4)}"
        await aiofiles.os.makedirs(self.root, exist_ok=True)
        await aiofiles.os.mkdir(path)
        return path

    def shared_temporary(self, step: int, shared: str) -> Path:
        return self.root / f".tmp-{self.final.name}-{shared}"

    def write_chunk(
        self,
        temporary: PurePath,
        name: str,
        data: memoryview,
        ranges: Sequence[tuple[int, int]],
        room: memoryview | None = None,
    ) -> list[int]:
        return write_pieces(str(temporary / name), data, ranges, durable=self.durable, room=room)

    def make_durable(self, temporary: PurePath) -> None:
        if self.durable:
            fsync_directory(str(temporary))

    async def commit(self, temporary: PurePath, step: int, manifest: bytes) -> Path:
        # Checked again: something may have been put at the path since save() looked.
        await aiofiles.os.wrap(check_destination)(self.final)
        final = await publish_directory(Path(temporary), self.final, manifest, durable=self.durable)
        await aiofiles.os.wrap(self._clear_leftovers)()
        return final

    def _clear_leftovers(self) -> None:
        """What killed saves of this path left: their temporaries, and old copies."""
        for copy in replaced_copies(self.final):
            shutil.rmtree(copy, ignore_errors=True)
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return
        for entry in entries:
            match = self._temporaries.fullmatch(entry.name)
            if match is not None and not _pid_alive(int(match.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)

    def abort(self, temporary: PurePath) -> None:
        shutil.rmtree(temporary, ignore_errors=True)

    def resumed_from(self, step: int) -> None:
        pass  # one checkpoint, no timeline of steps to supersede

    # -- reading ------------------------------------------------------------------------
    def list_committed(self) -> list[CheckpointInfo]:
        found = resolve_checkpoint(self.final)
        if not is_checkpoint(found):
            return []
        raw = read_small_file(found / MANIFEST_NAME, MAX_MANIFEST_BYTES)
        step = Manifest.parse(raw, str(found / MANIFEST_NAME)).step
        return [CheckpointInfo(step, found, files_size(found), found.stat().st_mtime)]

    def open_file(self, checkpoint: PurePath, name: str) -> LocalFile:
        fd, info = open_regular(Path(checkpoint) / name)
        return LocalFile(fd, info.st_size)

    # -- the caller keeps and deletes: no retention, no ``latest`` -----------------------
    def retain(self, keep_last: int | None) -> list[PurePath]:
        del keep_last  # the framework that names the paths decides what to keep
        return []

    def remove(self, checkpoint: PurePath) -> None:
        remove_checkpoint(Path(checkpoint), durable=self.durable)

    def remove_all(self, doomed: list[PurePath], survivors: list[CheckpointInfo]) -> list[PurePath]:
        del survivors  # no ``latest`` to move first
        return [p for p in doomed if remove_checkpoint(Path(p), durable=self.durable)]

    def latest_name(self) -> str | None:
        return None

    def point_latest(self, name: str | None, *, force: bool = False) -> None:
        pass  # a path holds one checkpoint: there is no ``latest`` to point
