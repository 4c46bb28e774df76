"""Reading a torch.distributed.checkpoint directory for ``aiockpt import``, as hostile input.

DCP's ``.metadata`` is a pickle: it is unpickled by an unpickler that admits exactly the
classes DCP's metadata is made of, and may only set the fields of those DCP records. The
data files it names must be plain relative paths inside the directory (opened with
O_NOFOLLOW and O_NONBLOCK, regular files only), and every declared range must lie inside
the real size of its file, and all of them together inside what the files hold, checked
before anything is allocated. Values load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import os
import pathlib
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, cast

import torch

from ..errors import ConversionError
from .foreign import first_line, load_weights, read_range, regular_file

__all__ = ["DCP_METADATA_NAME", "MAX_DCP_METADATA_BYTES", "read_dcp"]

DCP_METADATA_NAME = ".metadata"
# A real DCP .metadata holds a few hundred bytes per tensor chunk: far below this even for
# models of many thousands of tensors saved by thousands of ranks.
MAX_DCP_METADATA_BYTES = 256 * 2**20

_DCP_HINT = "pass a directory that torch.distributed.checkpoint.save wrote"


# -- DCP metadata: a pickle, read by an allow-list ---------------------------------------------


class _RefusedPickle(pickle.UnpicklingError):
    """The metadata reaches for something DCP's metadata is never made of."""


def _dcp_classes() -> tuple[dict[tuple[str, str], Any], tuple[type, ...]]:
    """(the globals DCP's metadata may name, the record classes whose fields it may set)."""
    from torch.distributed.checkpoint import filesystem, metadata

    records: tuple[type, ...] = (
        metadata.Metadata,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.ChunkStorageMetadata,
        metadata.TensorProperties,
        metadata.MetadataIndex,
        metadata.StorageMeta,
        filesystem._StorageInfo,
    )
    allowed: dict[tuple[str, str], Any] = {(cls.__module__, cls.__name__): cls for cls in records}
    encoding = metadata._MEM_FORMAT_ENCODING  # how TensorProperties pickles its memory format
    allowed[(encoding.__module__, encoding.__name__)] = encoding
    allowed[("torch", "Size")] = torch.Size
    allowed[("collections", "OrderedDict")] = OrderedDict
    get_layout = getattr(torch.serialization, "_get_layout", None)  # how a torch.layout pickles
    if get_layout is not None:
        allowed[("torch.serialization", "_get_layout")] = get_layout
    for module in ("pathlib", "pathlib._local"):  # StorageMeta.checkpoint_id may be a Path
        for name in ("Path", "PosixPath", "PurePosixPath"):
            allowed[(module, name)] = getattr(pathlib, name)
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed, records


class _DcpMetadataUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Unpickles DCP's ``.metadata`` admitting exactly the classes it is made of.

    The pure-Python unpickler, because its opcodes can be overridden: restricting
    ``find_class`` alone is not enough, as BUILD would let a pickle set any attribute of
    any object it holds (a class's methods included) or call a ``__setstate__`` it planted.
    Here BUILD may only set the declared fields of DCP's own records. Calls (REDUCE,
    NEWOBJ) can only reach the allowed classes, which build inert records.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._allowed, self._records = _dcp_classes()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise _RefusedPickle(f"names {module}.{name}, which DCP metadata never holds")
        return found

    def _load_build(self) -> None:
        stack: list[Any] = self.stack  # type: ignore[attr-defined]
        state, target = stack[-1], stack[-2]
        kind = type(target)
        if kind not in self._records:
            raise _RefusedPickle(f"sets the state of a {kind.__module__}.{kind.__qualname__}")
        # A tuple goes to a record's own __setstate__ (TensorProperties unpacks five plain
        # values); a dict may only name the record's declared fields.
        fields = {f.name for f in dataclasses.fields(target)}
        for_setstate = isinstance(state, tuple) and "__setstate__" in vars(kind)
        if not for_setstate and not (isinstance(state, dict) and set(state) <= fields):
            raise _RefusedPickle(
                f"sets a state of {kind.__qualname__} beyond its fields ({type(state).__name__})"
            )
        _BUILD(cast(Any, self))

    dispatch[pickle.BUILD[0]] = _load_build


_BUILD = pickle._Unpickler.dispatch[pickle.BUILD[0]]  # type: ignore[attr-defined]


def _read_dcp_metadata(source: Path) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata

    where = source / DCP_METADATA_NAME
    if not source.is_dir():
        raise ConversionError(
            f"{source}: is not a directory; a DCP checkpoint is a directory", hint=_DCP_HINT
        )
    if not os.path.lexists(where):
        raise ConversionError(
            f"{source}: not a torch.distributed.checkpoint directory (no .metadata)",
            hint=_DCP_HINT,
        )
    with regular_file(where, follow_symlinks=False) as (fd, size):
        if size > MAX_DCP_METADATA_BYTES:
            raise ConversionError(
                f"{where}: is {size} bytes, over the {MAX_DCP_METADATA_BYTES} limit",
                hint=_DCP_HINT,
            )
        raw = read_range(fd, 0, size, str(where))
    try:
        metadata = _DcpMetadataUnpickler(io.BytesIO(raw)).load()
    except _RefusedPickle as exc:
        raise ConversionError(
            f"{where}: refused: the metadata {exc}, so it cannot be loaded safely",
            hint="re-save the checkpoint with torch.distributed.checkpoint.save",
        ) from exc
    except Exception as exc:  # any malformed pickle: truncated, wrong opcodes, bad values
        raise ConversionError(
            f"{where}: is not DCP metadata ({type(exc).__name__}: {first_line(exc)})",
            hint=_DCP_HINT,
        ) from exc
    if type(metadata) is not Metadata:
        raise ConversionError(f"{where}: does not hold DCP Metadata", hint=_DCP_HINT)
    return metadata


# -- DCP metadata: what it declares, checked -----------------------------------------------------

PathKey = str | int


@dataclass(frozen=True)
class _Range:
    file: str
    offset: int
    length: int


@dataclass
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    where: _Range


@dataclass
class _Entry:
    """One value of the DCP state: a tensor (in chunks) or one torch.save'd object."""

    fqn: str
    path: tuple[PathKey, ...]
    dtype: torch.dtype | None  # None: a non-tensor value
    size: tuple[int, ...]
    chunks: list[_Chunk]


class _Checker:
    def __init__(self, where: Path) -> None:
        self.where = where

    def fail(self, problem: str) -> ConversionError:
        return ConversionError(f"{self.where}: {problem}", hint=_DCP_HINT)

    def shape(self, value: Any, what: str) -> tuple[int, ...]:
        if not isinstance(value, (tuple, list)) or not all(
            type(v) is int and v >= 0 for v in value
        ):
            raise self.fail(f"{what} is not a shape of non-negative integers: {value!r}")
        return tuple(value)

    def storage_range(self, info: Any, fqn: str) -> _Range:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        if type(info) is not _StorageInfo:
            raise self.fail(f"{fqn!r} has no storage record")
        if getattr(info, "transform_descriptors", None):
            raise self.fail(
                f"{fqn!r} is stored through transforms {info.transform_descriptors!r}, "
                "which import does not read"
            )
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise self.fail(f"{fqn!r} has a bad byte range ({offset!r}, {length!r})")
        return _Range(self.relative_path(getattr(info, "relative_path", None), fqn), offset, length)

    def relative_path(self, name: Any, fqn: str) -> str:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise self.fail(f"{fqn!r} names a bad data file {name!r}")
        parts = PurePosixPath(name)
        if parts.is_absolute() or ".." in parts.parts or "\\" in name:
            raise self.fail(f"{fqn!r} names data file {name!r}, outside the checkpoint directory")
        return name

    def object_path(self, value: Any, fqn: str, bound: int) -> tuple[PathKey, ...]:
        if not isinstance(value, tuple) or not value or not isinstance(value[0], str):
            raise self.fail(f"{fqn!r} has a bad state path {value!r}")
        for key in value:
            # A list index can't be beyond the number of values: no list of 10^9 Nones.
            if not (isinstance(key, str) or (type(key) is int and 0 <= key < bound)):
                raise self.fail(f"{fqn!r} has a bad state path {value!r}")
        return value


def _entries(metadata: Any, where: Path) -> list[_Entry]:
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    check = _Checker(where)
    declared = metadata.state_dict_metadata
    storage = metadata.storage_data
    paths = metadata.planner_data
    if not isinstance(declared, dict) or not isinstance(storage, dict):
        raise check.fail("holds no state_dict_metadata/storage_data")
    if paths is not None and not isinstance(paths, dict):
        raise check.fail("has planner_data that is not a mapping")
    ranges: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for index, info in storage.items():
        if type(index) is not MetadataIndex or not isinstance(index.fqn, str):
            raise check.fail(f"has a bad storage key {index!r}")
        offset = None if index.offset is None else check.shape(index.offset, "a storage offset")
        ranges[(index.fqn, offset)] = info
    entries = []
    for fqn, value in declared.items():
        if not isinstance(fqn, str):
            raise check.fail(f"has a state name that is not a string: {fqn!r}")
        path = (fqn,) if paths is None else check.object_path(paths.get(fqn), fqn, len(declared))
        if type(value) is BytesStorageMetadata:
            chunk = _Chunk((), (), check.storage_range(ranges.get((fqn, None)), fqn))
            entries.append(_Entry(fqn, path, None, (), [chunk]))
            continue
        properties = getattr(value, "properties", None)
        if type(value) is not TensorStorageMetadata or type(properties) is not TensorProperties:
            raise check.fail(f"{fqn!r} is neither a tensor nor a value record")
        dtype = value.properties.dtype
        if not isinstance(dtype, torch.dtype):
            raise check.fail(f"{fqn!r} has dtype {dtype!r}")
        size = check.shape(value.size, f"{fqn!r} size")
        if not isinstance(value.chunks, list):
            raise check.fail(f"{fqn!r} has no chunk list")
        chunks: list[_Chunk] = []
        for record in value.chunks:
            if type(record) is not ChunkStorageMetadata:
                raise check.fail(f"{fqn!r} has a bad chunk record")
            offsets = check.shape(record.offsets, f"{fqn!r} chunk offsets")
            sizes = check.shape(record.sizes, f"{fqn!r} chunk sizes")
            if (
                len(offsets) != len(size)
                or len(sizes) != len(size)
                or any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True))
            ):
                raise check.fail(f"{fqn!r} has a chunk {offsets}+{sizes} outside its size {size}")
            stored = check.storage_range(ranges.get((fqn, offsets)), fqn)
            if math.prod(sizes) * dtype.itemsize > stored.length:
                raise check.fail(
                    f"{fqn!r} declares a chunk of {math.prod(sizes) * dtype.itemsize} bytes "
                    f"stored in {stored.length}"
                )
            chunks.append(_Chunk(offsets, sizes, stored))
        if sum(math.prod(c.sizes) for c in chunks) != math.prod(size):
            raise check.fail(f"the chunks of {fqn!r} do not make up its size {size}")
        entries.append(_Entry(fqn, path, dtype, size, chunks))
    return entries


def _check_files(source: Path, entries: list[_Entry]) -> dict[str, int]:
    """Sizes of the data files, each a regular file inside ``source``; every declared range
    lies inside its file, and all of them together inside what the files hold."""
    check = _Checker(source / DCP_METADATA_NAME)
    root = Path(os.path.realpath(source))
    sizes: dict[str, int] = {}
    declared = 0
    for entry in entries:
        for chunk in entry.chunks:
            name = chunk.where.file
            if name not in sizes:
                path = source / name
                if not Path(os.path.realpath(path)).is_relative_to(root):
                    raise check.fail(
                        f"{entry.fqn!r} names data file {name!r}, outside the checkpoint directory"
                    )
                with regular_file(path, follow_symlinks=False) as (_, size):
                    sizes[name] = size
            if chunk.where.offset + chunk.where.length > sizes[name]:
                raise check.fail(
                    f"{entry.fqn!r} claims bytes {chunk.where.offset}.."
                    f"{chunk.where.offset + chunk.where.length} of {name}, which holds "
                    f"{sizes[name]} bytes"
                )
            declared += chunk.where.length
    if declared > sum(sizes.values()):
        raise check.fail(
            f"declares {declared} bytes of data in files that hold {sum(sizes.values())}: "
            "ranges overlap"
        )
    return sizes


# -- DCP: reading the values -------------------------------------------------------------------


class _Conflict(Exception):
    """Two values of a DCP state claim the same place, or a key of the wrong kind."""


def _place(root: dict[str, Any], path: tuple[PathKey, ...], value: Any) -> None:
    """Put ``value`` at ``path`` in ``root``: dicts for string keys, lists for int keys."""
    node: Any = root
    for key, following in itertools.pairwise(path):
        child = _get(node, key)
        if child is None:
            child = [] if isinstance(following, int) else {}
            _assign(node, key, child)
        elif not isinstance(child, list if isinstance(following, int) else dict):
            raise _Conflict
        node = child
    if _get(node, path[-1]) is not None:
        raise _Conflict
    _assign(node, path[-1], value)


def _get(node: Any, key: PathKey) -> Any:
    if isinstance(node, dict) and isinstance(key, str):
        return node.get(key)
    if isinstance(node, list) and isinstance(key, int):
        return node[key] if key < len(node) else None
    raise _Conflict


def _assign(node: Any, key: PathKey, value: Any) -> None:
    if isinstance(node, list) and isinstance(key, int):
        node.extend([None] * (key + 1 - len(node)))
    node[key] = value


def _load_range(fd: int, chunk: _Chunk, where: str) -> Any:
    data = read_range(fd, chunk.where.offset, chunk.where.length, where)
    return load_weights(io.BytesIO(data), len(data), where)


def read_dcp(source: Path) -> dict[str, Any]:
    """The nested state of DCP checkpoint directory ``source``."""
    metadata = _read_dcp_metadata(source)
    entries = _entries(metadata, source / DCP_METADATA_NAME)
    _check_files(source, entries)
    check = _Checker(source / DCP_METADATA_NAME)
    values: dict[str, Any] = {}
    covered: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[tuple[_Entry, _Chunk]]] = {}
    for entry in entries:
        for chunk in entry.chunks:
            by_file.setdefault(chunk.where.file, []).append((entry, chunk))
    for name, pieces in by_file.items():
        # Opened again (and checked again) to read: the sizes were checked above.
        with regular_file(source / name, follow_symlinks=False) as (fd, size):
            pieces.sort(key=lambda piece: piece[1].where.offset)
            if any(c.where.offset + c.where.length > size for _, c in pieces):
                raise check.fail(f"{name} shrank while it was read")
            for entry, chunk in pieces:
                where = f"{source / name} ({entry.fqn!r})"
                value = _load_range(fd, chunk, where)
                if entry.dtype is None:
                    values[entry.fqn] = value
                    continue
                _check_chunk(value, entry, chunk, where)
                if len(entry.chunks) == 1:
                    values[entry.fqn] = value
                    continue
                _copy_chunk(values, covered, entry, chunk, value, check)
    for fqn, mask in covered.items():
        if not bool(mask.all()):
            raise check.fail(f"the chunks of {fqn!r} overlap and leave parts of it unwritten")
    state: dict[str, Any] = {}
    for entry in entries:
        try:
            _place(state, entry.path, values[entry.fqn])
        except _Conflict:
            raise check.fail(
                f"{entry.fqn!r} has state path {entry.path!r}, which conflicts with another"
            ) from None
    return state


def _check_chunk(value: Any, entry: _Entry, chunk: _Chunk, where: str) -> None:
    if (
        not isinstance(value, torch.Tensor)
        or value.dtype != entry.dtype
        or tuple(value.shape) != chunk.sizes
    ):
        got = (
            f"{value.dtype} {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise ConversionError(
            f"{where}: holds {got} where the metadata declares {entry.dtype} {chunk.sizes}",
            hint=_DCP_HINT,
        )


def _copy_chunk(
    values: dict[str, Any],
    covered: dict[str, torch.Tensor],
    entry: _Entry,
    chunk: _Chunk,
    value: torch.Tensor,
    check: _Checker,
) -> None:
    """Copy one chunk of a sharded tensor into place, refusing chunks that overlap."""
    if entry.fqn not in values:
        # Bounded: the chunks' bytes were checked against the files before this.
        values[entry.fqn] = torch.empty(entry.size, dtype=entry.dtype)
        covered[entry.fqn] = torch.zeros(entry.size, dtype=torch.bool)
    index = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
    seen = covered[entry.fqn][index]
    if bool(seen.any()):
        raise check.fail(f"the chunks of {entry.fqn!r} overlap")
    seen.fill_(True)
    values[entry.fqn][index] = value
