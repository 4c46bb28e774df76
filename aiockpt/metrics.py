"""What one checkpoint cost, stage by stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
class CheckpointerStats:
    """Running totals of one Checkpointer (``ckpt.stats``).

    Attributes:
        requested: checkpoints captured and handed to the background.
        committed: of those, durably committed.
        skipped: dropped on backpressure, or not committed because another rank skipped.
        failed: failed in the background.
        last_restore_bytes: bytes the last restore read (less for a partial one).
    """

    requested: int = 0
    committed: int = 0
    skipped: int = 0
    failed: int = 0
    last_restore_bytes: int = 0  # bytes the last restore read (less for a partial one)
