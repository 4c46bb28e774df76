"""Storage tiers: one capture feeds every tier due at its step.

The tiers, fastest first: ``memory`` (a tmpfs directory that survives a crash of the
process), ``primary`` (the Config's ``directory``) and ``remote`` (a slower location fed
from the primary). Each is a backend of the storage seam with its own lock, commit
protocol and retention.

How one checkpoint moves::

    capture ──pipeline──▶ entry tier (memory when configured, else primary): committed
        └─▶ promote to the next due tier: read its files through the seam, write them
            (each range's CRC-32C checked against the manifest), commit the same manifest
                └─▶ ... to the next one (remote is fed from the primary)

Why the entry is the memory tier for every checkpoint when it is configured (not only at
its own interval): staging memory is given back at memcpy speed whatever the step, and
every tier commits in capture order, because each tier's promotions take numbered turns.
A step that is due only to slower tiers passes through memory and counts towards its
``keep_last`` like any other.

Backpressure per tier: a copy into a tier holds a place in that tier's queue from capture
until it commits; when the queue is full a new checkpoint waits for a place (``block``)
or leaves that tier out (``skip``: counted in ``TierStats.skipped``). A checkpoint that a
copy reads from is protected from its tier's retention until the copy commits.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import mmap
import shutil
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._format.manifest import FileRecord
from .._util.bridge import Bridge
from .._util.location import Location
from .._util.shm import derived_memory_directory
from ..config import Config
from ..errors import ConfigError, CorruptCheckpointError, NoCheckpointError
from ..metrics import CheckpointerStats, CheckpointMetrics, TierStats
from ..storage import CheckpointStorage, open_storage
from ..storage.base import CheckpointInfo, retention_split
from .failures import AnyFuture
from .incremental import files_held_by_newest, share_into
from .reader import check_step, open_data_file, read_manifest
from .saver import Saver, checkpoint

__all__ = ["MEMORY", "PRIMARY", "REMOTE", "Plan", "Tier", "TierSet", "checkpoint_tiers"]

logger = logging.getLogger(__name__)

MEMORY, PRIMARY, REMOTE = "memory", "primary", "remote"
# Data files copied at once per promotion: each holds one file's bytes in memory.
_COPY_THREADS = 2
_PAGE = mmap.PAGESIZE


@dataclass(eq=False)
class Tier:
    """One tier: where it is, when it is due, and its queue of copies."""

    name: str
    store: CheckpointStorage
    interval_steps: int | None
    keep_last: int | None
    capacity: int  # copies into this tier queued or running at once
    block: bool  # a full queue makes a new checkpoint wait (else it leaves this tier out)
    stats: TierStats
    # Numbered turns: copies into this tier commit in capture order.
    issued: int = 0
    serving: int = 0
    done_turns: set[int] = field(default_factory=set)
    # Steps of this tier that a copy out of it still has to read.
    protected: collections.Counter[int] = field(default_factory=collections.Counter)
    last_committed: int | None = None

    def divides(self, step: int) -> bool:
        return self.interval_steps is None or step % self.interval_steps == 0


class _CopyBuffers:
    """Page-aligned buffers for the copier threads, kept between copies.

    A fresh anonymous mapping is paid for page by page as it is first written: measured
    on a VM, reading 256 MiB into a new one took 0.6-1.5 s and into a reused one
    0.06-0.16 s. So each buffer is kept (at most one per copier thread, each as large as
    the largest data file copied), and page alignment lets a durable target write it with
    direct I/O.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    def take(self, nbytes: int) -> mmap.mmap:
        padded = max(-(-nbytes // _PAGE) * _PAGE, _PAGE)
        with self._lock:
            fitting = [b for b in self._free if len(b) >= padded]
            if fitting:
                buffer = min(fitting, key=len)
                self._free.remove(buffer)
                return buffer
            if self._free:  # too small: replaced, so the pool never outgrows the threads
                self._free.pop().close()
        return mmap.mmap(-1, padded)

    def give_back(self, buffer: mmap.mmap) -> None:
        with self._lock:
            self._free.append(buffer)

    def release(self) -> None:
        with self._lock:
            for buffer in self._free:
                buffer.close()
            self._free.clear()


@dataclass(eq=False)
class Plan:
    """The tiers one checkpoint goes to, in order, and the turn it holds in each."""

    step: int
    chain: list[Tier]
    turns: dict[str, int]
    released: set[str] = field(default_factory=set)
    consumed: bool = False  # its persist coroutine took over its release


class TierSet:
    """The tiers of one Checkpointer. Plans are made on the caller's thread; copies,
    retention and draining run on the runtime's loop."""

    def __init__(self, config: Config, primary: CheckpointStorage, stats: CheckpointerStats):
        self.config = config
        self.stats = stats
        self._lock = threading.Lock()
        self._changed: asyncio.Condition | None = None
        self._outstanding = 0
        self._copiers = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="aiockpt-promote")
        self._buffers = _CopyBuffers()
        self.tiers: list[Tier] = []
        opened: list[CheckpointStorage] = []
        try:
            if config.memory is not None:
                location = memory_directory(config)
                # durable = False: fsync keeps nothing more on tmpfs, which a crash of the
                # machine empties anyway; the rename commit is what a process crash needs.
                store = open_storage(location, durable=False)
                _open_tier(store, "memory.directory", location)
                opened.append(store)
                self._add(
                    MEMORY,
                    store,
                    str(location),
                    config.memory.interval_steps,
                    config.memory.keep_last,
                    # The entry tier takes no copies: the pipeline's admission (max_async
                    # in flight) is its queue.
                    config.max_async,
                    block=True,
                )
            self._add(
                PRIMARY,
                primary,
                str(config.directory),
                config.interval_steps,
                config.keep_last,
                config.max_async,
                block=config.on_backpressure == "block",
            )
            if config.remote is not None:
                remote = config.remote
                assert remote.url is not None  # RemoteTier refuses a missing url
                store = open_storage(remote.url, durable=config.durable)
                _open_tier(store, "remote.url", remote.url)
                opened.append(store)
                self._add(
                    REMOTE,
                    store,
                    str(remote.url),
                    remote.interval_steps,
                    remote.keep_last,
                    remote.max_pending,
                    block=remote.on_backpressure == "block",
                )
        except BaseException:
            for store in opened:
                store.close()
            self._copiers.shutdown(wait=False)
            raise
        self._own = opened  # the stores this set opened (the primary is the Core's)

    def _add(
        self,
        name: str,
        store: CheckpointStorage,
        location: str,
        interval: int | None,
        keep_last: int | None,
        capacity: int,
        *,
        block: bool,
    ) -> None:
        stats = TierStats(name, location)
        self.stats.tiers[name] = stats
        self.tiers.append(Tier(name, store, interval, keep_last, capacity, block, stats))

    def get(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    @property
    def entry(self) -> Tier:
        """The tier every capture is written to first."""
        return self.tiers[0]

    # -- which tiers, at which step (the caller's thread) -----------------------------------
    def due(self, step: int, *, to_primary: bool = False) -> list[Tier]:
        """The tiers a checkpoint of ``step`` goes to, fastest first (``to_primary``: the
        primary too, whatever its interval: a last save before a preemption, which may
        take the machine and its memory tier with it).

        A tier is due when its interval divides the step (no interval: every checkpoint).
        The remote tier is fed from the primary, so a step due there goes to the primary
        too. Every checkpoint enters through the memory tier when there is one, so a step
        no interval divides is kept there (else in the primary): an explicit
        ``checkpoint()`` is never dropped.
        """
        memory, primary, remote = self.get(MEMORY), self.get(PRIMARY), self.get(REMOTE)
        assert primary is not None
        to_primary = to_primary or self._divides_primary(step)
        to_remote = remote is not None and remote.interval_steps is not None
        to_remote = to_remote and remote.divides(step)  # type: ignore[union-attr]
        to_primary = to_primary or to_remote
        # A step that no interval divides still goes to the fastest tier (the memory tier,
        # else the primary): an explicit checkpoint() is never dropped.
        if memory is None and not to_primary:
            to_primary = True
        if remote is not None and remote.interval_steps is None:
            to_remote = to_primary  # every checkpoint that reaches the primary
        wanted = [(memory, True), (primary, to_primary), (remote, to_remote)]
        return [tier for tier, due in wanted if tier is not None and due]

    def _divides_primary(self, step: int) -> bool:
        interval = self.config.interval_steps
        return interval is None or step % interval == 0

    async def plan(self, step: int, bridge: Bridge, *, to_primary: bool = False) -> Plan:
        """Take a place in the queue of every tier a copy goes to (waiting, or leaving a
        full tier out, by its backpressure), and protect each source step. ``to_primary``:
        the primary too, waiting for its place whatever its backpressure."""
        chain = self.due(step, to_primary=to_primary)
        kept = chain[:1]
        turns: dict[str, int] = {}
        for tier in chain[1:]:
            turn = self._reserve(tier)
            if turn is None and (tier.block or (to_primary and tier.name == PRIMARY)):
                turn = await bridge(self._wait_for_room(tier))
            if turn is None:
                tier.stats.skipped += 1
                logger.warning(
                    "checkpoint of step %d does not go to the %s tier: %d copies to it are "
                    "still queued (its on_backpressure is skip)",
                    step,
                    tier.name,
                    tier.capacity,
                )
                continue
            turns[tier.name] = turn
            kept.append(tier)
        with self._lock:
            for source in kept[:-1]:
                source.protected[step] += 1
            self._outstanding += 1
        return Plan(step, kept, turns)

    def _reserve(self, tier: Tier) -> int | None:
        with self._lock:
            if tier.stats.pending >= tier.capacity:
                return None
            tier.stats.pending += 1
            turn, tier.issued = tier.issued, tier.issued + 1
            return turn

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _wait_for_room(self, tier: Tier) -> int:
        changed = self._condition()
        async with changed:
            while True:
                turn = self._reserve(tier)
                if turn is not None:
                    return turn
                await changed.wait()

    async def _notify(self) -> None:
        changed = self._condition()
        async with changed:
            changed.notify_all()

    def _release(self, plan: Plan, index: int, *, failed: bool = False) -> None:
        """Link ``index`` of ``plan`` (source -> target) is over: free its place and its
        turn, and unprotect its source."""
        target = plan.chain[index + 1]
        if target.name in plan.released:
            return
        plan.released.add(target.name)
        with self._lock:
            target.stats.pending -= 1
            if failed:
                target.stats.failed += 1
            target.done_turns.add(plan.turns[target.name])
            while target.serving in target.done_turns:
                target.done_turns.discard(target.serving)
                target.serving += 1
            source = plan.chain[index]
            source.protected[plan.step] -= 1
            if source.protected[plan.step] <= 0:
                del source.protected[plan.step]

    async def abandon(self, plan: Plan) -> None:
        """Nothing of ``plan`` will be written (skipped, or capture failed)."""
        self._end(plan)
        await self._notify()

    def _end(self, plan: Plan) -> None:
        for index in range(len(plan.chain) - 1):
            self._release(plan, index)
        with self._lock:
            self._outstanding -= 1

    # -- after the entry commit (the loop) -------------------------------------------------
    async def follow(
        self, plan: Plan, entry: Coroutine[Any, Any, Location | None]
    ) -> Location | None:
        """Persist to the entry tier, then promote tier by tier; the primary's checkpoint
        (or the last tier's, when the primary is not due)."""
        loop = asyncio.get_running_loop()
        try:
            final = await entry
            if final is None:
                return None
            self._committed(plan.chain[0], plan.step)
            await self._retain(plan.chain[0])
            result = final
            for index, target in enumerate(plan.chain[1:]):
                source = plan.chain[index]
                try:
                    await self._turn(target, plan.turns[target.name])
                    final = await self._copy(source, final, target, plan.step, loop)
                except BaseException:
                    self._release(plan, index, failed=True)
                    raise
                self._committed(target, plan.step)
                # Retention of the target before its next copy's turn, so the two never
                # change its directory at once; the source's once this copy let go of it.
                await self._retain(target)
                self._release(plan, index)
                await self._notify()
                await self._retain(source)
                if target.name == PRIMARY or index == len(plan.chain) - 2:
                    result = final
            return result
        finally:
            self._end(plan)
            await self._notify()

    def _committed(self, tier: Tier, step: int) -> None:
        tier.last_committed = step
        tier.stats.record_commit(step)

    async def _turn(self, tier: Tier, turn: int) -> None:
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: tier.serving == turn)

    async def _copy(
        self,
        source: Tier,
        checkpoint: Location,
        target: Tier,
        step: int,
        loop: asyncio.AbstractEventLoop,
    ) -> Location:
        """Copy committed ``checkpoint`` of ``source`` to ``target`` through the seam."""
        manifest = await loop.run_in_executor(
            self._copiers, read_manifest, checkpoint, source.store
        )
        check_step(checkpoint, manifest)
        temporary = await target.store.begin(step)
        try:
            pieces: dict[str, list[tuple[int, int, int]]] = collections.defaultdict(list)
            for tensor in manifest.tensors:
                for piece in tensor.pieces:
                    pieces[piece.file].append((piece.offset, piece.length, piece.checksum))
            # Incremental: files the target's newest checkpoint holds already are shared
            # with it there, not copied again (never with another tier).
            held = (
                await loop.run_in_executor(
                    self._copiers, files_held_by_newest, target.store, manifest, step
                )
                if self.config.incremental
                else {}
            )
            await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._copiers,
                        self._copy_file,
                        source,
                        checkpoint,
                        record,
                        target,
                        temporary,
                        pieces[record.name],
                        held.get(record.name),
                    )
                    for record in manifest.files
                )
            )
            await loop.run_in_executor(self._copiers, target.store.make_durable, temporary)
            final = await target.store.commit(temporary, step, manifest.to_json())
        except BaseException:
            await loop.run_in_executor(self._copiers, target.store.abort, temporary)
            raise
        return final

    def _copy_file(
        self,
        source: Tier,
        checkpoint: Location,
        record: FileRecord,
        target: Tier,
        temporary: Location,
        pieces: list[tuple[int, int, int]],
        held_by: Location | None = None,
    ) -> None:
        """One data file: read whole, written whole, every piece's checksum compared with
        the manifest's on the bytes written (so a copy never commits what a reader would
        refuse, and a corrupt source fails the copy instead of spreading). ``held_by``: a
        checkpoint of the target whose file of that name holds the same bytes, shared
        instead when the target can."""
        if held_by is not None and share_into(target.store, held_by, record.name, temporary):
            return
        file = open_data_file(checkpoint, record, source.store)
        buffer = self._buffers.take(record.nbytes)
        view = memoryview(buffer)
        try:
            try:
                file.read_into([view[: record.nbytes]], 0)
            except EOFError as exc:
                raise CorruptCheckpointError(f"{checkpoint / record.name}: {exc}") from exc
            finally:
                file.close()
            sums = target.store.write_chunk(
                temporary,
                record.name,
                view[: record.nbytes],
                [(offset, length) for offset, length, _ in pieces],
                view,
            )
            for (offset, length, expected), got in zip(pieces, sums, strict=True):
                if got != expected:
                    raise CorruptCheckpointError(
                        f"{checkpoint / record.name}: bytes {offset}..{offset + length} do "
                        f"not match their checksum (crc32c {got:#010x}, manifest "
                        f"{expected:#010x}); it is not copied to the {target.name} tier"
                    )
        finally:
            view.release()
            self._buffers.give_back(buffer)

    async def _retain(self, tier: Tier) -> None:
        if tier.keep_last is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._retain_sync, tier)
        except OSError as exc:
            # Committed already; the next commit's retention tries again.
            logger.warning("retention of the %s tier failed: %s", tier.name, exc)

    def _retain_sync(self, tier: Tier) -> None:
        assert tier.keep_last is not None
        # By name, not by count: a checkpoint that commits to this tier while this runs is
        # not in the listing, so it is never deleted; with a count, it would push out the
        # oldest kept step, which a copy may still have to read.
        committed = tier.store.list_committed()
        # Read after the listing: a step is protected when its plan is made, before it
        # commits, so every listed step that a copy reads is protected by now.
        with self._lock:
            protected = {step for step, n in tier.protected.items() if n > 0}
        doomed, _ = retention_split(committed, tier.keep_last, tier.last_committed)
        doomed = [info for info in doomed if info.step not in protected]
        survivors = [info for info in committed if info not in doomed]
        tier.store.remove_all([info.path for info in doomed], survivors)

    async def drain(self) -> None:
        """Wait until every planned checkpoint's copies are over."""
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: self._outstanding == 0)

    # -- restore -----------------------------------------------------------------------------
    def candidates(self, step: int | None, where: str) -> list[tuple[Tier, CheckpointInfo]]:
        """Checkpoints to try, newest first; one step held by several tiers is tried in
        the fastest first, then the others, before any older step."""
        found = [
            (rank, tier, info)
            for rank, tier in enumerate(self.tiers)
            for info in tier.store.list_committed()
            if step is None or info.step == step
        ]
        if step is not None and not found:
            held = sorted({i.step for t in self.tiers for i in t.store.list_committed()})
            raise NoCheckpointError(
                f"no committed checkpoint of step {step} in any tier of {where} "
                f"(committed steps: {held or 'none'})"
            )
        found.sort(key=lambda item: (-item[2].step, item[0]))
        return [(tier, info) for _, tier, info in found]

    def tier_of(self, info: CheckpointInfo) -> str | None:
        """The name of the tier that holds ``info``."""
        return next((t.name for t in self.tiers if info.path.parent == t.store.root), None)

    def resumed_from(self, step: int) -> None:
        for tier in self.tiers:
            tier.store.resumed_from(step)

    # -- the end -----------------------------------------------------------------------------
    def finish(self) -> None:
        """At close: free the memory tier when the primary holds its newest step (the run's
        last checkpoint reached the disk); otherwise keep it for the next process."""
        memory, primary = self.get(MEMORY), self.get(PRIMARY)
        if memory is None or primary is None:
            return
        in_memory = memory.store.list_committed()
        on_disk = primary.store.list_committed()
        if in_memory and (not on_disk or on_disk[-1].step < in_memory[-1].step):
            logger.info(
                "the memory tier %s keeps step %d, newer than the primary's; `aiockpt prune "
                "--memory` frees it",
                memory.stats.location,
                in_memory[-1].step,
            )
            return
        memory.store.remove_all([info.path for info in in_memory], [])
        memory.store.close()
        if self.config.memory is not None and self.config.memory.directory is None:
            shutil.rmtree(memory.store.root, ignore_errors=True)  # derived: all of it ours

    def close(self) -> None:
        for store in self._own:
            store.close()
        self._copiers.shutdown(wait=True)
        self._buffers.release()


def _open_tier(store: CheckpointStorage, key: str, location: object) -> None:
    """Take a tier's writer lock; a location that cannot be made is a ConfigError."""
    try:
        store.open()
    except OSError as exc:
        raise ConfigError(
            f"{key}: the tier's directory {location} cannot be made or opened "
            f"({exc.strerror or exc}); set {key} to a directory this process can write"
            + (" (a tmpfs such as /dev/shm)" if key.startswith("memory") else "")
        ) from exc


def memory_directory(config: Config) -> Path:
    """The memory tier's directory: configured, or derived from the primary."""
    assert config.memory is not None
    if config.memory.directory is not None:
        return Path(config.memory.directory)
    return derived_memory_directory(config.directory)


def open_tiers(
    config: Config, primary: CheckpointStorage, stats: CheckpointerStats, ranked: bool
) -> TierSet | None:
    """The tiers of a Checkpointer, or None when only the primary is configured."""
    if config.memory is None and config.remote is None:
        return None
    if ranked:
        raise ConfigError(
            "memory and remote tiers serve a single process so far; under torch.distributed "
            "leave [checkpoint.memory] and [checkpoint.remote] out"
        )
    return TierSet(config, primary, stats)


async def checkpoint_tiers(
    tiers: TierSet | None,
    saver: Saver,
    step: int,
    block: bool | None,
    bridge: Bridge,
    *,
    to_primary: bool = False,
) -> tuple[CheckpointMetrics, AnyFuture | None]:
    """``checkpoint()`` through the tiers: planned, captured, then followed
    (``to_primary``: the primary too, whatever its interval)."""
    if tiers is None:
        return await checkpoint(saver, step, block, bridge)
    saver.check_can_checkpoint(step)  # before a place in any queue is taken
    plan = await tiers.plan(step, bridge, to_primary=to_primary)

    def persist(
        entry: Coroutine[Any, Any, Location | None],
    ) -> Coroutine[Any, Any, Location | None]:
        plan.consumed = True  # from here on, follow() releases what the plan holds
        return tiers.follow(plan, entry)

    try:
        metrics, future = await checkpoint(saver, step, block, bridge, persist)
    except BaseException:
        if not plan.consumed:
            await bridge(tiers.abandon(plan))
        raise
    if future is None and not plan.consumed:
        await bridge(tiers.abandon(plan))
    return metrics, future
