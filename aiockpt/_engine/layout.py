"""Where every tensor's bytes go: a byte stream cut into chunks, one data file per chunk.

Tensors are packed in the order capture found them (module order, so layer order), each at
a 64-byte aligned offset of one contiguous byte stream. The stream is cut into chunks of
exactly ``chunk_bytes`` (the last chunk of each device holds what is left); a tensor that
crosses a chunk's end is split there, its continuation starting at offset 0 of the next
chunk. Full chunks are what keep host memory bounded: every host buffer but the last holds
a whole chunk, so a pool sized to the state is the state plus alignment, where chunks cut
at tensor boundaries left 14-23% of every buffer empty. Chunks never mix devices, so each
chunk is moved by exactly one copy.

The same offsets serve every stage: the GPU staging buffer mirrors the stream of its device,
host buffers hold one chunk each, and a data file is a chunk's bytes verbatim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["ALIGNMENT", "Chunk", "Layout", "Piece", "TensorPlacement", "plan_layout"]

# 64 bytes keeps every dtype's elements aligned when a tensor is viewed in place inside a
# buffer, and is the width of a cache line.
ALIGNMENT = 64


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a tensor's bytes that lies in one chunk."""

    chunk: int
    offset: int  # within the chunk (and its file)
    length: int
    tensor_offset: int  # where these bytes start within the tensor's own bytes


@dataclass(frozen=True, slots=True)
class TensorPlacement:
    index: int
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    device: torch.device
    stream_offset: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    device: torch.device
    stream_offset: int
    nbytes: int
    tensors: tuple[int, ...]  # indices of the tensors with a piece in this chunk

    @property
    def file_name(self) -> str:
        return chunk_file_name(self.index)


def chunk_file_name(index: int, rank: int = 0) -> str:
    return f"data-r{rank:05d}-c{index:05d}.bin"


@dataclass(frozen=True)
class Layout:
    tensors: tuple[TensorPlacement, ...]
    chunks: tuple[Chunk, ...]
    chunk_bytes: int
    signature: tuple[object, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what a checkpoint persists, padding excluded)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def stream_nbytes(self) -> int:
        return self.chunks[-1].stream_offset + self.chunks[-1].nbytes if self.chunks else 0

    def device_span(self, device: torch.device) -> tuple[int, int]:
        """Stream range [start, end) of the chunks on ``device``."""
        chunks = [c for c in self.chunks if c.device == device]
        return chunks[0].stream_offset, chunks[-1].stream_offset + chunks[-1].nbytes

    @functools.cached_property
    def chunk_pieces(self) -> dict[int, tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
        """Per chunk: the (offset, length) of each tensor piece in it, and its
        (tensor index, piece number); computed once per layout, used at every write."""
        found: dict[int, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {
            chunk.index: ([], []) for chunk in self.chunks
        }
        for chunk in self.chunks:
            ranges, keys = found[chunk.index]
            for index in chunk.tensors:
                for number, piece in enumerate(self.tensors[index].pieces):
                    if piece.chunk == chunk.index:
                        ranges.append((piece.offset, piece.length))
                        keys.append((index, number))
        return found

    @property
    def devices(self) -> list[torch.device]:
        return list(dict.fromkeys(c.device for c in self.chunks))


def layout_signature(tensors: list[torch.Tensor], chunk_bytes: int) -> tuple[object, ...]:
    return (chunk_bytes, *((t.dtype, t.shape, t.device) for t in tensors))


def plan_layout(
    tensors: list[torch.Tensor],
    names: list[str],
    chunk_bytes: int,
    groups: list[str | None] | None = None,
) -> Layout:
    """Place every tensor in the stream and cut the stream into chunks.

    ``groups`` (the layer of each tensor) keeps the tensors of one layer together, in the
    order the layers first appear: a layer's parameters and its optimizer state end up
    side by side, so restoring some layers reads few, contiguous ranges.
    """
    if chunk_bytes <= 0 or chunk_bytes % ALIGNMENT:
        raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGNMENT}")
    device_rank = _device_rank(tensors)
    group_rank = _group_rank(groups)
    order = sorted(range(len(tensors)), key=lambda i: (device_rank(i), group_rank(i)))
    builder = _ChunkBuilder(chunk_bytes)
    placements: dict[int, TensorPlacement] = {}
    for index in order:
        tensor = tensors[index]
        nbytes = tensor.numel() * tensor.element_size()
        pieces = builder.place(index, nbytes, tensor.device)
        placements[index] = TensorPlacement(
            index=index,
            name=names[index],
            dtype=tensor.dtype,
            shape=tuple(tensor.shape),
            nbytes=nbytes,
            device=tensor.device,
            stream_offset=builder.chunk_start(pieces[0].chunk) + pieces[0].offset,
            pieces=pieces,
        )
    return Layout(
        tensors=tuple(placements[i] for i in range(len(tensors))),
        chunks=builder.finish(),
        chunk_bytes=chunk_bytes,
        signature=layout_signature(tensors, chunk_bytes),
    )


def plan_layout_for_count(
    tensors: list[torch.Tensor],
    names: list[str],
    count: int,
    groups: list[str | None] | None = None,
) -> Layout:
    """The layout with the smallest chunk size that needs at most ``count`` chunks.

    Chunks are filled to the end, so total / count is the size unless devices (which never
    share a chunk) leave partial chunks; a binary search over sizes (a few cheap plans,
    once per layout) finds the smallest one that keeps the promise. The count is at least
    the number of devices.
    """
    total = sum(_align(t.numel() * t.element_size()) for t in tensors)
    low = max(_align(-(-total // max(count, 1))), ALIGNMENT)
    high = max(_align(total), ALIGNMENT)
    best = plan_layout(tensors, names, high, groups)
    while low < high:
        middle = _align((low + high) // 2)
        if middle >= high:
            break
        layout = plan_layout(tensors, names, middle, groups)
        if len(layout.chunks) <= count:
            best, high = layout, middle
        else:
            low = middle + ALIGNMENT
    return best


def _group_rank(groups: list[str | None] | None):  # type: ignore[no-untyped-def]
    if groups is None:
        return lambda i: i
    first_seen: dict[str, int] = {}
    for i, group in enumerate(groups):
        if group is not None:
            first_seen.setdefault(group, i)
    return lambda i: first_seen.get(groups[i] or "", i)


def _device_rank(tensors: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    first_seen: dict[torch.device, int] = {}
    for tensor in tensors:
        first_seen.setdefault(tensor.device, len(first_seen))
    return lambda i: first_seen[tensors[i].device]


class _ChunkBuilder:
    """Appends tensors to the stream, opening chunks as they fill."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._starts: list[int] = []
        self._lengths: list[int] = []
        self._devices: list[torch.device] = []
        self._members: list[list[int]] = []

    def chunk_start(self, chunk: int) -> int:
        return self._starts[chunk]

    def _open(self, device: torch.device) -> None:
        start = self._starts[-1] + _align(self._lengths[-1]) if self._starts else 0
        self._starts.append(start)
        self._lengths.append(0)
        self._devices.append(device)
        self._members.append([])

    def place(self, index: int, nbytes: int, device: torch.device) -> tuple[Piece, ...]:
        if not self._starts or self._devices[-1] != device:
            self._open(device)
        offset = _align(self._lengths[-1])
        if offset >= self.chunk_bytes and nbytes:
            self._open(device)
            offset = 0
        pieces = []
        done = 0
        while True:
            take = min(nbytes - done, self.chunk_bytes - offset)
            pieces.append(Piece(len(self._starts) - 1, offset, take, done))
            self._members[-1].append(index)
            self._lengths[-1] = offset + take
            done += take
            if done >= nbytes:
                return tuple(pieces)
            self._open(device)  # the tensor goes on at the start of the next chunk
            offset = 0

    def finish(self) -> tuple[Chunk, ...]:
        return tuple(
            Chunk(i, self._devices[i], self._starts[i], self._lengths[i], tuple(self._members[i]))
            for i in range(len(self._starts))
        )


def describe(layout: Layout) -> str:
    sizes = ", ".join(f"{c.nbytes / 2**20:.1f}" for c in layout.chunks)
    return (
        f"{len(layout.tensors)} tensors, {layout.nbytes / 2**20:.1f} MiB in "
        f"{len(layout.chunks)} chunks of [{sizes}] MiB"
    )
