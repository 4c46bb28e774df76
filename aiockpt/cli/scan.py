"""Looking at a checkpoint directory from the outside: the live writer, leftovers, paths.

Tools read a directory that a training job may be writing at the same moment, so nothing
here takes the writer lock for longer than a probe, and every listing tolerates entries
that vanish between ``scandir`` and ``stat`` (the writer's retention renames them away).
A path that cannot be what is asked for raises ``UsageError``; a directory without the
asked-for checkpoint raises ``NoCheckpointError``. Nothing here prints: the commands do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .._format.manifest import MANIFEST_NAME
from .._util.location import Location, ObjectPath
from ..errors import NoCheckpointError, UsageError
from ..storage import open_storage
from ..storage.base import WriterState
from ..storage.local import (
    SUPERSEDED_PREFIX,
    CheckpointInfo,
    files_size,
    parse_private_step,
    parse_step_dir,
)

__all__ = [
    "Leftover",
    "WriterState",
    "checkpoint_exists",
    "committed_checkpoints",
    "is_checkpoint",
    "not_a_directory",
    "probe_writer",
    "resolve_checkpoint",
    "scan_leftovers",
]


def probe_writer(root: Location) -> WriterState:
    """Is ``root`` being written by a live writer? Never blocks, never holds its lock."""
    return open_storage(root, durable=False).probe_writer()


def committed_checkpoints(root: Location) -> list[CheckpointInfo]:
    """``list_checkpoints`` that survives a live writer's retention deleting under it."""
    if isinstance(root, ObjectPath):
        # Listed by manifests in one pass: nothing is renamed away mid-listing there.
        return open_storage(root, durable=False).list_committed()
    if root.is_file():
        raise not_a_directory(root)
    if not root.is_dir():
        raise UsageError(
            f"{root}: no such directory",
            hint="pass the checkpoint directory (the Config's `directory`), e.g. checkpoints/",
        )
    storage = open_storage(root, durable=False)  # only looked at: no lock taken
    for _ in range(5):
        try:
            return storage.list_committed()
        except FileNotFoundError:
            continue  # a checkpoint was renamed away mid-listing; list again
    return storage.list_committed()


def checkpoint_exists(path: Location) -> bool:
    """Is the checkpoint ``path`` still there (not deleted by a live writer's retention)?

    Locally its directory exists; in an object store its manifest does."""
    if isinstance(path, Path):
        return path.exists()
    try:
        open_storage(path.parent, durable=False).open_file(path, MANIFEST_NAME).close()
    except FileNotFoundError:
        return False
    return True


def not_a_directory(path: Location) -> UsageError:
    """The error for a regular file given where a checkpoint (directory) is expected."""
    return UsageError(
        f"{path} is a file, not a checkpoint directory",
        hint=f"to bring a torch.save, safetensors or DCP checkpoint in: "
        f"`aiockpt import {path} --from torch --step N DIR`",
    )


@dataclass(frozen=True)
class Leftover:
    """A directory entry that is not a committed checkpoint (FORMAT.md section 1)."""

    path: Location
    kind: str  # "tmp" | "trash" | "trash-replace" | "superseded" | "no-manifest" | "latest.tmp"
    step: int | None
    nbytes: int

    def name_under(self, root: Location) -> str:
        """Its name below ``root`` (``.tmp-step-3-1a2b``; ``step-3/.data-<token>`` in an
        object store, where an attempt's data sit under the step)."""
        return str(self.path)[len(str(root)) + 1 :]

    def explain(self, writer: WriterState) -> str:
        live = writer.live
        if self.kind == "tmp":
            return "being written now" if live else "abandoned write of a dead writer"
        if self.kind == "trash":
            return "being deleted now" if live else "abandoned delete of a dead writer"
        if self.kind == "trash-replace":
            if live:
                return f"old copy of step-{self.step}, replaced right now"
            return (
                f"old copy of step-{self.step}; the next writer restores it "
                f"if step-{self.step} is gone"
            )
        if self.kind == "superseded":
            return (
                f"step-{self.step}, superseded: a run resumed from an older step has "
                "committed since; readers ignore it, the run deletes it once past step "
                f"{self.step}, `aiockpt prune` deletes it now"
            )
        if self.kind == "no-manifest":
            return "step directory without manifest.json: not a checkpoint, readers ignore it"
        return "half-written `latest` pointer" + ("" if live else " of a dead writer")


def scan_leftovers(root: Location) -> list[Leftover]:
    if isinstance(root, ObjectPath):
        # An object store's leftovers are attempts whose data no manifest names: no
        # reader sees them, and the next writer deletes them.
        from ..storage.objectstore import ObjectStoreStorage

        storage = open_storage(root, durable=False)
        assert isinstance(storage, ObjectStoreStorage)
        return [Leftover(path, "tmp", step, size) for path, step, size in storage.leftovers()]
    found = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for entry in entries:
        name = entry.name
        step: int | None = None
        if name.startswith(".trash-replace-"):
            kind = "trash-replace"
            step = parse_step_dir(name.removeprefix(".trash-replace-").rsplit("-", 1)[0])
        elif name.startswith(".trash-"):
            kind = "trash"
            step = parse_step_dir(name.removeprefix(".trash-").rsplit("-", 1)[0])
        elif name.startswith(SUPERSEDED_PREFIX):
            kind = "superseded"
            step = parse_private_step(name, SUPERSEDED_PREFIX)
        elif name.startswith(".tmp-"):
            kind = "tmp"
            step = parse_step_dir(name.removeprefix(".tmp-").rsplit("-", 1)[0])
        elif name == "latest.tmp":
            kind = "latest.tmp"
        elif parse_step_dir(name) is not None and not os.path.lexists(
            os.path.join(entry.path, MANIFEST_NAME)
        ):
            kind, step = "no-manifest", parse_step_dir(name)
        else:
            continue
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            nbytes = files_size(path) if is_dir else entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue  # deleted by the writer while we looked
        found.append(Leftover(path, kind, step, nbytes))
    return found


def resolve_checkpoint(path: Location, step: int | None = None) -> Location:
    """The checkpoint directory a user means by ``path`` (and ``--step``).

    ``path`` may be a checkpoint (``checkpoints/step-100``) or the directory holding them,
    in which case the newest committed one (or ``step``) is meant: the result is then not
    ``path``, which a command tells its user.
    """
    if step is not None:
        candidate = path / f"step-{step}"
        if is_checkpoint(candidate):
            return candidate
        steps = [info.step for info in committed_checkpoints(path)]
        raise NoCheckpointError(
            f"{path}: no committed checkpoint of step {step}",
            hint=f"committed steps: {steps or 'none'}; `aiockpt ls {path}` lists them",
        )
    if is_checkpoint(path):
        return path
    if isinstance(path, Path) and path.is_file():
        raise not_a_directory(path)
    if isinstance(path, Path) and not path.exists():
        raise UsageError(
            f"{path}: no such file or directory",
            hint="pass a checkpoint such as checkpoints/step-100, or the directory holding them",
        )
    committed = committed_checkpoints(path) if not isinstance(path, Path) or path.is_dir() else []
    if not committed:
        raise NoCheckpointError(
            f"{path}: not a checkpoint (no {MANIFEST_NAME}) and holds no committed step-N "
            "checkpoints",
            hint="pass a checkpoint such as checkpoints/step-100; `aiockpt ls DIR` lists them",
        )
    return committed[-1].path


def is_checkpoint(path: Location) -> bool:
    """Does ``path`` name a checkpoint itself (a manifest there), not a directory of them?"""
    if isinstance(path, Path):
        return (path / MANIFEST_NAME).exists()
    return parse_step_dir(path.name) is not None and checkpoint_exists(path)
