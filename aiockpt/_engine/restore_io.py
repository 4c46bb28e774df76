"""How restore moves a checkpoint's bytes: few large reads, then straight into place.

A data file is its tensors back to back (64-byte aligned), so the pieces a restore wants
usually form long runs. Each run becomes a *segment*, read with one call:

- into CPU tensors by a scattered read (preadv), each tensor's bytes landing in its own
  tensor with no intermediate buffer;
- for GPU tensors, through a small ring of pinned host buffers: a window of the segment is
  read into a free buffer, copied host-to-device without blocking on a copy stream, and
  the buffer is refilled only once a CUDA event says that copy finished. Reader threads
  keep the disk busy while earlier windows cross the bus, so restore time tends to the
  larger of read time and copy time instead of their sum. Pageable host memory would copy
  at a third of the pinned speed, and pinning the whole state costs ~0.7 s/GiB, hence the
  ring.

Every piece's crc32c is checked on the host bytes (for a piece split across windows, as
it streams). A GPU tensor filled by a checkpoint that then fails verification is a
temporary nobody sees: nothing is loaded into the caller's objects until all is verified.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Protocol

import torch

from .._format.manifest import TensorRecord
from ..errors import CorruptCheckpointError
from ..storage.base import DataFile
from ..storage.fileio import checksum
from .memory import byte_view

__all__ = [
    "MAX_GAP",
    "SEGMENT_BYTES",
    "SLOT_BYTES",
    "CudaTransfer",
    "HostTransfer",
    "PinnedRing",
    "SegmentReader",
    "Segment",
    "Span",
    "gpu_room",
    "plan_segments",
]

# Large enough that one call moves many tensors (and the disk sees long sequential
# requests), small enough that a few threads share a file's reads between them.
SEGMENT_BYTES = 64 << 20
# Pieces closer than this are read in one call, the bytes between them (alignment padding,
# or a small unwanted tensor) read and dropped: cheaper than another system call. Partial
# restores skip anything larger.
MAX_GAP = 4096
# One ring buffer: a host-to-device copy of this size runs near the bus's peak, and a few
# of them pin in a few tens of milliseconds.
SLOT_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Span:
    """One piece (the bytes of a tensor in one file) inside a segment."""

    tensor: int  # index in the manifest's tensor table
    piece: int  # which of that tensor's pieces
    offset: int  # in the file
    length: int
    tensor_offset: int  # where these bytes start within the tensor's own bytes


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of one file read with one call: [offset, offset + length)."""

    file: str
    offset: int
    length: int
    spans: tuple[Span, ...]


def plan_segments(
    records: Iterable[tuple[int, TensorRecord]],
    *,
    limit: int = SEGMENT_BYTES,
    max_gap: int = MAX_GAP,
) -> list[Segment]:
    """Group the pieces of ``records`` into segments, file by file in offset order.

    A segment grows while the next piece starts at most ``max_gap`` bytes after the last
    one ends and the segment stays within ``limit`` (a piece larger than ``limit`` is a
    segment on its own).
    """
    by_file: dict[str, list[Span]] = {}
    for index, record in records:
        done = 0
        for number, piece in enumerate(record.pieces):
            span = Span(index, number, piece.offset, piece.length, done)
            by_file.setdefault(piece.file, []).append(span)
            done += piece.length
    segments: list[Segment] = []
    for name in sorted(by_file):
        current: list[Span] = []
        start = end = 0
        for span in sorted(by_file[name], key=lambda s: s.offset):
            gap = span.offset - end
            if current and (gap > max_gap or span.offset + span.length - start > limit):
                segments.append(Segment(name, start, end - start, tuple(current)))
                current = []
            if not current:
                start = span.offset
            current.append(span)
            # Manifests keep pieces apart, but a zero-length piece may sit anywhere.
            stop = span.offset + span.length
            end = stop if len(current) == 1 else max(end, stop)
        if current:
            segments.append(Segment(name, start, end - start, tuple(current)))
    return segments


def gpu_room(device: torch.device) -> int:
    """Bytes of ``device`` memory restore may take for temporaries: what the driver has
    free plus what torch's allocator holds unused, less headroom for fragmentation and for
    what load_state_dict allocates itself."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(0, free + cached - max(256 << 20, total // 20))


class Fence(Protocol):
    def synchronize(self) -> None: ...


class Transfer(Protocol):
    """Moves bytes from a ring buffer into a destination tensor."""

    def copy(self, destination: torch.Tensor, source: torch.Tensor) -> None: ...

    def fence(self) -> Fence | None:
        """Something to wait on before the sources of the copies issued so far are reused
        (None: the copies are already done)."""

    def finish(self) -> None:
        """Wait until every copy has landed."""


class HostTransfer:
    """Copies into CPU tensors, synchronously."""

    def copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        destination.copy_(source)

    def fence(self) -> Fence | None:
        return None

    def finish(self) -> None:
        pass


class CudaTransfer:
    """Host-to-device copies on a side stream of ``device``, fenced by CUDA events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # The destinations were just allocated on the current stream; memory the allocator
        # handed back from earlier work there must be free before these copies write it.
        self.stream.wait_stream(torch.cuda.current_stream(device))

    def copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            destination.copy_(source, non_blocking=True)

    def fence(self) -> Fence | None:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def finish(self) -> None:
        self.stream.synchronize()


@dataclass(eq=False)
class _Slot:
    data: torch.Tensor  # uint8, 1-D
    view: memoryview
    fence: Fence | None = None


class PinnedRing:
    """A few host buffers that reads fill in turn; one is refilled only after the copies
    that read it have finished (its fence)."""

    def __init__(self, buffers: Sequence[torch.Tensor]) -> None:
        if not buffers:
            raise ValueError("a ring needs at least one buffer")
        self._slots = [_Slot(b, byte_view(b)) for b in buffers]
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for slot in self._slots:
            self._free.put(slot)

    @staticmethod
    def carve(
        buffers: Iterable[torch.Tensor], count: int, slot_bytes: int = SLOT_BYTES
    ) -> list[torch.Tensor]:
        """Up to ``count`` slices of at most ``slot_bytes`` cut from ``buffers``."""
        slices: list[torch.Tensor] = []
        for buffer in buffers:
            for start in range(0, buffer.numel(), slot_bytes):
                if len(slices) == count:
                    return slices
                slices.append(buffer[start : start + slot_bytes])
        return slices

    def __len__(self) -> int:
        return len(self._slots)

    def take(self) -> _Slot:
        slot = self._free.get()
        if slot.fence is not None:
            slot.fence.synchronize()  # releases the GIL while the copy finishes
            slot.fence = None
        return slot

    def give(self, slot: _Slot, fence: Fence | None) -> None:
        slot.fence = fence
        self._free.put(slot)

    def settle(self) -> None:
        """Wait for every outstanding copy (with no reader running), so the buffers may be
        reused or freed."""
        for slot in self._slots:
            if slot.fence is not None:
                slot.fence.synchronize()
                slot.fence = None


@dataclass
class SegmentReader:
    """Reads segments of one checkpoint into per-tensor byte tensors, verifying each piece.

    Safe to call from several threads at once: segments never share a destination byte.
    After a failure the remaining segments are skipped.
    """

    path: PurePath
    records: Sequence[TensorRecord]
    files: Mapping[str, DataFile]
    destinations: Mapping[int, torch.Tensor]  # tensor index -> its bytes (uint8, 1-D)
    verify: bool = True
    failed: threading.Event = field(default_factory=threading.Event)

    def direct(self, segment: Segment) -> None:
        """Read a segment straight into CPU destinations with one scattered read."""
        if self.failed.is_set():
            return
        try:
            targets = [self._target(span) for span in segment.spans]
            views: list[memoryview] = []
            gap = memoryview(bytearray(MAX_GAP))
            position = segment.offset
            for span, target in zip(segment.spans, targets, strict=True):
                if span.offset > position:
                    views.extend(_gap_views(gap, span.offset - position))
                views.append(target)
                position = max(position, span.offset + span.length)
            self._guard_read(segment.file, views, segment.offset)
            if self.verify:
                for span, target in zip(segment.spans, targets, strict=True):
                    self._check(span, checksum(target))
        except BaseException:
            self.failed.set()
            raise

    def staged(self, segment: Segment, ring: PinnedRing, transfer: Transfer) -> None:
        """Read a segment window by window through ``ring``, copying each window on."""
        if self.failed.is_set():
            return
        try:
            self._staged(segment, ring, transfer)
        except BaseException:
            self.failed.set()
            raise

    def _staged(self, segment: Segment, ring: PinnedRing, transfer: Transfer) -> None:
        spans = segment.spans
        running = [0] * len(spans)
        first = 0  # spans before this one lie wholly in earlier windows
        position, end = segment.offset, segment.offset + segment.length
        while position < end:
            slot = ring.take()
            fence: Fence | None = None
            issued = False
            try:
                size = min(len(slot.view), end - position)
                self._guard_read(segment.file, [slot.view[:size]], position)
                stop = position + size
                parts = []
                for i in range(first, len(spans)):
                    span = spans[i]
                    if span.offset >= stop:
                        break
                    low, high = max(span.offset, position), min(span.offset + span.length, stop)
                    if high > low:
                        into = span.tensor_offset + low - span.offset
                        transfer.copy(
                            self.destinations[span.tensor][into : into + high - low],
                            slot.data[low - position : high - position],
                        )
                        issued = True
                        parts.append((i, low, high))
                fence = transfer.fence()
                # The copies run while the CPU checksums the same (read-only) bytes.
                if self.verify:
                    for i, low, high in parts:
                        window = slot.view[low - position : high - position]
                        running[i] = checksum(window, running[i])
            finally:
                if fence is None and issued:
                    fence = transfer.fence()
                ring.give(slot, fence)
            while first < len(spans) and spans[first].offset + spans[first].length <= stop:
                first += 1
            position = stop
        if self.verify:
            for span, crc in zip(spans, running, strict=True):
                self._check(span, crc)

    def _target(self, span: Span) -> memoryview:
        data = self.destinations[span.tensor]
        return byte_view(data)[span.tensor_offset : span.tensor_offset + span.length]

    def _guard_read(self, file: str, views: Sequence[memoryview], offset: int) -> None:
        try:
            self.files[file].read_into(views, offset)
        except EOFError as exc:
            raise CorruptCheckpointError(f"{self.path / file}: {exc}") from exc
        except OSError as exc:  # restore() then falls back to an older checkpoint
            raise CorruptCheckpointError(
                f"{self.path / file}: cannot be read ({exc.strerror})"
            ) from exc

    def _check(self, span: Span, crc: int) -> None:
        record = self.records[span.tensor]
        piece = record.pieces[span.piece]
        if crc != piece.checksum:
            raise CorruptCheckpointError(
                f"{self.path / piece.file}: bytes {piece.offset}..{piece.offset + piece.length} "
                f"(tensor {record.name!r}) fail their crc32c checksum"
            )


def _gap_views(gap: memoryview, size: int) -> list[memoryview]:
    # Bytes between wanted pieces land in a scratch buffer nobody reads.
    return [gap[: min(len(gap), size - start)] for start in range(0, size, len(gap))]
