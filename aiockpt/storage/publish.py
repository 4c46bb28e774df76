"""The commit primitive: make a written temporary checkpoint directory the one at a path.

Every local commit goes through ``publish_directory``: the step manager's (``step-<N>``
under the checkpoint directory, then ``latest`` and retention) and the path-level save's
(any directory the caller names). The order is what makes a crash at any instant leave a
loadable checkpoint at ``final``, or one that ``replaced_copies`` finds:

1. ``manifest.json`` written last (create-exclusive) and fsync'd;
2. the temporary directory fsync'd (the names of its files);
3. a checkpoint already at ``final`` renamed aside, to ``.trash-replace-<name>-<hex>``
   next to it (a crash here leaves the old one under that name: the step manager's
   ``open`` renames it back, a path-level ``load`` reads it from there);
4. the temporary renamed to ``final``;
5. the parent directory fsync'd: committed and durable (an fsync that fails takes the
   checkpoint back out of sight and puts the old one back, so a failure is never visible);
6. the replaced copy deleted.

The file operations are awaited through aiofiles (``commitio``) so the event loop stays
free for the next checkpoint's chunks while a commit waits on the disk.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

import aiofiles.os

from .._format.manifest import MANIFEST_NAME
from .commitio import create_file, fsync_directory_async

__all__ = ["REPLACED_PREFIX", "publish_directory", "replaced_copies"]

logger = logging.getLogger(__name__)

# The previous checkpoint at a path, moved aside while a new one takes its place.
REPLACED_PREFIX = ".trash-replace-"
# A rename into place fails with one of these when another writer's checkpoint landed at
# the path between our rename aside and our rename in; it is then moved aside too.
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST)
# Writers of one path in several processes can keep landing in between; after this many
# rounds the commit gives up (its temporary is deleted, nothing of it visible).
_MAX_ROUNDS = 8


def _aside(final: Path) -> Path:
    return final.parent / f"{REPLACED_PREFIX}{final.name}-{secrets.token_hex(4)}"


def replaced_copies(final: Path) -> list[Path]:
    """The copies of ``final`` moved aside by commits that have not finished (step 3).

    Only a crash between steps 3 and 4 leaves one while ``final`` is absent; any other
    one is a copy that its commit has yet to delete.
    """
    pattern = re.compile(re.escape(REPLACED_PREFIX + final.name) + r"-[0-9a-f]{8}")
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return []
    return [
        Path(entry.path)
        for entry in entries
        if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
    ]


async def publish_directory(
    temporary: Path, final: Path, manifest: bytes, *, durable: bool
) -> Path:
    """Write ``manifest`` into ``temporary`` and make it the checkpoint at ``final``.

    Args:
        temporary: a directory next to ``final`` holding every data file, durable.
        final: where the checkpoint is committed; a checkpoint there is replaced.
        manifest: the manifest's bytes, written last.
        durable: fsync the manifest and both directories (False: survive a crash of the
            process, not of the machine).

    Returns:
        ``final``, once committed (and durable when ``durable``).

    Raises:
        OSError: a step failed; nothing new is visible at ``final`` (the caller deletes
            ``temporary``) and a replaced checkpoint is back in its place.
    """
    await create_file(temporary / MANIFEST_NAME, manifest, durable=durable)
    if durable:
        await fsync_directory_async(temporary)
    replaced: list[Path] = []
    for round_ in range(_MAX_ROUNDS):
        if await aiofiles.os.path.exists(final):
            # Re-saving: move the old one aside; a crash here leaves it under that name.
            aside = _aside(final)
            try:
                await aiofiles.os.rename(final, aside)
                replaced.append(aside)
            except FileNotFoundError:
                pass  # another writer of the same path moved it first
        try:
            await aiofiles.os.rename(temporary, final)
            break
        except OSError as exc:
            if exc.errno not in _TAKEN or round_ == _MAX_ROUNDS - 1:
                await _put_back(final, replaced)
                raise
    if durable:
        try:
            await fsync_directory_async(final.parent)
        except OSError:
            # Not known durable, so not committed: take it back out of sight (the caller
            # deletes the temporary), or a checkpoint reported as failed would be the one
            # a reader picks.
            await _unpublish(final, temporary, replaced)
            raise
    for copy in replaced:
        await aiofiles.os.wrap(shutil.rmtree)(copy, ignore_errors=True)  # bulk: a thread
    return final


async def _unpublish(final: Path, temporary: Path, replaced: list[Path]) -> None:
    try:
        await aiofiles.os.rename(final, temporary)
    except OSError as exc:  # the disk is failing; the next open() sorts it out
        logger.warning("could not take back %s after a failed fsync: %s", final, exc)
        return
    await _put_back(final, replaced)


async def _put_back(final: Path, replaced: list[Path]) -> None:
    """The newest replaced copy goes back to ``final``; older ones (another writer's) go."""
    if not replaced:
        return
    try:
        await aiofiles.os.rename(replaced[-1], final)
    except OSError as exc:
        logger.warning("could not put %s back at %s: %s", replaced[-1], final, exc)
        return
    for copy in replaced[:-1]:
        await aiofiles.os.wrap(shutil.rmtree)(copy, ignore_errors=True)
