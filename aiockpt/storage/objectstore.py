"""The object-store backend of the storage seam (S3 and S3-compatible servers).

An object store has no rename and no directories, so the commit protocol keeps its
promise (FORMAT.md section 10) by naming instead::

    s3://bucket/run-1/
      .aiockpt.lock                            the writer lock (objectlock.py)
      latest                                   "step-200\\n": a hint, written after a commit
      step-200/manifest.json                   the commit marker, created only if absent
      step-200/.data-3f2a9c1e0b7d4a65/data-r00000-c00000.bin
      step-300/.data-77aa01c29e3f5b10/...      data of an attempt without a manifest:
                                               invisible, deleted by the next writer

- Each attempt to write a step writes its data objects under a key of its own
  (``.data-<token>/``), so no upload ever overwrites a committed checkpoint's bytes, and
  the leftovers of a crashed attempt are told apart from the data a manifest names.
- The manifest is written last, after every data object is acknowledged (an acknowledged
  PUT is durable), with If-None-Match: it never replaces a manifest that exists. It
  carries the attempt's token as object metadata (``aiockpt-data``), which is how a
  reader finds the data objects of the committed attempt.
- Listing trusts manifests alone; the newest checkpoint is the largest step.
- Deletion hides first: the manifest goes, then the data objects.
- The lead's ``open`` deletes what no manifest names (data of dead attempts) and the
  unfinished multipart uploads left under the prefix, since the writer that made them
  is dead (the lock says so).

Uploads run on the writer threads, one data file per call, each a multipart upload of
parts sent concurrently straight from the staging buffer; the client releases the GIL for
the whole transfer. Reads are ranged GETs of bounded windows, each copied into the
caller's buffer as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from .._format.manifest import MANIFEST_NAME
from .._util.location import ObjectPath
from ..errors import DirectoryLockedError
from .base import CheckpointInfo, WriterState, retention_split
from .fileio import checksum
from .local import LATEST_NAME, LOCK_NAME, parse_step_dir, step_dir_name
from .objectlock import LeaseLock
from .s3client import access_errors, connect, is_missing, is_refused_write, missing_bucket

if TYPE_CHECKING:
    from obstore.store import S3Store

__all__ = ["ObjectFile", "ObjectStoreStorage"]

DATA_PREFIX = ".data-"
# The object metadata naming the committed attempt's data prefix.
DATA_ATTRIBUTE = "aiockpt-data"
# Tokens are ours (hex) or the ranks' shared token; a manifest's metadata naming anything
# else is not trusted to build a key.
_TOKEN = re.compile(r"[0-9A-Za-z_-]{1,64}")
# Multipart part size and the parts of one data file in flight at once. Writer threads
# times this bound the requests in flight, as the semaphore bounds the chunks.
PART_BYTES = 32 * 2**20
PARTS_IN_FLIGHT = 4
# One ranged GET never asks for more than this, so a reader thread holds at most this
# much beyond its destination while a large tensor streams in.
READ_WINDOW = 32 * 2**20
_LATEST_MAX_BYTES = 64

logger = logging.getLogger(__name__)


def _obstore() -> Any:
    import obstore

    return obstore


class ObjectFile:
    """A committed object, read by ranged GETs (from several reader threads at once)."""

    def __init__(self, store: S3Store, key: str, size: int, where: str) -> None:
        self.store = store
        self.key = key
        self.size = size
        self.where = where

    def read_into(self, views: Sequence[memoryview], offset: int) -> None:
        obstore = _obstore()
        position = offset
        for view in views:
            done = 0
            while done < len(view):
                length = min(READ_WINDOW, len(view) - done)
                if position + length > self.size:
                    raise EOFError(f"{self.where} ends at byte {self.size}")
                with _unreadable(self.where), access_errors(self.where):
                    data = obstore.get_range(self.store, self.key, start=position, length=length)
                got = memoryview(data).cast("B")
                if len(got) != length:
                    raise EOFError(f"{self.where}: asked for {length} bytes, got {len(got)}")
                view[done : done + length] = got
                done += length
                position += length

    def close(self) -> None:
        pass  # nothing is held open between requests


@contextlib.contextmanager
def _unreadable(where: str) -> Iterator[None]:
    """Turn a transfer that failed for good (after the client's retries) into an OSError
    naming the object, which readers report as that checkpoint being unreadable."""
    from obstore.exceptions import BaseError

    try:
        yield
    except BaseError as exc:
        raise OSError(f"{where}: the object store failed: {exc}") from exc


class ObjectStoreStorage:
    """One writer's view of an object-store prefix (``base.CheckpointStorage``)."""

    def __init__(self, root: ObjectPath, *, durable: bool, lead: bool = True) -> None:
        self.root = root
        # An acknowledged PUT is durable whatever this says; kept for the seam.
        self.durable = durable
        self.lead = lead
        self.store = connect(root)
        self._prefix = f"{root.key}/" if root.key else ""
        self._lock = LeaseLock(self.store, self._prefix + LOCK_NAME, str(root))
        self._resumed_from: int | None = None
        self._last_committed: int | None = None
        # The committed attempt of each checkpoint read, learnt from its manifest.
        self._attempts: dict[str, str] = {}

    # -- keys -------------------------------------------------------------------------------
    def _key(self, path: PurePath, name: str | None = None) -> str:
        key = path.key if isinstance(path, ObjectPath) else str(path)
        return f"{key}/{name}" if name else key

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        """Every object under ``prefix`` (a bucket's root when empty)."""
        obstore = _obstore()
        with access_errors(self.root):  # a missing bucket says NoSuchBucket: refused there
            return list(obstore.list(self.store, prefix=prefix or None).collect())

    def _scan(self) -> tuple[dict[int, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """(manifest object of each committed step, objects under each step-<N>/)."""
        manifests: dict[int, dict[str, Any]] = {}
        by_step: dict[str, list[dict[str, Any]]] = {}
        for meta in self._list(self._prefix.rstrip("/")):
            relative = meta["path"][len(self._prefix) :].split("/")
            step = parse_step_dir(relative[0]) if len(relative) > 1 else None
            if step is None:
                continue
            by_step.setdefault(relative[0], []).append(meta)
            if relative[1:] == [MANIFEST_NAME]:
                manifests[step] = meta
        return manifests, by_step

    def _delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            with access_errors(self.root):
                _obstore().delete(self.store, keys)

    # -- the writer lock --------------------------------------------------------------------
    def open(self) -> None:
        """Take the lock object (lead only) and delete a dead writer's leftovers."""
        if not self.lead:
            return
        try:
            self._lock.acquire()
        except FileNotFoundError as exc:  # a PUT answered 404 without saying why
            raise missing_bucket(self.root, exc) from exc
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._lock.release()

    def probe_writer(self) -> WriterState:
        return self._lock.probe()

    def _recover(self) -> None:
        doomed = [meta["path"] for metas in self._unnamed().values() for meta in metas]
        if doomed:
            logger.info("%s: deleting %d objects of unfinished checkpoints", self.root, len(doomed))
        self._delete(doomed)
        self._abort_unfinished_uploads()

    def _unnamed(self) -> dict[str, list[dict[str, Any]]]:
        """The objects under ``step-<N>/`` that no manifest names, by the part of their key
        below the prefix that groups an attempt (``step-<N>/.data-<token>``)."""
        manifests, by_step = self._scan()
        found: dict[str, list[dict[str, Any]]] = {}
        for directory, objects in by_step.items():
            step = parse_step_dir(directory)
            attempt = self._attempt_of(self.root / directory) if step in manifests else None
            for meta in objects:
                parts = meta["path"][len(self._prefix) :].split("/")
                if parts[1:] == [MANIFEST_NAME] or (attempt and parts[1] == DATA_PREFIX + attempt):
                    continue
                found.setdefault("/".join(parts[:2]), []).append(meta)
        return found

    def leftovers(self) -> list[tuple[ObjectPath, int | None, int]]:
        """(where, step, bytes) of each attempt that no manifest names: being written by
        a live writer, or left by a dead one (its next ``open`` deletes them)."""
        return [
            (self.root / group, parse_step_dir(group.split("/")[0]), sum(m["size"] for m in metas))
            for group, metas in sorted(self._unnamed().items())
        ]

    def _abort_unfinished_uploads(self) -> None:
        """Abort the multipart uploads a dead writer left under this prefix (invisible,
        but billed). The client has no call for it; botocore, where installed, does."""
        try:
            from .s3uploads import abort_unfinished_uploads
        except ImportError:
            return
        abort_unfinished_uploads(self.root.bucket, self._prefix)

    # -- writing one checkpoint -------------------------------------------------------------
    async def begin(self, step: int, shared: str | None = None) -> ObjectPath:
        """A fresh data prefix for ``step`` (nothing is created: objects need no folder)."""
        return self.shared_temporary(step, shared or secrets.token_hex(8))

    def shared_temporary(self, step: int, shared: str) -> ObjectPath:
        if not _TOKEN.fullmatch(shared):
            raise ValueError(f"not a data prefix token: {shared!r}")
        return self.root / step_dir_name(step) / f"{DATA_PREFIX}{shared}"

    def write_chunk(
        self,
        temporary: PurePath,
        name: str,
        data: memoryview,
        ranges: Sequence[tuple[int, int]],
        room: memoryview | None = None,
    ) -> list[int]:
        del room  # no direct I/O here: the client reads the buffer as it is
        sums = [checksum(data[offset : offset + length]) for offset, length in ranges]
        view = data.cast("B") if data.format != "B" else data
        with access_errors(self.root):
            _obstore().put(
                self.store,
                self._key(temporary, name),
                view,
                use_multipart=len(view) > PART_BYTES,
                chunk_size=PART_BYTES,
                max_concurrency=PARTS_IN_FLIGHT,
            )
        return sums

    def make_durable(self, temporary: PurePath) -> None:
        pass  # every acknowledged PUT is durable already

    def abort(self, temporary: PurePath) -> None:
        try:
            self._delete(m["path"] for m in self._list(self._key(temporary)))
        except Exception as exc:  # the next writer's open deletes them
            logger.warning("could not delete the data of %s: %s", temporary, exc)

    def resumed_from(self, step: int) -> None:
        self._resumed_from = step

    async def commit(self, temporary: PurePath, step: int, manifest: bytes) -> ObjectPath:
        """Create the manifest (If-None-Match), which commits the checkpoint; then the
        ``latest`` hint, and after a restore, the steps above the one restored go."""
        return await asyncio.get_running_loop().run_in_executor(
            None, self._commit, temporary, step, manifest
        )

    def _commit(self, temporary: PurePath, step: int, manifest: bytes) -> ObjectPath:
        if not self._lock.held:
            raise DirectoryLockedError(
                f"{self.root}: this writer lost its lock (its lease ran out and another "
                "writer took over), so it commits nothing more; stop one of the writers"
            )
        obstore = _obstore()
        final = self.root / step_dir_name(step)
        key = self._key(final, MANIFEST_NAME)
        attempt = temporary.name.removeprefix(DATA_PREFIX)
        attributes = {"Content-Type": "application/json", DATA_ATTRIBUTE: attempt}
        replaced: str | None = None
        try:
            with access_errors(self.root):
                try:
                    obstore.put(self.store, key, manifest, mode="create", attributes=attributes)
                except Exception as exc:
                    if not is_refused_write(exc):
                        raise
                    # Saving a step again (or our own create, retried after its answer
                    # was lost): hide the old copy first, then create ours; a crash in
                    # between leaves the older steps to restore.
                    replaced = self._attempt_of(final)
                    obstore.delete(self.store, key)
                    obstore.put(self.store, key, manifest, mode="create", attributes=attributes)
        except BaseException:
            # The create may have reached the store although its answer did not: the
            # caller deletes this attempt's data, so a manifest naming it must go first,
            # or a checkpoint reported as failed would be listed, and refused.
            self._withdraw(final, attempt)
            raise
        self._attempts[str(final)] = attempt
        if replaced is not None and replaced != attempt:
            self.abort(final / f"{DATA_PREFIX}{replaced}")
        self._last_committed = step
        try:
            self.point_latest(final.name, force=self._resumed_from is not None)
        except Exception as exc:  # committed already: `latest` is only a hint
            logger.warning("%s is committed, but %s was not updated: %s", final, LATEST_NAME, exc)
        resumed, self._resumed_from = self._resumed_from, None
        if resumed is not None:
            floor = min(step, resumed)
            for info in self.list_committed():
                if info.step > floor and info.step != step:
                    # No rename to move it aside: a step of the abandoned timeline goes.
                    logger.warning("%s is above the step this run resumed from; deleted", info.path)
                    self.remove(info.path)
        return final

    def _withdraw(self, checkpoint: ObjectPath, attempt: str) -> None:
        """Delete the manifest of ``checkpoint`` if it names ``attempt`` (best effort)."""
        try:
            if self._attempt_of(checkpoint) == attempt:
                _obstore().delete(self.store, self._key(checkpoint, MANIFEST_NAME))
        except Exception as exc:  # absent, or the store is unreachable: nothing to add
            if not is_missing(exc):
                logger.warning("could not withdraw %s: %s", checkpoint, exc)

    # -- reading ----------------------------------------------------------------------------
    def list_committed(self) -> list[CheckpointInfo]:
        manifests, by_step = self._scan()
        found = []
        for step, meta in manifests.items():
            directory = step_dir_name(step)
            size = sum(m["size"] for m in by_step.get(directory, []))
            found.append(
                CheckpointInfo(step, self.root / directory, size, meta["last_modified"].timestamp())
            )
        return sorted(found, key=lambda info: info.step)

    def _attempt_of(self, checkpoint: PurePath) -> str | None:
        """The data prefix token the manifest of ``checkpoint`` names (metadata)."""
        obstore = _obstore()
        with access_errors(self.root):
            result = obstore.get(
                self.store, self._key(checkpoint, MANIFEST_NAME), options={"head": True}
            )
        token = result.attributes.get(DATA_ATTRIBUTE)
        return token if isinstance(token, str) and _TOKEN.fullmatch(token) else None

    def open_file(self, checkpoint: PurePath, name: str) -> ObjectFile:
        """An object of ``checkpoint`` with its size (a HEAD), for ranged reads.

        Raises FileNotFoundError when it is missing (so is a data file whose manifest
        names no valid data prefix), and StorageAccessError when access is refused."""
        obstore = _obstore()
        where = f"{checkpoint}/{name}"
        with _unreadable(where), access_errors(self.root):
            if name == MANIFEST_NAME:
                result = obstore.get(
                    self.store, self._key(checkpoint, name), options={"head": True}
                )
                token = result.attributes.get(DATA_ATTRIBUTE)
                if isinstance(token, str) and _TOKEN.fullmatch(token):
                    self._attempts[str(checkpoint)] = token
                return ObjectFile(
                    self.store, self._key(checkpoint, name), result.meta["size"], where
                )
            attempt = self._attempts.get(str(checkpoint)) or self._attempt_of(checkpoint)
            if attempt is None:
                raise FileNotFoundError(f"{checkpoint}: its manifest names no data prefix")
            key = self._key(checkpoint, f"{DATA_PREFIX}{attempt}/{name}")
            meta = obstore.head(self.store, key)
            return ObjectFile(self.store, key, meta["size"], where)

    # -- retention and the ``latest`` hint --------------------------------------------------
    def retain(self, keep_last: int | None) -> list[PurePath]:
        """Delete all but the newest ``keep_last`` committed checkpoints up to this writer's
        last commit (never that one, nor anything above it); what went."""
        if keep_last is None:
            return []
        doomed, survivors = retention_split(self.list_committed(), keep_last, self._last_committed)
        return self.remove_all([info.path for info in doomed], survivors)

    def remove_all(self, doomed: list[PurePath], survivors: list[CheckpointInfo]) -> list[PurePath]:
        """Remove ``doomed``, first pointing ``latest`` at the newest of ``survivors`` (or
        removing it) unless it names one of them already."""
        if not doomed:
            return []
        if self.latest_name() not in {info.path.name for info in survivors}:
            self.point_latest(survivors[-1].path.name if survivors else None, force=True)
        for path in doomed:
            self.remove(path)  # one already gone (a live writer's retention) is no error
        return list(doomed)

    def remove(self, checkpoint: PurePath) -> None:
        """Delete the manifest (the checkpoint is gone), then every object under it."""
        obstore = _obstore()
        with access_errors(self.root):
            try:
                obstore.delete(self.store, self._key(checkpoint, MANIFEST_NAME))
            except Exception as exc:
                if not is_missing(exc):
                    raise
        self._attempts.pop(str(checkpoint), None)
        self._delete(m["path"] for m in self._list(self._key(checkpoint)))

    def latest_name(self) -> str | None:
        obstore = _obstore()
        try:
            with access_errors(self.root):
                result = obstore.get(self.store, self._prefix + LATEST_NAME)
                if result.meta["size"] > _LATEST_MAX_BYTES:
                    return None
                text = bytes(result.bytes()).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        name = text.strip()
        return name if parse_step_dir(name) is not None else None

    def point_latest(self, name: str | None, *, force: bool = False) -> None:
        obstore = _obstore()
        key = self._prefix + LATEST_NAME
        with access_errors(self.root):
            if name is None:
                try:
                    obstore.delete(self.store, key)
                except Exception as exc:
                    if not is_missing(exc):
                        raise
                return
            if not force:
                current = self.latest_name()
                current_step = parse_step_dir(current) if current else None
                new_step = parse_step_dir(name)
                if (
                    current_step is not None
                    and new_step is not None
                    and current_step > new_step
                    and current_step in {i.step for i in self.list_committed()}
                ):
                    return  # never back to an older step while a newer one exists
            obstore.put(self.store, key, f"{name}\n".encode())
