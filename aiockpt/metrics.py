"""What one checkpoint cost, stage by stage, and what a Checkpointer set up for its state.

Everything here is published for reading: tools and tests learn how a checkpoint went
from these records, never from the Checkpointer's private fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ChunkSpan:
    """When one chunk of a checkpoint moved, in seconds since its capture began.

    ``copy_started``/``copy_finished`` are None for chunks captured straight into host
    memory (CPU state, host staging): they have no copy stage of their own.
    ``write_queued`` is when the chunk was ready to be written; ``write_started`` when a
    writer thread took it up, so the difference is its wait for a write slot and a thread.

    Attributes:
        index: the chunk's number within its checkpoint (its data file).
        nbytes: the chunk's bytes.
        copy_started: when its device-to-host copy began (None: no copy stage).
        copy_finished: when that copy's CUDA event completed (None: no copy stage).
        write_queued: when it was ready to be written.
        write_started: when a writer thread began writing it.
        write_finished: when its data file was written (and synced, when durable).
    """

    index: int
    nbytes: int
    copy_started: float | None
    copy_finished: float | None
    write_queued: float
    write_started: float
    write_finished: float

    @property
    def copy_seconds(self) -> float:
        """Time of its device-to-host copy (0 when it had none)."""
        if self.copy_started is None or self.copy_finished is None:
            return 0.0
        return self.copy_finished - self.copy_started

    @property
    def queue_seconds(self) -> float:
        """Time it waited for a write slot and a writer thread."""
        return self.write_started - self.write_queued

    @property
    def write_seconds(self) -> float:
        """Time its write took on the writer thread."""
        return self.write_finished - self.write_started


@dataclass
class CheckpointMetrics:
    """Timings and sizes of one checkpoint, filled in as it moves through the pipeline.

    ``capture_ms`` is what training waited (the stall); ``queue_wait_ms`` the part of it
    spent waiting for a free in-flight place or staging memory. The rest happens in the
    background.

    Attributes:
        step: the step checkpointed.
        nbytes: bytes of tensor state it holds.
        chunks: chunks (data files) it was cut into.
        skipped: dropped on backpressure (``on_backpressure = "skip"``): nothing written.
        capture_ms: what training waited for ``checkpoint()``, in milliseconds.
        state_dict_ms: calling ``state_dict()`` and flattening, inside ``capture_ms``.
        staging_ms: issuing the copies into staging memory, inside ``capture_ms``.
        queue_wait_ms: waiting for a free in-flight place or staging memory, inside
            ``capture_ms``.
        copy_seconds: copying device memory to pinned host memory, in the background.
        write_seconds: writing and syncing the data files, in the background.
        commit_ms: writing the manifest and renaming the directory into place.
        persist_seconds: from capture to durable commit.
        shared_bytes: of ``nbytes``, the bytes not written again because they were
            unchanged since the previous checkpoint (``incremental``).
        chunk_spans: when each chunk was copied, queued and written (``ChunkSpan``).
        captured_in_pieces: chunks captured one at a time, each into a host buffer freed
            by the write of an earlier one, because the host pool is smaller than the
            state captured to host memory (``pinned_ratio`` < 1 with host staging or CPU
            tensors); 0 normally. ``capture_ms`` then includes writing all but the last
            pool-full of them.
    """

    step: int
    nbytes: int = 0
    chunks: int = 0
    skipped: bool = False
    capture_ms: float = 0.0
    state_dict_ms: float = 0.0  # calling state_dict() and flattening, inside capture_ms
    staging_ms: float = 0.0  # issuing the copies into staging memory, inside capture_ms
    queue_wait_ms: float = 0.0
    copy_seconds: float = 0.0
    write_seconds: float = 0.0
    commit_ms: float = 0.0
    persist_seconds: float = 0.0  # from capture to durable commit
    shared_bytes: int = 0  # unchanged since the previous checkpoint: shared, not written
    # One per chunk this process wrote, by chunk index; empty until the chunks are written.
    chunk_spans: list[ChunkSpan] = field(default_factory=list, repr=False)
    captured_in_pieces: int = 0

    @staticmethod
    def _rate(nbytes: int, seconds: float) -> float:
        return nbytes / seconds / 1e9 if seconds > 0 else 0.0

    @property
    def copy_gbps(self) -> float:
        """Device-to-host copy bandwidth in GB/s (0 when there was no copy stage)."""
        return self._rate(self.nbytes, self.copy_seconds)

    @property
    def write_gbps(self) -> float:
        """Write bandwidth in GB/s: bytes over the time the data files took."""
        return self._rate(self.nbytes, self.write_seconds)

    @property
    def persist_gbps(self) -> float:
        """End-to-end bandwidth in GB/s: bytes over the time from capture to commit."""
        return self._rate(self.nbytes, self.persist_seconds)

    def to_dict(self) -> dict[str, float | int | bool]:
        """The metrics as plain values, for JSON or a table.

        Returns:
            Every field, and the three bandwidths.
        """
        record = asdict(self)
        del record["chunk_spans"]  # a flat record of figures; the spans are read directly
        record.update(
            copy_gbps=self.copy_gbps, write_gbps=self.write_gbps, persist_gbps=self.persist_gbps
        )
        return record

    def summary(self) -> str:
        """The metrics in one line, as ``verbose = true`` logs them.

        Returns:
            e.g. ``"step 100: 512.0 MiB in 2 chunks; stall 3.10 ms (queue 0.00 ms); ..."``.
        """
        if self.skipped:
            return f"step {self.step}: skipped (no free in-flight place or staging memory)"
        return (
            f"step {self.step}: {self.nbytes / 2**20:.1f} MiB in {self.chunks} chunks; "
            f"stall {self.capture_ms:.2f} ms (queue {self.queue_wait_ms:.2f} ms); "
            # CPU state is copied inside capture: no separate copy stage to report.
            + (f"copy {self.copy_gbps:.2f} GB/s; " if self.copy_seconds else "")
            + f"write {self.write_gbps:.2f} GB/s; "
            f"commit {self.commit_ms:.1f} ms; durable after {self.persist_seconds:.2f} s"
        )


@dataclass
class TierStats:
    """How one storage tier is doing (``ckpt.stats.tiers["memory"]``, ``["primary"]``,
    ``["remote"]``), kept only when a memory or remote tier is configured.

    Attributes:
        name: ``"memory"``, ``"primary"`` or ``"remote"``.
        location: where its checkpoints are.
        committed: checkpoints committed there.
        skipped: checkpoints due there that were dropped because its queue of copies was
            full (``on_backpressure = "skip"``).
        failed: copies to it that failed.
        pending: copies to it queued or running now.
        last_step: the step it committed last (None: none yet).
        achieved_interval_steps: the mean step distance between its commits so far, the
            interval it really keeps (None before its second commit).
        first_step: the step it committed first (None: none yet).
    """

    name: str
    location: str
    committed: int = 0
    skipped: int = 0
    failed: int = 0
    pending: int = 0
    last_step: int | None = None
    achieved_interval_steps: float | None = None
    first_step: int | None = None

    def record_commit(self, step: int) -> None:
        """Count a commit of ``step``.

        Args:
            step: the step committed.
        """
        if self.first_step is None:
            self.first_step = step
        self.committed += 1
        self.last_step = step
        if self.committed > 1:
            span = step - self.first_step
            self.achieved_interval_steps = span / (self.committed - 1)


@dataclass
class CheckpointerStats:
    """Running totals of one Checkpointer (``ckpt.stats``).

    Attributes:
        requested: checkpoints captured and handed to the background.
        committed: of those, durably committed.
        skipped: dropped on backpressure, or not committed because another rank skipped.
        failed: failed in the background.
        last_restore_bytes: bytes the last restore read (less for a partial one).
        replayed: captures that reused the previous flattening plan (no re-walk).
        last_restore_missing: after a ``restore(strict=False)``, each module's keys that
            the checkpoint did not hold (they kept their values); modules with none are
            left out.
        last_restore_unexpected: the same for keys the checkpoint held and the module
            does not have (they were not loaded).
        last_restore_skipped: the objects a ``restore(strict=False)`` asked for that the
            checkpoint held no state for (they kept their values).
        tiers: with a memory or remote tier configured, each tier's
            :class:`TierStats` by name; empty otherwise.
        last_restore_tier: the tier the last restore read from (None: no tiers, or none
            restored).
    """

    requested: int = 0
    committed: int = 0
    skipped: int = 0
    failed: int = 0
    last_restore_bytes: int = 0  # bytes the last restore read (less for a partial one)
    replayed: int = 0  # captures that reused the previous flattening plan (no re-walk)
    last_restore_missing: dict[str, list[str]] = field(default_factory=dict)
    last_restore_unexpected: dict[str, list[str]] = field(default_factory=dict)
    last_restore_skipped: list[str] = field(default_factory=list)
    tiers: dict[str, TierStats] = field(default_factory=dict)
    last_restore_tier: str | None = None


@dataclass(frozen=True)
class StagingSummary:
    """The staging memory a Checkpointer holds for its state, as sized at the last layout.

    ``host_pool_bytes`` is the host pool (``host_buffers`` buffers, pinned when the state
    lives on a GPU); ``gpu_staging_bytes`` the GPU buffer of each device staged on the GPU
    (by device name, e.g. ``"cuda:0"``); ``modes`` the staging chosen per device (``"gpu"``,
    ``"host"`` or ``"cpu"``). ``host_buffers_free`` and ``in_flight`` are read at the
    moment the summary is taken.

    Attributes:
        host_pool_bytes: bytes of the host buffer pool.
        host_buffers: buffers in the pool.
        host_buffers_free: of those, free now.
        pinned: whether the pool is pinned (page-locked) memory.
        gpu_staging_bytes: bytes of the GPU staging buffer, by device name.
        modes: the staging chosen, by device name.
        in_flight: checkpoints holding an in-flight place now (at most ``max_async``).
        host_pool_ready_bytes: of ``host_pool_bytes``, what is mapped (and pinned) so
            far: the pool is set up in the background from the moment the Checkpointer
            is made, and a copy that needs a buffer not ready yet waits for it.
    """

    host_pool_bytes: int
    host_buffers: int
    host_buffers_free: int
    pinned: bool
    gpu_staging_bytes: dict[str, int]
    modes: dict[str, str]
    in_flight: int  # checkpoints holding an in-flight place now (at most max_async)
    host_pool_ready_bytes: int = 0


@dataclass(frozen=True)
class LayoutSummary:
    """How a Checkpointer lays its state out in chunks (one data file per chunk).

    ``nbytes`` counts tensor data only; ``device_bytes`` the bytes of the chunks of each
    device (by device name), what GPU staging needs on that device.

    Attributes:
        chunks: the number of chunks (data files).
        chunk_sizes: the bytes of each chunk, in order.
        tensors: the number of tensors stored.
        nbytes: bytes of tensor data.
        device_bytes: bytes of the chunks of each device, by device name.
    """

    chunks: int
    chunk_sizes: tuple[int, ...]
    tensors: int
    nbytes: int
    device_bytes: dict[str, int]
