"""The writer lock of an object store: a lock object created conditionally, kept alive
by a heartbeat, taken over from a writer whose lease ran out.

An object store has no flock that dies with its process. Instead the writer creates
``.aiockpt.lock`` only if it is absent (If-None-Match), holding its identity, and rewrites
it every ``lease_s / 4`` seconds, each time only if it is still the version this writer
wrote (If-Match). A second writer finds the object and is refused while the lease is
fresh; once a writer has not renewed it for ``lease_s`` (it died), a successor replaces
exactly that stale version (If-Match again), so two successors cannot both win. A writer
whose renewal is refused has lost the lock and commits nothing more.

The lease is judged by the store's own clock (the object's last-modified time against a
fresh write's), so clock skew between machines does not matter. A holder that ran on this
machine (same boot, same pid namespace) and whose process is gone is taken over at once,
as a local flock would be released when its process died.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..errors import DirectoryLockedError
from .base import WriterState
from .s3client import access_errors, is_missing, is_refused_write

if TYPE_CHECKING:
    from obstore.store import S3Store

__all__ = ["DEFAULT_LEASE_S", "LeaseLock"]

DEFAULT_LEASE_S = 60.0
# The lock object is tiny; anything bigger under its name is not ours.
_MAX_LOCK_BYTES = 4096

logger = logging.getLogger(__name__)


class LeaseLock:
    """The lock object ``key`` in ``store``, held by this process while ``held``."""

    def __init__(self, store: S3Store, key: str, where: str, lease_s: float | None = None):
        self.store = store
        self.key = key
        self.where = where
        self.lease_s = DEFAULT_LEASE_S if lease_s is None else lease_s
        self.identity = {
            "host": socket.gethostname(),
            "machine": _machine(),
            "pid": os.getpid(),
            "token": secrets.token_hex(8),
            "lease_s": self.lease_s,
        }
        self._etag: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lost = False

    # -- taking and giving back -----------------------------------------------------------
    def acquire(self) -> None:
        """Create the lock object, or take over a stale one; DirectoryLockedError while
        another writer's lease is fresh."""
        import obstore

        payload = self._payload()
        with access_errors(self.where):
            try:
                self._etag = obstore.put(self.store, self.key, payload, mode="create")["e_tag"]
            except Exception as exc:
                if not is_refused_write(exc):
                    raise
                self._take_over(payload)
        self._lost = False
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._renew_until_stopped, name="aiockpt-lock-lease", daemon=True
        )
        self._heartbeat.start()

    def _take_over(self, payload: bytes) -> None:
        import obstore

        holder, etag, age = self._read()
        # Judged by its age alone: a lock object we cannot parse is refused while fresh too.
        fresh = age is not None and age < self.lease_s
        if fresh and holder is not None and self._died_here(holder):
            fresh = False  # its process is gone: no need to wait for the lease to run out
        if fresh:
            raise DirectoryLockedError(
                f"{self.where} is being written by another process ({_describe(holder)}, "
                f"lease renewed {age:.0f} s ago); give each run its own location, or stop "
                f"the other writer (its lease runs out {self.lease_s:.0f} s after it dies)"
            )
        try:
            mode: Any = {"e_tag": etag} if etag else "create"
            self._etag = obstore.put(self.store, self.key, payload, mode=mode)["e_tag"]
        except Exception as exc:
            if is_refused_write(exc):  # another successor was faster
                raise DirectoryLockedError(
                    f"{self.where}: another writer took over the stale lock first; give "
                    "each run its own location"
                ) from exc
            raise
        logger.warning("%s: took over the lock of a dead writer (%s)", self.where, holder)

    def _died_here(self, holder: dict[str, Any]) -> bool:
        """Was the holder a process of this machine (and pid namespace) that is gone?"""
        pid = holder.get("pid")
        here = self.identity["machine"]
        if not here or holder.get("machine") != here or not isinstance(pid, int):
            return False
        if pid == os.getpid():
            return False  # this process holds it (another checkpointer of ours)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # alive, under another user
        return False

    def release(self) -> None:
        """Stop renewing and delete the lock object, if it is still this writer's."""
        import obstore

        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._etag is None:
            return
        try:
            _, etag, _ = self._read(store_clock=False)
            if etag == self._etag:
                obstore.delete(self.store, self.key)
        except Exception as exc:  # the lease runs out by itself
            logger.warning("%s: could not remove the lock object: %s", self.where, exc)
        self._etag = None

    @property
    def held(self) -> bool:
        """Still this writer's: acquired, and no renewal refused since."""
        return self._etag is not None and not self._lost

    # -- the lease ------------------------------------------------------------------------
    def _renew_until_stopped(self) -> None:
        import obstore

        while not self._stop.wait(self.lease_s / 4):
            try:
                mode: Any = {"e_tag": self._etag}
                self._etag = obstore.put(self.store, self.key, self._payload(), mode=mode)["e_tag"]
            except Exception as exc:
                if is_refused_write(exc) and self._renewed_anyway():
                    continue  # our own renewal landed, its answer was lost: retried, refused
                if is_refused_write(exc) or is_missing(exc):
                    self._lost = True
                    logger.error("%s: the writer lock was taken over: %s", self.where, exc)
                    return
                # A passing network failure: the lease holds until it runs out.
                logger.warning("%s: could not renew the writer lock: %s", self.where, exc)

    def _renewed_anyway(self) -> bool:
        """Is the lock object still ours (our token), only of a version we did not hear
        of? Then that version is ours to renew next."""
        try:
            holder, etag, _ = self._read(store_clock=False)
        except Exception:
            return False
        if holder is None or holder.get("token") != self.identity["token"] or etag is None:
            return False
        self._etag = etag
        return True

    def _payload(self) -> bytes:
        return json.dumps(self.identity, sort_keys=True).encode()

    def _read(
        self, store_clock: bool = True
    ) -> tuple[dict[str, Any] | None, str | None, float | None]:
        """(holder, etag, seconds since it was last renewed) of the lock object; a holder
        of None when it is missing or not ours. The age is measured on the store's clock
        (a writer may write a probe object), else on the local one."""
        import obstore

        try:
            result = obstore.get(self.store, self.key)
            meta = result.meta
            raw = bytes(result.bytes()) if meta["size"] <= _MAX_LOCK_BYTES else b""
        except Exception as exc:
            if is_missing(exc):
                return None, None, None
            raise
        try:
            holder = json.loads(raw)
            if not isinstance(holder, dict):
                holder = None
        except ValueError:
            holder = None
        modified = meta["last_modified"]
        age = self._store_age(modified) if store_clock else time.time() - modified.timestamp()
        return holder, meta["e_tag"], age

    def _store_age(self, modified: datetime) -> float:
        # A fresh object's last-modified time is the store's "now".
        import obstore

        probe = f"{self.key}.clock-{secrets.token_hex(4)}"
        try:
            obstore.put(self.store, probe, b"")
            now = obstore.head(self.store, probe)["last_modified"]
            obstore.delete(self.store, probe)
        except Exception:  # no write permission for the probe: the local clock
            return time.time() - modified.timestamp()
        return (now - modified).total_seconds()

    def probe(self) -> WriterState:
        """Is a live writer holding the lock (a lease fresher than its length)?"""
        try:
            holder, _, age = self._read(store_clock=False)  # tools only look: no writes
        except Exception:
            return WriterState(False)
        if holder is None or age is None:
            return WriterState(False)
        lease = holder.get("lease_s", self.lease_s)
        lease = lease if isinstance(lease, (int, float)) else self.lease_s
        if age >= lease or self._died_here(holder):
            return WriterState(False)
        pid = holder.get("pid")
        return WriterState(True, pid if isinstance(pid, int) else None)


def _machine() -> str:
    """This boot of this machine and this pid namespace: a pid means the same process only
    where all three match (a host name alone repeats across containers)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot = file.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""  # not Linux: no takeover before the lease runs out
    return f"{boot}/{namespace}"


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a lock object aiockpt cannot read"
    return f"pid {holder.get('pid')} on {holder.get('host')}"
