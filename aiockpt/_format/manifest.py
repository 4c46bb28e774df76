"""The manifest: the one file that says what a checkpoint holds (docs/FORMAT.md).

Parsing treats the file as hostile: every field is type- and range-checked against the
limits below before anything is allocated or opened, names must be plain data-file
names (no separators, no ``..``), no two pieces may share a byte, no JSON key may appear
twice, and the skeleton may only use known tags, each with exactly the payload the format
gives it. Nothing is ever unpickled or executed. ``Manifest.parse`` is the one validator:
every reader calls it, and so does the writer, on what it is about to commit.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import crc32c
import torch

from .._util.text import shown
from ..errors import CorruptCheckpointError, UnsupportedStateError
from .tags import (
    DEFAULT_FACTORIES,
    DTENSOR_TAG,
    RANKS_TAG,
    SPARSE_LAYOUTS,
    TENSOR_TAG,
    dtype_from_name,
    dtype_name,
    format_version_for,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "FileRecord",
    "Manifest",
    "PieceRecord",
    "SharedFiles",
    "SkeletonError",
    "TensorRecord",
    "check_skeleton",
]

FORMAT_NAME = "aiockpt"
# Version 2 adds what runs of several ranks write ($ranks, $dtensor, world_size > 1);
# version 3 the tags that keep standard types exact ($counter, $namedtuple, $sparse...). A
# checkpoint is written with the lowest version covering what it uses, so one of one rank
# without the newer tags is still version 1, readable by older releases. Version 4 adds
# shared data files (data-r<R>-c<C>-s<M>.bin: bytes first written by step M, kept once on
# disk for every checkpoint that lists them), which incremental checkpoints write.
FORMAT_VERSION = 4
SHARED_FILES_VERSION = 4
MANIFEST_NAME = "manifest.json"

# Limits a reader enforces (docs/FORMAT.md section 8). Every MAX_* below is one, and the
# writer refuses whatever would exceed one (state_limits at capture, Manifest.to_json before
# commit), so a committed checkpoint is never one that readers refuse.
MAX_MANIFEST_BYTES = 256 * 2**20
# JSON objects and arrays cost a reader far more memory than their text ("{}" is 2 bytes,
# a Python dict ~80), so their number is bounded by the manifest's size: at most
# MAX_CONTAINERS_BASE plus MAX_CONTAINERS_PER_MIB per MiB (one per 16 bytes). A real
# manifest has one per ~60 bytes; a manifest of empty objects would otherwise take ~30
# times its size in memory.
MAX_CONTAINERS_BASE = 2**20
MAX_CONTAINERS_PER_MIB = 2**16
MAX_TENSORS = 10_000_000
MAX_FILES = 1_000_000
# Far beyond any real tensor (torch itself sets no limit); bounds the work per entry.
MAX_NDIM = 1024
MAX_DIM = 2**63 - 1  # torch sizes are int64
MAX_TENSOR_BYTES = 2**48
# The decoder recurses about twice per level and must stay well inside Python's default
# recursion limit (1000) whatever the caller's own stack depth; real state nests ~10 deep.
MAX_SKELETON_DEPTH = 128
MAX_STEP = 2**63 - 1
# Data file names carry a rank in at most nine digits.
MAX_WORLD_SIZE = 10**9
DATA_FILE_PATTERN = re.compile(r"data-r\d{5,9}-c\d{5,9}\.bin")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# A shared data file (version 4): the same bytes as data file data-r<R>-c<C>.bin of step M
# (or as the shared file of that name there), one copy on disk for all that list it.
SHARED_FILE_PATTERN = re.compile(r"data-r\d{5,9}-c\d{5,9}-s(0|[1-9]\d{0,18})\.bin")


@dataclass(frozen=True)
class SharedFiles:
    """Where an incremental checkpoint's pieces are: its files (name, nbytes), in order,
    and the file of each (tensor index, piece number) not in its chunk's own file."""

    files: tuple[tuple[str, int], ...]
    piece_files: dict[tuple[int, int], str]


@dataclass(frozen=True, slots=True)
class FileRecord:
    name: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class PieceRecord:
    file: str
    offset: int
    length: int
    checksum: int
    # SHA-256 of the piece's bytes (hex), optional: what incremental checkpoints compare.
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class TensorRecord:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    pieces: tuple[PieceRecord, ...]
    layer: str | None = None


@dataclass(frozen=True)
class Manifest:
    step: int
    created: float
    world_size: int
    versions: dict[str, str]
    checksum_algorithm: str
    files: tuple[FileRecord, ...]
    tensors: tuple[TensorRecord, ...]
    state: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def _serialize(self) -> bytes:
        least = 2 if self.world_size > 1 else 1
        if any(SHARED_FILE_PATTERN.fullmatch(f.name) for f in self.files):
            least = SHARED_FILES_VERSION
        document = {
            "format": FORMAT_NAME,
            "format_version": least,
            "step": self.step,
            "created": self.created,
            "world_size": self.world_size,
            "versions": self.versions,
            "checksum": self.checksum_algorithm,
            "files": [{"name": f.name, "nbytes": f.nbytes} for f in self.files],
            "tensors": [_tensor_json(t) for t in self.tensors],
            "state": self.state,
        }
        canonical = _canonical(document)
        version = format_version_for(canonical, least)
        if version != least:
            document["format_version"] = version
            canonical = _canonical(document)
        document["manifest_crc32c"] = crc32c.crc32c(canonical)
        return json.dumps(document, allow_nan=False, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        """The manifest file's bytes; UnsupportedStateError if a reader would refuse them."""
        try:
            payload = self._serialize()
        except ValueError as exc:  # e.g. an integer of more digits than JSON readers take
            raise self._refused(str(exc)) from exc
        # Nothing is committed that a reader would refuse: what only the written manifest
        # decides (its size, its number of JSON containers), and anything the checks at
        # capture did not cover, is found here, before commit.
        try:
            Manifest.parse(payload, "manifest")
        except CorruptCheckpointError as exc:
            raise self._refused(str(exc).removeprefix("manifest: ")) from exc
        return payload

    def _refused(self, problem: str) -> UnsupportedStateError:
        return refused_manifest(self.step, problem)

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Manifest:
        """Validate and decode a manifest; any flaw is a CorruptCheckpointError."""
        try:
            return _Parser(where).manifest(raw)
        except (CorruptCheckpointError, MemoryError):
            raise
        except Exception as exc:  # a rule the checks above missed: still this file's flaw
            raise CorruptCheckpointError(
                f"{where}: manifest cannot be validated ({type(exc).__name__}: {exc})"
            ) from exc


def refused_manifest(step: int, problem: str) -> UnsupportedStateError:
    """The error of a checkpoint not committed because every reader would refuse its
    manifest (``problem`` says why)."""
    return UnsupportedStateError(
        f"checkpoint of step {step} is not committed: every reader would refuse it "
        f"({problem}); change or leave out that part of the state in state_dict()"
    )


def _canonical(document: dict[str, Any]) -> bytes:
    # json.dumps of what json.loads gave back reproduces the same text (key order kept,
    # floats round-trip through repr), so the writer and a reader checksum the same bytes.
    return json.dumps(document, allow_nan=False, separators=(",", ":")).encode()


def _piece_json(p: PieceRecord) -> dict[str, Any]:
    record: dict[str, Any] = {
        "file": p.file,
        "offset": p.offset,
        "length": p.length,
        "crc32c": p.checksum,
    }
    if p.digest is not None:
        record["sha256"] = p.digest
    return record


def _tensor_json(t: TensorRecord) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": t.name,
        "dtype": dtype_name(t.dtype),
        "shape": list(t.shape),
        "nbytes": t.nbytes,
        "pieces": [_piece_json(p) for p in t.pieces],
    }
    if t.layer is not None:
        record["layer"] = t.layer
    return record


class _Parser:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: {problem}")

    def manifest(self, raw: bytes) -> Manifest:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise self.fail(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit")
        self.containers(raw)
        try:
            doc = json.loads(
                raw, parse_constant=self._reject_constant, object_pairs_hook=_unique_keys
            )
        except (ValueError, RecursionError) as exc:
            raise self.fail(f"manifest is not valid JSON ({exc})") from exc
        doc = self.mapping(doc, "manifest")
        if doc.get("format") != FORMAT_NAME:
            raise self.fail(f"not an {FORMAT_NAME} manifest (format = {doc.get('format')!r})")
        # Tensor bytes have their own checksums; this one covers everything the manifest
        # says itself, the non-tensor state (learning rates, counters, RNG) included.
        recorded = doc.pop("manifest_crc32c", None)
        try:
            canonical = _canonical(doc)
        except (ValueError, RecursionError) as exc:  # 1e400 parses to inf, which no writer
            raise self.fail(f"manifest cannot be checked against its seal ({exc})") from None
        if recorded != crc32c.crc32c(canonical):
            raise self.fail("manifest fails its crc32c checksum (manifest_crc32c)")
        version = self.integer(doc.get("format_version"), "format_version", 1, 2**31)
        if version > FORMAT_VERSION:
            raise self.fail(
                f"format_version {version} is newer than this aiockpt reads ({FORMAT_VERSION}); "
                "upgrade aiockpt"
            )
        step = self.integer(doc.get("step"), "step", 0, MAX_STEP)
        world_size = self.integer(doc.get("world_size", 1), "world_size", 1, MAX_WORLD_SIZE)
        files = self.files(doc.get("files"), version)
        sizes = {f.name: f.nbytes for f in files}
        tensors = self.tensors(doc.get("tensors"), sizes)
        state = self.mapping(doc.get("state"), "state")
        try:
            check_skeleton(state, tensors, world_size)
        except SkeletonError as exc:
            raise self.fail(str(exc)) from None
        versions = self.mapping(doc.get("versions", {}), "versions")
        if not all(isinstance(v, str) for v in versions.values()):
            raise self.fail("versions must map names to strings")
        algorithm = doc.get("checksum")
        if algorithm != "crc32c":
            raise self.fail(f"unknown checksum algorithm {algorithm!r}")
        created = doc.get("created", 0.0)
        if not _is_number(created) or not math.isfinite(created):
            raise self.fail(f"created = {created!r} is not a finite number")
        return Manifest(
            step=step,
            created=float(created),
            world_size=world_size,
            versions=versions,
            checksum_algorithm=algorithm,
            files=files,
            tensors=tensors,
            state=state,
        )

    def containers(self, raw: bytes) -> None:
        """Refuse, before parsing, more JSON objects and arrays than the size allows."""
        allowed = container_allowance(len(raw))
        if raw.count(b"{") + raw.count(b"[") <= allowed:
            return  # an upper bound: brackets inside strings are counted too
        counted = _count_containers(raw)
        if counted > allowed:
            raise self.fail(
                f"manifest holds {counted} JSON objects and arrays in {len(raw)} bytes, over "
                f"the limit of {allowed} (MAX_CONTAINERS_BASE + MAX_CONTAINERS_PER_MIB per MiB)"
            )

    def _reject_constant(self, name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    def mapping(self, value: Any, what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be a JSON object, not {type(value).__name__}")
        return value

    def sequence(self, value: Any, what: str, limit: int) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(f"{what} must be a JSON array, not {type(value).__name__}")
        if len(value) > limit:
            raise self.fail(f"{what} has {len(value)} entries, over the limit of {limit}")
        return value

    def integer(self, value: Any, what: str, low: int, high: int) -> int:
        if type(value) is not int or not low <= value <= high:
            raise self.fail(f"{what} = {_shown(value)} is not an integer from {low} to {high}")
        return value

    def string(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{what} must be a string, not {type(value).__name__}")
        return value

    def files(self, value: Any, version: int = FORMAT_VERSION) -> tuple[FileRecord, ...]:
        records = []
        seen: set[str] = set()
        shared_allowed = version >= SHARED_FILES_VERSION
        for i, entry in enumerate(self.sequence(value, "files", MAX_FILES)):
            entry = self.mapping(entry, f"files[{i}]")
            name = self.string(entry.get("name"), f"files[{i}].name")
            if shared_allowed and SHARED_FILE_PATTERN.fullmatch(name) and name not in seen:
                pass
            elif not DATA_FILE_PATTERN.fullmatch(name) or name in seen:
                raise self.fail(
                    f"files[{i}].name = {_shown(name)} is not a unique data file name "
                    "(data-rNNNNN-cNNNNN.bin); names may not contain paths"
                )
            seen.add(name)
            nbytes = self.integer(entry.get("nbytes"), f"{name} nbytes", 0, MAX_TENSOR_BYTES)
            records.append(FileRecord(name, nbytes))
        return tuple(records)

    def tensors(self, value: Any, sizes: Mapping[str, int]) -> tuple[TensorRecord, ...]:
        records = tuple(
            self.tensor(i, entry, sizes)
            for i, entry in enumerate(self.sequence(value, "tensors", MAX_TENSORS))
        )
        claimed, held = sum(t.nbytes for t in records), sum(sizes.values())
        if claimed > held:
            raise self.fail(f"tensors claim {claimed} bytes but the data files hold {held}")
        self.no_overlaps(records)
        return records

    def no_overlaps(self, records: Sequence[TensorRecord]) -> None:
        """No two pieces share a byte, so the bytes a reader allocates never exceed the
        bytes the files hold, and no tensor's bytes are another's."""
        spans = sorted(
            (p.file, p.offset, p.offset + p.length, i)
            for i, record in enumerate(records)
            for p in record.pieces
            if p.length
        )
        file, end, owner = "", 0, -1
        for piece_file, start, stop, index in spans:
            if piece_file == file and start < end:
                raise self.fail(
                    f"tensors {_shown(records[owner].name)} and {_shown(records[index].name)} "
                    f"overlap in {piece_file} (bytes {start}..{min(end, stop)}); the pieces "
                    "of different tensors may not share bytes"
                )
            if piece_file != file or stop > end:
                file, end, owner = piece_file, stop, index

    def tensor(self, i: int, entry: Any, sizes: Mapping[str, int]) -> TensorRecord:
        # Messages are built only on failure: this runs once per tensor, millions of times
        # in the largest manifests.
        if type(entry) is not dict:
            self.mapping(entry, f"tensors[{i}]")
        name = entry.get("name")
        if type(name) is not str:
            self.string(name, f"tensors[{i}].name")
        dtype_text = entry.get("dtype")
        dtype = dtype_from_name(dtype_text) if type(dtype_text) is str else None
        if dtype is None:
            raise self.fail(
                f"tensor {_shown(name)} has dtype {_shown(dtype_text)}, unknown to "
                f"torch {torch.__version__}"
            )
        shape = entry.get("shape")
        if (
            type(shape) is not list
            or len(shape) > MAX_NDIM
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
        ):
            where = f"tensor {_shown(name)} shape"
            for d in self.sequence(shape, where, MAX_NDIM):
                self.integer(d, where, 0, MAX_DIM)
        nbytes = entry.get("nbytes")
        if type(nbytes) is not int or not 0 <= nbytes <= MAX_TENSOR_BYTES:
            self.integer(nbytes, f"tensor {_shown(name)} nbytes", 0, MAX_TENSOR_BYTES)
        expected = math.prod(shape) * dtype.itemsize
        if expected != nbytes:
            raise self.fail(
                f"tensor {_shown(name)}: shape {_shown(shape)} of {dtype_text} is "
                f"{_shown(expected)} bytes, not {nbytes}"
            )
        pieces = entry.get("pieces")
        if type(pieces) is not list or len(pieces) > MAX_FILES:
            self.sequence(pieces, f"tensor {_shown(name)} pieces", MAX_FILES)
        records = tuple([self.piece(name, j, p, sizes) for j, p in enumerate(pieces)])
        held = sum([p.length for p in records])
        if held != nbytes:
            raise self.fail(f"tensor {_shown(name)}: its pieces hold {held} bytes, not {nbytes}")
        layer = entry.get("layer")
        if layer is not None and type(layer) is not str:
            self.string(layer, f"tensor {_shown(name)} layer")
        return TensorRecord(name, dtype, tuple(shape), nbytes, records, layer)

    def piece(self, name: str, j: int, entry: Any, sizes: Mapping[str, int]) -> PieceRecord:
        if type(entry) is not dict:
            self.mapping(entry, f"tensor {_shown(name)} piece {j}")
        file = entry.get("file")
        held = sizes.get(file) if type(file) is str else None
        if held is None:
            raise self.fail(
                f"tensor {_shown(name)} piece {j} names file {_shown(file)}, which the "
                "manifest does not list"
            )
        offset, length, crc = entry.get("offset"), entry.get("length"), entry.get("crc32c")
        if not (
            type(offset) is int
            and type(length) is int
            and type(crc) is int
            and 0 <= offset <= MAX_TENSOR_BYTES
            and 0 <= length <= MAX_TENSOR_BYTES
            and 0 <= crc < 2**32
        ):
            where = f"tensor {_shown(name)} piece {j}"
            self.integer(offset, f"{where} offset", 0, MAX_TENSOR_BYTES)
            self.integer(length, f"{where} length", 0, MAX_TENSOR_BYTES)
            self.integer(crc, f"{where} crc32c", 0, 2**32 - 1)
        if offset + length > held:
            raise self.fail(
                f"tensor {_shown(name)} piece {j} claims bytes {offset}..{offset + length} of "
                f"{file}, which holds {held} bytes"
            )
        digest = entry.get("sha256")
        if digest is not None and (type(digest) is not str or not _SHA256_HEX.fullmatch(digest)):
            raise self.fail(
                f"tensor {_shown(name)} piece {j} sha256 = {_shown(digest)} is not 64 lowercase "
                "hex digits"
            )
        return PieceRecord(file, offset, length, crc, digest)


def container_allowance(nbytes: int) -> int:
    """How many JSON objects and arrays a manifest of ``nbytes`` bytes may hold."""
    return MAX_CONTAINERS_BASE + nbytes * MAX_CONTAINERS_PER_MIB // 2**20


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _count_containers(raw: bytes) -> int:
    """The exact number of JSON objects and arrays: brackets outside strings."""
    bare = _JSON_STRING.sub(b"", raw)
    return bare.count(b"{") + bare.count(b"[")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is refused, not silently overwritten."""
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {_shown(repeated)} appears twice in one object")
    return mapping


def _float_fits(value: Any, limit: float) -> bool:
    """A finite number within ``limit``, or a ``$float`` naming a non-finite one."""
    if _is_number(value):
        return bool(abs(value) <= limit)
    return type(value) is dict and list(value) == ["$float"] and value["$float"] in _FLOAT_NAMES


def _is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


def _shown(value: Any) -> str:
    return shown(value, limit=200, keep=160)


class SkeletonError(ValueError):
    """The state skeleton breaks a rule of FORMAT.md section 4 or 8; ``node`` is the JSON
    container at fault (a writer finds its path from it)."""

    def __init__(self, problem: str, node: Any) -> None:
        super().__init__(problem)
        self.node = node


# $npscalar dtypes (numpy's dtype.str): booleans, integers, and the floats and complex
# numbers of half, single and double precision; bytes ("|S<n>") and text ("<U<n>") are
# matched by pattern. Anything else (object, void, datetime, long double) is refused: its
# values need pickle, or can be made to allocate what they like.
_INT_RANGES = {
    f"{order}{kind}{size}": (
        (-(2 ** (8 * size - 1)), 2 ** (8 * size - 1) - 1)
        if kind == "i"
        else (0, 2 ** (8 * size) - 1)
    )
    for kind in "iu"
    for size in (1, 2, 4, 8)
    for order in (("|",) if size == 1 else ("<", ">"))
}
_FLOAT_MAX = {
    f"{order}{kind}{size}": largest
    for kind, sizes in (
        ("f", ((2, 65504.0), (4, 3.4028234663852886e38), (8, sys.float_info.max))),
        ("c", ((8, 3.4028234663852886e38), (16, sys.float_info.max))),
    )
    for size, largest in sizes
    for order in ("<", ">")
}
_NPSCALAR_TEXT = re.compile(r"(\|S|[<>]U)([0-9]{1,10})")
_FLOAT_NAMES = frozenset({"nan", "inf", "-inf"})
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
# Tagged values that decode to something hashable, so they may be keys of a $dict.
_HASHABLE_TAGS = frozenset(
    {
        TENSOR_TAG,
        "$tuple",
        "$float",
        "$bytes",
        "$dtype",
        "$npscalar",
        # Exact standard types that are hashable, so they may be dict keys too.
        "$namedtuple",
        "$intenum",
        "$frozenset",
        "$complex",
        "$size",
    }
)


# The torch dtypes Tensor.numpy() converts: an $ndarray's tensor must have one of them.
_NUMPY_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)


def check_skeleton(
    state: Mapping[str, Any],
    tensors: Sequence[Any],
    world_size: int = 1,
    *,
    complete: bool = True,
    known: Mapping[int, tuple[Any, int]] | None = None,
    checked: dict[int, tuple[Any, int]] | None = None,
) -> None:
    """Check a state skeleton against FORMAT.md sections 4 and 8; raise SkeletonError.

    ``tensors`` are the tensor table's entries, anything with ``dtype`` and ``shape`` (the
    manifest's TensorRecords, or the tensors themselves at capture). The same rules serve
    the reader (every manifest) and the writer (at capture), so what one accepts the other
    does too. ``complete=False`` is a single rank's skeleton at capture, whose DTensors
    hold only that rank's shards (their cover is checked once the ranks' parts are merged).

    A writer checks a new skeleton of the same structure incrementally: ``known`` maps
    ``id(container)`` to (container, depth) for containers passed before, and those are
    skipped when found again (the same object, no deeper, over the same tensors; skeletons
    are read-only). Every container passed now is added to ``checked``.
    """
    _SkeletonCheck(tensors, world_size, complete).run(state, known, checked)


class _SkeletonCheck:
    def __init__(self, tensors: Sequence[Any], world_size: int, complete: bool) -> None:
        self.tensors = tensors
        self.world_size = world_size
        self.complete = complete
        self.stack: list[tuple[Any, int]] = []
        self.tags: dict[str, Callable[[dict[str, Any], Any, int], None]] = {
            TENSOR_TAG: self.tensor_ref,
            "$ndarray": self.tensor_ref,
            "$tuple": self.tuple_tag,
            "$dict": self.dict_tag,
            "$odict": self.odict_tag,
            "$float": self.float_tag,
            "$bytes": self.bytes_tag,
            "$dtype": self.dtype_tag,
            "$npscalar": self.npscalar_tag,
            RANKS_TAG: self.ranks_tag,
            DTENSOR_TAG: self.dtensor_tag,
        }
        for tag in _PAYLOAD_CHECKS:
            self.tags[tag] = self.exact_type_tag

    def run(
        self,
        state: Mapping[str, Any],
        known: Mapping[int, tuple[Any, int]] | None,
        checked: dict[int, tuple[Any, int]] | None,
    ) -> None:
        stack = self.stack
        stack.extend((v, 1) for v in state.values())
        tags, count = self.tags, len(self.tensors)
        while stack:
            node, depth = stack.pop()
            kind = type(node)
            if checked is not None and (kind is dict or kind is list):
                seen = None if known is None else known.get(id(node))
                checked[id(node)] = (node, depth)
                if seen is not None and seen[0] is node and depth <= seen[1]:
                    checked[id(node)] = seen
                    continue
            if kind is dict:
                if depth > MAX_SKELETON_DEPTH:
                    raise SkeletonError(
                        f"state nests deeper than {MAX_SKELETON_DEPTH} levels", node
                    )
                tag = next(iter(node), None)
                if tag == TENSOR_TAG and len(node) == 1:  # most tagged nodes: checked inline
                    index = node[tag]
                    if type(index) is not int or not 0 <= index < count:
                        self.index(index, node)
                elif type(tag) is str and tag[:1] == "$":
                    check = tags.get(tag)
                    if check is None:
                        raise SkeletonError(f"state uses unknown tag {_shown(tag)}", node)
                    check(node, node[tag], depth)
                else:
                    stack.extend((v, depth + 1) for v in node.values())
            elif kind is list:
                if depth > MAX_SKELETON_DEPTH:
                    raise SkeletonError(
                        f"state nests deeper than {MAX_SKELETON_DEPTH} levels", node
                    )
                stack.extend((v, depth + 1) for v in node)
            elif kind is float and not math.isfinite(node):
                raise SkeletonError(
                    f"state holds the number {node!r}: a JSON number out of range "
                    "(non-finite floats are written as $float)",
                    None,
                )

    def payload_only(self, node: dict[str, Any], *extra: str) -> None:
        if len(node) == 1:
            return  # the tag alone
        tag = next(iter(node))
        if len(node) > 1 + len(extra) or any(k != tag and k not in extra for k in node):
            raise SkeletonError(f"{tag} object has unexpected keys {_shown(list(node))}", node)

    def array(self, value: Any, depth: int, node: dict[str, Any]) -> None:
        if type(value) is not list:
            raise SkeletonError(f"{next(iter(node))} payload must be a JSON array", node)
        if depth > MAX_SKELETON_DEPTH:
            raise SkeletonError(f"state nests deeper than {MAX_SKELETON_DEPTH} levels", node)

    def index(self, value: Any, node: dict[str, Any]) -> int:
        if type(value) is not int or not 0 <= value < len(self.tensors):
            raise SkeletonError(
                f"tensor reference = {_shown(value)} is not an integer from 0 to "
                f"{len(self.tensors) - 1}",
                node,
            )
        return value

    def tensor_ref(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        self.payload_only(node)
        index = self.index(payload, node)
        if TENSOR_TAG not in node and self.tensors[index].dtype not in _NUMPY_DTYPES:
            raise SkeletonError(
                f"$ndarray names tensor {index} of dtype {self.tensors[index].dtype}, "
                "which numpy cannot hold",
                node,
            )

    def tuple_tag(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        self.payload_only(node)
        self.array(payload, depth + 1, node)
        self.stack.extend((v, depth + 2) for v in payload)

    def dict_tag(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        self.payload_only(node)
        self.array(payload, depth + 1, node)
        plain_keys: set[Any] = set()
        for pair in payload:
            if type(pair) is not list or len(pair) != 2:
                raise SkeletonError("$dict entries must be [key, value] pairs", node)
            key = pair[0]
            if type(key) in (str, int, float, bool) or key is None:
                if key in plain_keys:
                    raise SkeletonError(f"$dict has the key {_shown(key)} twice", node)
                plain_keys.add(key)
            else:
                self.hashable(key, depth + 3, node)
            self.stack.append((key, depth + 3))
            self.stack.append((pair[1], depth + 3))
        if depth + 2 > MAX_SKELETON_DEPTH and payload:
            raise SkeletonError(f"state nests deeper than {MAX_SKELETON_DEPTH} levels", node)

    def hashable(self, key: Any, depth: int, node: dict[str, Any]) -> None:
        """A $dict key must decode to something hashable (lists decode to tuples)."""
        pending = [(key, depth)]
        while pending:
            value, level = pending.pop()
            if level > MAX_SKELETON_DEPTH:
                raise SkeletonError(f"state nests deeper than {MAX_SKELETON_DEPTH} levels", node)
            if type(value) is list:
                pending.extend((v, level + 1) for v in value)
            elif type(value) is dict:
                tag = next(iter(value), None)
                if tag not in _HASHABLE_TAGS:
                    raise SkeletonError(f"$dict key {_shown(value)} is not hashable", node)
                if tag in ("$tuple", "$namedtuple", "$frozenset") and type(value[tag]) is list:
                    pending.extend((v, level + 2) for v in value[tag])

    def exact_type_tag(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        """A tag that keeps a standard type exact (section 4): its payload's shape, then
        everything it holds, checked like the rest of the state."""
        tag = next(iter(node))
        if not _PAYLOAD_CHECKS[tag](payload, node):
            raise SkeletonError(
                f"state has a malformed {tag} object (see docs/FORMAT.md section 4)", node
            )
        self.stack.extend((v, depth + 1) for v in node.values())

    def odict_tag(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        self.payload_only(node, "meta")
        first = next(iter(payload), None) if type(payload) is dict else "$"
        if type(first) is str and first[:1] == "$" and first != "$dict":
            raise SkeletonError("$odict payload must be a JSON object or a $dict", node)
        meta = node.get("meta")
        if meta is not None and type(meta) is not dict:
            raise SkeletonError("$odict meta must be a JSON object", node)
        self.stack.append((payload, depth + 1))
        if meta is not None:
            self.stack.append((meta, depth + 1))

    def float_tag(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        self.payload_only(node)
        if payload not in _FLOAT_NAMES:
            raise SkeletonError(
                f"$float is {_shown(payload)}, not one of 'nan', 'inf', '-inf'", node
            )

    def bytes_tag(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        self.payload_only(node)
        if type(payload) is not str or not _BASE64.fullmatch(payload):
            raise SkeletonError("$bytes is not standard base64 with padding", node)

    def dtype_tag(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        self.payload_only(node)
        if type(payload) is not str or dtype_from_name(payload) is None:
            raise SkeletonError(f"state names unknown dtype {_shown(payload)}", node)

    def npscalar_tag(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        self.payload_only(node, "value")
        if "value" not in node:
            raise SkeletonError("$npscalar has no value", node)
        value = node["value"]
        if type(payload) is not str:
            raise SkeletonError("$npscalar dtype must be a string", node)
        if payload == "|b1":
            fits = type(value) is bool
        elif payload in _INT_RANGES:
            low, high = _INT_RANGES[payload]
            fits = type(value) is int and low <= value <= high
        elif payload in _FLOAT_MAX:
            limit = _FLOAT_MAX[payload]
            if type(value) is dict and list(value) == ["$complex"] and payload[1] == "c":
                parts = value["$complex"]  # a complex scalar: its real and imaginary parts
                fits = type(parts) is list and len(parts) == 2
                fits = fits and all(_float_fits(part, limit) for part in parts)
            else:
                fits = _float_fits(value, limit)
        elif (text := _NPSCALAR_TEXT.fullmatch(payload)) is not None:
            length = int(text[2])
            if text[1] == "|S":
                encoded = value.get("$bytes") if type(value) is dict and len(value) == 1 else None
                fits = (
                    type(encoded) is str
                    and _BASE64.fullmatch(encoded) is not None
                    and len(encoded) // 4 * 3 - encoded[-2:].count("=") <= length
                )
            else:
                fits = type(value) is str and len(value) <= length
            fits = fits and length <= MAX_MANIFEST_BYTES
        else:
            raise SkeletonError(
                f"$npscalar dtype {_shown(payload)} is not allowed (booleans, integers, "
                "half/single/double floats and complex, bytes and text only)",
                node,
            )
        if not fits:
            raise SkeletonError(
                f"$npscalar value {_shown(value)} is not a value of dtype {payload}", node
            )

    def ranks_tag(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        self.payload_only(node)
        self.array(payload, depth + 1, node)
        if len(payload) != self.world_size:
            raise SkeletonError(
                f"{RANKS_TAG} holds {len(payload)} ranks' state, but world_size is "
                f"{self.world_size}",
                node,
            )
        self.stack.extend((v, depth + 2) for v in payload)

    def dtensor_tag(self, node: dict[str, Any], payload: Any, depth: int) -> None:
        self.payload_only(node)
        if type(payload) is not dict or set(payload) != {"shape", "shards"}:
            raise SkeletonError(f"{DTENSOR_TAG} payload must hold shape and shards", node)
        shape, shards = payload["shape"], payload["shards"]
        if (
            type(shape) is not list
            or len(shape) > MAX_NDIM
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise SkeletonError(
                f"{DTENSOR_TAG} shape {_shown(shape)} is not a list of at most {MAX_NDIM} "
                "non-negative integers",
                node,
            )
        if type(shards) is not list or not shards:
            raise SkeletonError(f"{DTENSOR_TAG} shards must be a non-empty list", node)
        covered, dtypes = 0, set()
        boxes: list[tuple[list[int], tuple[int, ...]]] = []
        for shard in shards:
            if type(shard) is not dict or set(shard) != {"offset", "data"}:
                raise SkeletonError(f"{DTENSOR_TAG} shards must hold offset and data", node)
            data, offset = shard["data"], shard["offset"]
            if type(data) is not dict or list(data) != [TENSOR_TAG]:
                raise SkeletonError(f"{DTENSOR_TAG} shard data must be a {TENSOR_TAG}", node)
            tensor = self.tensors[self.index(data[TENSOR_TAG], node)]
            size = tuple(tensor.shape)
            fits = (
                type(offset) is list
                and len(offset) == len(shape) == len(size)
                and all(
                    type(o) is int and o >= 0 and o + n <= d
                    for o, n, d in zip(offset, size, shape, strict=True)
                )
            )
            if not fits:
                raise SkeletonError(
                    f"a shard of shape {list(size)} at {_shown(offset)} lies outside its "
                    f"tensor of shape {shape}",
                    node,
                )
            covered += math.prod(size)
            dtypes.add(tensor.dtype)
            if all(size):
                boxes.append((offset, size))
        if len(dtypes) > 1:
            raise SkeletonError(f"the shards of a {DTENSOR_TAG} have different dtypes", node)
        if not _disjoint_grid(boxes):
            raise SkeletonError(
                f"the shards of a {DTENSOR_TAG} of shape {shape} overlap, or do not lie on one "
                "grid of the tensor",
                node,
            )
        if self.complete and covered != math.prod(shape):
            raise SkeletonError(
                f"the shards of a tensor of shape {shape} cover {covered} of its "
                f"{math.prod(shape)} elements",
                node,
            )


def _disjoint_grid(boxes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> bool:
    """Whether non-empty shards (offset, size) lie on one grid, each in its own cell.

    DTensor shards split each dimension into consecutive ranges (torch.chunk, mesh
    dimension by mesh dimension), so along every dimension two shards' ranges are equal or
    apart, and two shards with the same offsets everywhere would be one cell twice. Both
    hold exactly when no two shards overlap, found in O(n log n) where comparing every
    pair would be quadratic in the number of ranks.
    """
    if len(boxes) < 2:
        return True
    for dim in range(len(boxes[0][0])):
        ranges = sorted({(offset[dim], offset[dim] + size[dim]) for offset, size in boxes})
        if any(end > start for (_, end), (start, _) in itertools.pairwise(ranges)):
            return False
    return len({tuple(offset) for offset, _ in boxes}) == len(boxes)


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _name_in(value: Any, names: Mapping[str, Any]) -> bool:
    return isinstance(value, str) and value in names


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_PAYLOAD_CHECKS: dict[str, Callable[[Any, dict[str, Any]], bool]] = {
    "$ordereddict": lambda p, _: isinstance(p, dict),
    "$counter": lambda p, _: isinstance(p, dict),
    "$defaultdict": lambda p, n: (
        isinstance(p, dict)
        and (n.get("factory") is None or _name_in(n.get("factory"), DEFAULT_FACTORIES))
    ),
    "$namedtuple": lambda p, n: (
        isinstance(p, list)
        and isinstance(n.get("name"), str)
        and _names(n.get("fields"))
        and len(n["fields"]) == len(p)
    ),
    "$intenum": lambda p, n: (
        _is_int(p)
        and isinstance(n.get("name"), str)
        and isinstance(n.get("members"), list)
        and all(
            isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and _is_int(m[1])
            for m in n["members"]
        )
    ),
    "$set": lambda p, _: isinstance(p, list),
    "$frozenset": lambda p, _: isinstance(p, list),
    "$complex": lambda p, _: isinstance(p, list) and len(p) == 2,
    "$bytearray": lambda p, _: isinstance(p, str),
    "$size": lambda p, _: isinstance(p, list) and all(_is_int(d) and d >= 0 for d in p),
    "$grad": lambda p, _: isinstance(p, dict) and next(iter(p), None) == TENSOR_TAG,
    "$parameter": lambda p, n: (
        isinstance(p, dict)
        and next(iter(p), None) == TENSOR_TAG
        and isinstance(n.get("requires_grad"), bool)
    ),
    "$sparse": lambda p, n: (
        _name_in(p, SPARSE_LAYOUTS)
        and isinstance(n.get("shape"), list)
        and all(_is_int(d) and d >= 0 for d in n["shape"])
        and isinstance(n.get("data"), dict)
        and set(n["data"])
        == ({"indices", "values"} if p == "coo" else {"compressed", "plain", "values"})
        and (p != "coo" or isinstance(n.get("coalesced"), bool))
    ),
}


def manifest_from_layout(
    *,
    step: int,
    created: float,
    versions: dict[str, str],
    names: Sequence[str],
    layout_tensors: Sequence[Any],
    chunk_sizes: Sequence[int],
    file_names: Sequence[str],
    checksums: Mapping[tuple[int, int], int],
    state: dict[str, Any],
    layers: Sequence[str | None] | None = None,
    shared: SharedFiles | None = None,
    digests: Mapping[tuple[int, int], str] | None = None,
) -> Manifest:
    """Build the manifest of a written checkpoint from its layout and chunk checksums.

    ``checksums`` maps (tensor index, piece number) to the crc32c of that piece, and
    ``digests`` (optional) to its SHA-256 in hex, for the pieces that have one.
    ``shared`` (an incremental checkpoint): the files it lists instead of one per chunk,
    and the file of each piece that is not in its chunk's own file.
    """
    piece_files = shared.piece_files if shared is not None else {}
    tensors = []
    for placement in layout_tensors:
        pieces = tuple(
            PieceRecord(
                file=piece_files.get((placement.index, j)) or file_names[p.chunk],
                offset=p.offset,
                length=p.length,
                checksum=checksums[(placement.index, j)],
                digest=None if digests is None else digests.get((placement.index, j)),
            )
            for j, p in enumerate(placement.pieces)
        )
        tensors.append(
            TensorRecord(
                name=names[placement.index],
                dtype=placement.dtype,
                shape=placement.shape,
                nbytes=placement.nbytes,
                pieces=pieces,
                layer=layers[placement.index] if layers else None,
            )
        )
    return Manifest(
        step=step,
        created=created,
        world_size=1,
        versions=versions,
        checksum_algorithm="crc32c",
        files=(
            tuple(FileRecord(n, s) for n, s in zip(file_names, chunk_sizes, strict=True))
            if shared is None
            else tuple(FileRecord(n, s) for n, s in shared.files)
        ),
        tensors=tuple(tensors),
        state=state,
    )
