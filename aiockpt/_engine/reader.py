"""Reading checkpoints back: concurrent reads, every checksum verified, nothing executed.

Files are opened with O_NOFOLLOW under names the manifest parser already restricted to
plain data-file names, and each file's real size must equal what the manifest claims
before any buffer is allocated, so a hostile checkpoint can neither reach outside its
directory nor make the reader allocate more than the files hold.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._format.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileRecord,
    Manifest,
    TensorRecord,
)
from .._format.skeleton import SavedShards, unflatten_state
from .._util.location import Location, storage_location
from ..errors import AiockptError, CorruptCheckpointError, MissingStateError, NoCheckpointError
from ..storage import open_storage
from ..storage.base import CheckpointStorage, DataFile
from ..storage.fileio import NotRegularFileError
from ..storage.local import parse_step_dir
from ..storage.paths import resolve_checkpoint
from .restore_io import (
    SLOT_BYTES,
    CudaTransfer,
    PinnedRing,
    Segment,
    SegmentReader,
    gpu_room,
    plan_segments,
)

__all__ = [
    "LoadedCheckpoint",
    "OpenCheckpoint",
    "Placement",
    "check_data_size",
    "check_step",
    "load",
    "open_checkpoint",
    "open_checkpoint_file",
    "open_data_file",
    "read_checkpoint",
    "read_manifest",
    "validate_checkpoint",
]

MapLocation = str | torch.device | None
TensorFilter = Callable[[TensorRecord], bool]
# Which device a tensor should be read onto (restore: where the object being loaded keeps it).
Placement = Callable[[TensorRecord], str | torch.device]


def _unopenable(path: Location, exc: OSError) -> CorruptCheckpointError:
    if isinstance(exc, FileNotFoundError):
        return CorruptCheckpointError(f"{path}: file is missing")
    if isinstance(exc, NotRegularFileError):
        return CorruptCheckpointError(f"{path}: {exc.strerror}")
    return CorruptCheckpointError(f"{path}: cannot be opened safely ({exc.strerror})")


def _storage_of(checkpoint: Location) -> CheckpointStorage:
    # Reading takes no lock and writes nothing: the backend is only asked for files.
    return open_storage(checkpoint.parent, durable=False)


def open_checkpoint_file(
    checkpoint: Location, name: str, storage: CheckpointStorage | None = None
) -> DataFile:
    """File ``name`` of ``checkpoint``, opened by its backend (locally: read-only, never
    following a link or blocking on a FIFO). Whatever stands in the way makes the
    checkpoint corrupt."""
    try:
        return (storage or _storage_of(checkpoint)).open_file(checkpoint, name)
    except OSError as exc:
        raise _unopenable(checkpoint / name, exc) from exc


def _check_directory(directory: Location) -> None:
    if not isinstance(directory, Path):
        return  # an object store has no directories: its manifest decides (read_manifest)
    try:
        info = os.lstat(directory)
    except FileNotFoundError as exc:
        raise NoCheckpointError(f"{directory}: no such checkpoint directory") from exc
    except OSError as exc:
        raise CorruptCheckpointError(f"{directory}: cannot be looked at ({exc.strerror})") from exc
    if stat.S_ISREG(info.st_mode):
        raise NoCheckpointError(
            f"{directory} is a file, not a checkpoint directory; `aiockpt import` brings a "
            "torch.save, safetensors or DCP checkpoint in"
        )
    if not stat.S_ISDIR(info.st_mode) and not stat.S_ISLNK(info.st_mode):
        raise CorruptCheckpointError(f"{directory}: is not a directory")


def read_manifest(
    directory: str | os.PathLike[str], storage: CheckpointStorage | None = None
) -> Manifest:
    """The parsed manifest of a checkpoint directory (every file it names unchecked: see
    ``validate_checkpoint``)."""
    checkpoint = storage_location(directory)
    path = checkpoint / MANIFEST_NAME
    _check_directory(checkpoint)
    try:
        file = (storage or _storage_of(checkpoint)).open_file(checkpoint, MANIFEST_NAME)
    except FileNotFoundError as exc:
        if isinstance(checkpoint, Path):
            raise _unopenable(path, exc) from exc
        # Object stores: a checkpoint exists exactly when its manifest does.
        raise NoCheckpointError(f"{checkpoint}: no committed checkpoint there") from exc
    except OSError as exc:
        raise _unopenable(path, exc) from exc
    try:
        if file.size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{path}: manifest is {file.size} bytes, over the {MAX_MANIFEST_BYTES} limit"
            )
        raw = bytearray(file.size)
        file.read_into([memoryview(raw)], 0)
    except EOFError as exc:
        raise CorruptCheckpointError(f"{path}: {exc}") from exc
    except OSError as exc:  # EIO from a bad sector: this checkpoint is unreadable
        raise CorruptCheckpointError(f"{path}: cannot be read ({exc.strerror})") from exc
    finally:
        file.close()
    return Manifest.parse(bytes(raw), str(path))


@dataclass
class OpenCheckpoint:
    """A checkpoint that passed every check short of reading tensor bytes, with its data
    files open (checked on the open descriptors, so nothing can be swapped in after)."""

    path: Location
    manifest: Manifest
    files: dict[str, DataFile]

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        self.files.clear()

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(directory: str | os.PathLike[str]) -> OpenCheckpoint:
    """The one validation every reader and tool goes through before reading tensor bytes.

    The manifest passes ``Manifest.parse``; its step equals the directory's ``step-<N>``;
    every data file it lists is a regular file (no symlink, FIFO or device) whose size
    equals the manifest's ``nbytes``, checked before anything is read or allocated.
    Any failure is a CorruptCheckpointError (NoCheckpointError when nothing is there).
    """
    path = storage_location(directory)
    storage = _storage_of(path)
    manifest = read_manifest(path, storage)
    check_step(path, manifest)
    opened = OpenCheckpoint(path, manifest, {})
    try:
        for record in manifest.files:
            opened.files[record.name] = open_data_file(path, record, storage)
    except BaseException:
        opened.close()
        raise
    return opened


def check_step(path: Location, manifest: Manifest) -> None:
    """A checkpoint's manifest must hold the step its ``step-<N>`` directory names."""
    named_step = parse_step_dir(path.name)
    if named_step is not None and named_step != manifest.step:
        raise CorruptCheckpointError(
            f"{path}: directory says step {named_step} but its manifest says {manifest.step}"
        )


def open_data_file(
    path: Location, record: FileRecord, storage: CheckpointStorage | None = None
) -> DataFile:
    """One data file, opened safely and of exactly the size the manifest lists."""
    file = open_checkpoint_file(path, record.name, storage)
    try:
        check_data_size(path, record, file.size)
    except BaseException:
        file.close()
        raise
    return file


def check_data_size(path: Location, record: FileRecord, size: int) -> None:
    if size != record.nbytes:
        raise CorruptCheckpointError(
            f"{path / record.name}: file holds {size} bytes, the manifest says "
            f"{record.nbytes} (truncated, overwritten or replaced)"
        )


def validate_checkpoint(directory: str | os.PathLike[str]) -> Manifest:
    """``open_checkpoint`` for a verdict alone: the manifest when the checkpoint passes."""
    with open_checkpoint(directory) as opened:
        return opened.manifest


@dataclass
class LoadedCheckpoint:
    """Tensors read and verified from one checkpoint, and how many bytes that took."""

    manifest: Manifest
    path: Location
    tensors: dict[int, torch.Tensor]
    bytes_read: int = 0
    placed: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def state(
        self,
        map_location: MapLocation = "cpu",
        keys: Iterable[str] | None = None,
        *,
        rank: int = 0,
        dtensor: Callable[[SavedShards], Any] = SavedShards.assemble,
    ) -> dict[str, Any]:
        """The nested state, tensors on ``map_location`` (None: where they were read);
        aliases stay one tensor.

        Tensors that were not read (a partial read) are left out of their dicts. State
        saved per rank comes back as ``rank`` saved it; DTensors as ``dtensor`` makes them
        (whole tensors by default).
        """
        device = None if map_location is None else torch.device(map_location)

        def tensor_at(index: int) -> Any:
            if index not in self.tensors:
                if not 0 <= index < len(self.manifest.tensors):
                    raise IndexError(f"tensor index {index} out of range")
                return _NOT_READ
            if device is None:
                return self.tensors[index]
            key = (index, str(device))
            tensor = self.placed.get(key)
            if tensor is None:
                tensor = self.tensors[index].to(device)
                self.placed[key] = tensor
            return tensor

        wanted = self.manifest.state.keys() if keys is None else keys
        try:
            decoded = {
                k: unflatten_state(self.manifest.state[k], tensor_at, rank=rank, dtensor=dtensor)
                for k in wanted
            }
        except (AiockptError, MemoryError):
            raise  # WorldSizeError: this rank has no state here; memory: not the file's fault
        except Exception as exc:
            # The manifest's validator should have refused whatever cannot be decoded; any
            # failure it missed still marks this checkpoint corrupt, so restore falls back.
            raise CorruptCheckpointError(
                f"{self.path / MANIFEST_NAME}: its state cannot be decoded ({exc})"
            ) from exc
        return (
            _without_unread(decoded) if len(self.tensors) < len(self.manifest.tensors) else decoded
        )


class _NotRead:
    def __repr__(self) -> str:
        return "<tensor not read>"


_NOT_READ = _NotRead()


def _without_unread(node: Any) -> Any:
    if isinstance(node, dict):
        kept = {k: _without_unread(v) for k, v in node.items() if v is not _NOT_READ}
        # Refilled in place (the decoded dict is new): keeps its type (OrderedDict, Counter,
        # defaultdict) and the module versions.
        node.clear()
        node.update(kept)
        return node
    if isinstance(node, list):
        return [_without_unread(v) for v in node if v is not _NOT_READ]
    return node


def tensor_filter(
    keys: Iterable[str] | None = None,
    layers: str | None = None,
    *,
    layered: Iterable[str] | None = None,
) -> TensorFilter | None:
    """Select tensors by top-level key and by a regular expression on their layer.

    Tensors without a layer (non-module state) are kept when their key is selected, and
    so are all tensors of keys outside ``layered`` (when given): those are taken whole.
    """
    if keys is None and layers is None:
        return None
    wanted = None if keys is None else set(keys)
    pattern = None if layers is None else re.compile(layers)
    by_layer = None if layered is None else set(layered)

    def accept(record: TensorRecord) -> bool:
        key = record.name.split("/", 1)[0]
        if wanted is not None and key not in wanted:
            return False
        if pattern is None or record.layer is None:
            return True
        if by_layer is not None and key not in by_layer:
            return True
        return pattern.search(record.layer) is not None

    return accept


def read_checkpoint(
    directory: str | os.PathLike[str],
    *,
    select: TensorFilter | None = None,
    threads: int = 8,
    verify: bool = True,
    rank_select: Callable[[Manifest, TensorFilter | None], TensorFilter] | None = None,
    place: Placement | None = None,
    pinned: Sequence[torch.Tensor] = (),
) -> LoadedCheckpoint:
    """Read (and verify) the tensors of a checkpoint, into CPU memory unless ``place``
    puts a tensor on a CUDA device.

    With ``select``, only the tensors it accepts are read: their byte ranges alone.
    ``rank_select`` narrows ``select`` further once the manifest is known (what one rank
    of a run needs).
    ``place(record)`` names the device each tensor should land on; CUDA tensors are read
    through a ring of pinned buffers (``pinned``: buffers to borrow for it, else a small
    ring is pinned for this read). A tensor for which the device lacks free memory is read
    into CPU memory instead.
    """
    with open_checkpoint(directory) as opened:
        path, manifest = opened.path, opened.manifest
        if rank_select is not None:
            select = rank_select(manifest, select)
        wanted = [i for i, t in enumerate(manifest.tensors) if select is None or select(t)]
        loaded = LoadedCheckpoint(manifest, path, {})
        destinations = _allocate(manifest.tensors, _devices(manifest.tensors, wanted, place))
        reader = SegmentReader(path, manifest.tensors, opened.files, destinations, verify)
        try:
            _read_segments(reader, threads, pinned)
        except OSError as exc:  # whatever the reads hit, it is this checkpoint that failed
            raise CorruptCheckpointError(f"{path}: cannot be read ({exc})") from exc
    for index in wanted:
        tensor = manifest.tensors[index]
        loaded.tensors[index] = destinations[index].view(tensor.dtype).view(tensor.shape)
        loaded.bytes_read += tensor.nbytes
    return loaded


def _devices(
    records: Sequence[TensorRecord], wanted: list[int], place: Placement | None
) -> dict[int, torch.device]:
    """Where each wanted tensor is read to: its placement while the device has room."""
    cpu = torch.device("cpu")
    if place is None or not torch.cuda.is_available():
        return dict.fromkeys(wanted, cpu)
    devices: dict[int, torch.device] = {}
    room: dict[torch.device, int] = {}
    for index in wanted:
        device = torch.device(place(records[index]))
        if device.type != "cuda":  # other accelerators: host memory, load_state_dict moves it
            devices[index] = cpu
            continue
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in room:
            room[device] = gpu_room(device)
        size = -(-records[index].nbytes // 512) * 512  # the caching allocator's rounding
        if size > room[device]:
            device = cpu  # no room for a temporary: load_state_dict copies from host
        else:
            room[device] -= size
        devices[index] = device
    return devices


def _allocate(
    records: Sequence[TensorRecord], devices: dict[int, torch.device]
) -> dict[int, torch.Tensor]:
    destinations: dict[int, torch.Tensor] = {}
    for index, device in devices.items():
        nbytes = records[index].nbytes
        try:
            destinations[index] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError:  # fragmentation beat the estimate
            devices[index] = torch.device("cpu")
            destinations[index] = torch.empty(nbytes, dtype=torch.uint8)
    return destinations


def _read_segments(reader: SegmentReader, threads: int, pinned: Sequence[torch.Tensor]) -> None:
    """Read every destination's bytes on ``threads`` threads; the first failure raises."""
    by_device: dict[torch.device, list[tuple[int, TensorRecord]]] = {}
    for index, data in reader.destinations.items():
        by_device.setdefault(data.device, []).append((index, reader.records[index]))
    jobs: list[Callable[[], None]] = []
    staged: dict[torch.device, list[Segment]] = {}
    for device, records in by_device.items():
        segments = plan_segments(records)
        if device.type == "cpu":
            jobs += [functools.partial(reader.direct, s) for s in segments]
        else:
            staged[device] = segments
    ring = _ring(staged, threads, pinned) if staged else None
    transfers = {device: CudaTransfer(device) for device in staged}
    try:
        for device, segments in staged.items():
            assert ring is not None
            jobs += [functools.partial(reader.staged, s, ring, transfers[device]) for s in segments]
        with ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="aiockpt-read"
        ) as pool:
            for future in [pool.submit(job) for job in jobs]:
                future.result()
    finally:
        if ring is not None:
            ring.settle()
        for transfer in transfers.values():
            transfer.finish()


def _ring(
    staged: dict[torch.device, list[Segment]], threads: int, pinned: Sequence[torch.Tensor]
) -> PinnedRing:
    """Enough pinned slots for every reader thread and one copy in flight, never more
    than the reads need; borrowed from ``pinned`` when it has room for a few."""
    lengths = [s.length for segments in staged.values() for s in segments]
    slot = min(SLOT_BYTES, -(-max(lengths, default=1) // 4096) * 4096)
    windows = sum(-(-n // slot) for n in lengths)
    count = max(1, min(max(1, threads) + 2, windows))
    borrowed = PinnedRing.carve(pinned, count, slot)
    if len(borrowed) >= min(count, 2):
        return PinnedRing(borrowed)
    ring = torch.empty(count * slot, dtype=torch.uint8, pin_memory=True)
    return PinnedRing(PinnedRing.carve([ring], count, slot))


def load(
    path: str | os.PathLike[str],
    map_location: MapLocation = "cpu",
    *,
    keys: Iterable[str] | None = None,
    layers: str | None = None,
    verify: bool = True,
    rank: int = 0,
) -> dict[str, Any]:
    """Load a checkpoint directory as ``{name: state_dict}`` without the original objects.

    ``keys`` picks top-level entries (e.g. ``["model"]``); ``layers`` is a regular
    expression on layer names (``"blocks\\.[0-3]\\b"``): only those tensors' bytes are read.
    A checkpoint of several ranks gives whole tensors for sharded state, and the per-rank
    state (RNG, ...) of ``rank``.

    Args:
        path: a checkpoint directory, ``<directory>/step-<N>``, or a path given to
            ``aiockpt.save`` (a save killed mid-replace is read from its old copy).
        map_location: the device the tensors are put on.
        keys: the top-level entries to load (None: all of them).
        layers: a regular expression on layer names; only matching tensors are read.
        verify: check every checksum of the bytes read.
        rank: whose per-rank state to give, in a checkpoint of several ranks.

    Returns:
        ``{name: state_dict}``, the names being the keyword names given to the
        Checkpointer; nothing from the checkpoint is unpickled or run.

    Raises:
        NoCheckpointError: nothing is at ``path``.
        CorruptCheckpointError: a file is missing, torn, hostile or fails its checksum.
        MissingStateError: ``keys`` names an entry the checkpoint does not hold (a
            ``RestoreError`` and a ``KeyError``, as ``restore()`` raises).
    """
    wanted = None if keys is None else list(keys)
    device = torch.device(map_location or "cpu")
    # A path-level save killed between moving the old checkpoint aside and renaming the
    # new one in left the old one next to the path: that is the checkpoint at the path.
    location = storage_location(path)
    if isinstance(location, Path):
        location = resolve_checkpoint(location)
    loaded = read_checkpoint(
        location,
        select=tensor_filter(wanted, layers),
        verify=verify,
        place=(lambda record: device) if device.type == "cuda" else None,
    )
    absent = [k for k in wanted or () if k not in loaded.manifest.state]
    if absent:
        raise MissingStateError(
            f"{location} has no state for {absent} (it holds {sorted(loaded.manifest.state)}); "
            "pass keys that it holds, or none for everything"
        )
    return loaded.state(device, keys=wanted, rank=rank)
