"""Capture: make the snapshot exact before ``checkpoint()`` returns, in milliseconds.

Three ways a chunk's bytes are captured, chosen per device:

- ``gpu``: one device-to-device copy of the device's whole state into its staging buffer,
  on the *current* stream. Stream order alone makes it exact: every later kernel that
  changes a parameter runs after the copy. Copy tasks then move chunks to host memory on a
  low-priority side stream, gated by CUDA events.
- ``host``: device-to-host copies of the live tensors on the side stream, straight into
  host buffers. Until they finish, training must not change those tensors: a GPU-side
  guard (the compute stream waits on the copy's event) runs before the next
  ``optimizer.step()`` and the next module forward. The CPU never waits.
- ``cpu``: CPU tensors are copied into host buffers before capture returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import torch

from .layout import Chunk, Layout, TensorPlacement
from .memory import Admission, HostBuffer, StagingMemory

__all__ = ["CaptureGuard", "Capturer", "Snapshot", "choose_staging"]

# Picks some tensors of a flattened state's table, by index, in one C-level call.
Picker = Callable[[list[torch.Tensor]], list[torch.Tensor] | tuple[torch.Tensor, ...]]

# Leave this much GPU memory free after allocating a staging buffer, so that "auto"
# staging never pushes training into out-of-memory errors.
GPU_HEADROOM_FRACTION = 0.10


def choose_staging(requested: str, device: torch.device, nbytes: int) -> str:
    """The staging mode for the tensors on ``device``: "cpu", "gpu" or "host"."""
    if device.type != "cuda":
        return "cpu"
    if requested in ("gpu", "host"):
        return requested
    free, total = torch.cuda.mem_get_info(device)
    return "gpu" if nbytes <= free - GPU_HEADROOM_FRACTION * total else "host"


@dataclass(eq=False)
class Snapshot:
    """A captured checkpoint on its way to disk."""

    step: int
    layout: Layout
    skeleton: dict[str, Any]
    admission: Admission
    # Chunks whose bytes sit in host memory once ``host_ready`` (if any) completes.
    host_ready: dict[torch.device, torch.cuda.Event] = field(default_factory=dict)
    # Devices whose chunks wait in the GPU staging buffer, recorded after the capture copy.
    gpu_ready: dict[torch.device, torch.cuda.Event] = field(default_factory=dict)


class CaptureGuard:
    """Makes training wait, on the GPU, for host-staged copies that read live tensors."""

    def __init__(self) -> None:
        self._pending: list[torch.cuda.Event] = []
        self._handles: list[Any] = []

    def install(self, objects: Iterable[object]) -> None:
        if self._handles:
            return
        for obj in objects:
            if isinstance(obj, torch.optim.Optimizer):
                self._handles.append(obj.register_step_pre_hook(self._before_update))
            elif isinstance(obj, torch.nn.Module):
                # Forward passes update buffers in place (BatchNorm running statistics), so
                # modules that own buffers wait too; the rest of the forward and backward
                # pass overlaps the copy.
                for module in obj.modules():
                    if next(module.buffers(recurse=False), None) is not None:
                        self._handles.append(module.register_forward_pre_hook(self._before_update))

    def add(self, event: torch.cuda.Event) -> None:
        self._pending.append(event)

    def _before_update(self, *_: object) -> None:
        if not self._pending:
            return
        stream = torch.cuda.current_stream()
        for event in self._pending:
            stream.wait_event(event)
        self._pending = [e for e in self._pending if not e.query()]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def hold_current_stream(self) -> None:
        """Make the current stream wait, on the GPU, for every copy still reading live
        tensors: later kernels (whatever object they update) run after it. For state given
        as plain tensors (a path-level save), with no optimizer or module to hook."""
        if not self._pending:
            return
        stream = torch.cuda.current_stream()
        for event in self._pending:
            stream.wait_event(event)
        self._pending.clear()


@dataclass(frozen=True)
class _HostCopies:
    """The copies of one chunk into one host buffer: whole tensors, then split pieces."""

    views: list[torch.Tensor]
    pick: Picker
    pieces: list[tuple[torch.Tensor, int, int, int]]  # (view, tensor index, start, length)


class Capturer:
    """Copies the tensors of one layout into staging memory, reusing every view it makes.

    Everything that depends only on the layout (destination views, which tensors each copy
    reads) is prepared once, so a capture issues its copies with no per-tensor Python work.
    """

    def __init__(
        self,
        layout: Layout,
        memory: StagingMemory,
        modes: dict[torch.device, str],
        *,
        host_at_once: int | None = None,
    ):
        self.layout = layout
        self.memory = memory
        self.modes = modes
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._gpu_copies: dict[torch.device, list[tuple[list[torch.Tensor], Picker]]] = {}
        self._host_copies: dict[tuple[int, int], _HostCopies] = {}
        # What admission must reserve, the same for every checkpoint of this layout.
        self.gpu_devices = {d for d, mode in modes.items() if mode == "gpu"}
        host_captured = [c for c in layout.chunks if modes[c.device] != "gpu"]
        # A host pool smaller than the chunks captured to host holds the first
        # ``host_at_once`` of them, taken at admission; capture takes buffers for the rest
        # one chunk at a time (``capture_piece``) while the first ones are being written.
        at_once = len(host_captured) if host_at_once is None else host_at_once
        self.host_captured_chunks = [c.index for c in host_captured[:at_once]]
        self.late_chunks = host_captured[at_once:]
        self.in_pieces = bool(self.late_chunks)
        self.nbytes = layout.nbytes

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._copy_streams.get(device)
        if stream is None:
            # Priority 0 is CUDA's lowest: training kernels go first.
            stream = torch.cuda.Stream(device=device, priority=0)
            self._copy_streams[device] = stream
        return stream

    # -- capture ----------------------------------------------------------------------
    def capture(
        self, tensors: list[torch.Tensor], admission: Admission, guard: CaptureGuard
    ) -> tuple[dict[torch.device, torch.cuda.Event], dict[torch.device, torch.cuda.Event]]:
        """Copy ``tensors`` into staging; returns (host_ready, gpu_ready) events by device."""
        host_ready: dict[torch.device, torch.cuda.Event] = {}
        gpu_ready: dict[torch.device, torch.cuda.Event] = {}
        for device in self.layout.devices:
            mode = self.modes[device]
            if mode == "gpu":
                gpu_ready[device] = self._capture_to_gpu(device, tensors)
            elif mode == "host":
                event = self._capture_to_host(device, tensors, admission.host, non_blocking=True)
                if event is not None:  # None: all of this device's chunks come later
                    guard.add(event)
                    host_ready[device] = event
            else:
                self._capture_to_host(device, tensors, admission.host, non_blocking=False)
        return host_ready, gpu_ready

    def _gpu_destinations(self, device: torch.device) -> list[tuple[list[torch.Tensor], Picker]]:
        copies = self._gpu_copies.get(device)
        if copies is None:
            start, end = self.layout.device_span(device)
            buffer = self.memory.gpu_buffer(device, end - start)
            # One copy call per dtype: _foreach_copy_ takes its one-launch-per-many-tensors
            # route only when all sources share a dtype, and copies tensor by tensor else.
            by_dtype: dict[torch.dtype, list[TensorPlacement]] = {}
            for placement in self.layout.tensors:
                if placement.device == device:
                    by_dtype.setdefault(placement.dtype, []).append(placement)
            copies = [
                (
                    [_typed_view(buffer, t.stream_offset - start, t) for t in group],
                    _picker([t.index for t in group], len(self.layout.tensors)),
                )
                for group in by_dtype.values()
            ]
            self._gpu_copies[device] = copies
        return copies

    def _capture_to_gpu(
        self, device: torch.device, tensors: list[torch.Tensor]
    ) -> torch.cuda.Event:
        copies = self._gpu_destinations(device)
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            # The previous checkpoint's chunk copies read this buffer on the side stream.
            stream.wait_stream(self.copy_stream(device))
            for destinations, pick in copies:
                torch._foreach_copy_(destinations, pick(tensors), non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def _host_destinations(self, chunk: Chunk, buffer: HostBuffer) -> _HostCopies:
        key = (chunk.index, buffer.ident)
        copies = self._host_copies.get(key)
        if copies is None:
            views: list[torch.Tensor] = []
            whole: list[int] = []
            pieces: list[tuple[torch.Tensor, int, int, int]] = []
            for index in chunk.tensors:
                placement = self.layout.tensors[index]
                for piece in placement.pieces:
                    if piece.chunk != chunk.index:
                        continue
                    if len(placement.pieces) == 1:
                        views.append(_typed_view(buffer.data, piece.offset, placement))
                        whole.append(index)
                    else:
                        view = buffer.data[piece.offset : piece.offset + piece.length]
                        pieces.append((view, index, piece.tensor_offset, piece.length))
            copies = _HostCopies(views, _picker(whole, len(self.layout.tensors)), pieces)
            self._host_copies[key] = copies
        return copies

    def _capture_to_host(
        self,
        device: torch.device,
        tensors: list[torch.Tensor],
        buffers: dict[int, HostBuffer],
        *,
        non_blocking: bool,
    ) -> torch.cuda.Event | None:
        destinations: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for chunk in self.layout.chunks:
            if chunk.device != device or chunk.index not in buffers:
                continue  # another device's, or captured later in pieces
            copies = self._host_destinations(chunk, buffers[chunk.index])
            destinations += copies.views
            sources += copies.pick(tensors)
            for view, index, start, length in copies.pieces:
                destinations.append(view)
                sources.append(_flat_bytes(tensors[index])[start : start + length])
        if not destinations:
            return None  # every chunk of this device is captured later, in pieces
        if not non_blocking:
            torch._foreach_copy_(destinations, sources)
            return None
        with torch.cuda.device(device):
            side = self.copy_stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                torch._foreach_copy_(destinations, sources, non_blocking=True)
                event = _blocking_event()
                event.record(side)
        return event

    def capture_piece(
        self, chunk: Chunk, tensors: list[torch.Tensor], buffer: HostBuffer, guard: CaptureGuard
    ) -> torch.cuda.Event | None:
        """Capture one chunk straight to ``buffer`` (a capture in pieces); the event its
        bytes are in host memory after (None: there already)."""
        if len(self._host_copies) > 4 * len(self.layout.chunks):
            # Pieces land in whichever buffer is free: keep the cache of views bounded.
            self._host_copies.clear()
        buffers = {chunk.index: buffer}
        if self.modes[chunk.device] == "cpu":
            self._capture_to_host(chunk.device, tensors, buffers, non_blocking=False)
            return None
        event = self._capture_to_host(chunk.device, tensors, buffers, non_blocking=True)
        assert event is not None
        guard.add(event)
        return event

    # -- copy tasks: GPU staging buffer -> host buffer --------------------------------
    def copy_chunk_to_host(
        self, chunk: Chunk, buffer: HostBuffer, after: torch.cuda.Event
    ) -> torch.cuda.Event:
        start, _ = self.layout.device_span(chunk.device)
        staging = self.memory.gpu_buffer(chunk.device, 0)
        offset = chunk.stream_offset - start
        with torch.cuda.device(chunk.device):
            side = self.copy_stream(chunk.device)
            side.wait_event(after)
            with torch.cuda.stream(side):
                buffer.data[: chunk.nbytes].copy_(
                    staging[offset : offset + chunk.nbytes], non_blocking=True
                )
                event = _blocking_event()
                event.record(side)
        return event


def _blocking_event() -> torch.cuda.Event:
    # A thread that synchronizes on a blocking event sleeps instead of spinning a core.
    return torch.cuda.Event(blocking=True)


def _picker(indices: list[int], total: int) -> Picker:
    """Picks the tensors at ``indices`` (a tuple, or the table itself when that is all)."""
    if indices == list(range(total)):
        return _whole_table
    if len(indices) == 1:
        only = indices[0]
        return lambda tensors: (tensors[only],)
    if not indices:
        return lambda tensors: ()
    return itemgetter(*indices)  # type: ignore[return-value]


def _whole_table(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


def _typed_view(buffer: torch.Tensor, offset: int, placement: TensorPlacement) -> torch.Tensor:
    raw = buffer[offset : offset + placement.nbytes]
    return raw.view(placement.dtype).view(placement.shape)


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    # A conjugate or negative view has no byte view: its values are resolved into a copy
    # (resolve_* return the tensor itself when it has no such bit).
    return tensor.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
