"""The manifest: the one file that says what a checkpoint holds (docs/FORMAT.md).

Parsing treats the file as hostile: every field is type- and range-checked against the
limits below before anything is allocated or opened, names must be plain data-file
names (no separators, no ``..``), and the skeleton may only use known tags and
in-range tensor indices. Nothing is ever unpickled or executed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import crc32c
import torch

from .._engine.capture.flatten import (
    DTENSOR_TAG,
    RANKS_TAG,
    TENSOR_TAG,
    dtype_from_name,
    dtype_name,
)
from ..errors import CorruptCheckpointError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "FileRecord",
    "Manifest",
    "PieceRecord",
    "TensorRecord",
]

FORMAT_NAME = "aiockpt"
# Version 2 adds what runs of several ranks write ($ranks, $dtensor, world_size > 1); a
# checkpoint of one rank is still written as version 1, readable by older releases.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"

# Limits a reader enforces (docs/FORMAT.md lists them too).
MAX_MANIFEST_BYTES = 256 * 2**20
MAX_TENSORS = 10_000_000
MAX_FILES = 1_000_000
MAX_NDIM = 64
MAX_NAME_CHARS = 4096
MAX_TENSOR_BYTES = 2**48
MAX_SKELETON_DEPTH = 512
DATA_FILE_PATTERN = re.compile(r"data-r\d{5,9}-c\d{5,9}\.bin")
_SKELETON_TAGS = {
    "$tuple",
    "$dict",
    "$float",
    "$bytes",
    "$dtype",
    "$odict",
    "$npscalar",
    DTENSOR_TAG,
    RANKS_TAG,
}


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

    def to_json(self) -> bytes:
        document = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION if self.world_size > 1 else 1,
            "step": self.step,
            "created": self.created,
            "world_size": self.world_size,
            "versions": self.versions,
            "checksum": self.checksum_algorithm,
            "files": [{"name": f.name, "nbytes": f.nbytes} for f in self.files],
            "tensors": [_tensor_json(t) for t in self.tensors],
            "state": self.state,
        }
        document["manifest_crc32c"] = crc32c.crc32c(_canonical(document))
        return json.dumps(document, allow_nan=False, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Manifest:
        """Validate and decode a manifest; any flaw is a CorruptCheckpointError."""
        return _Parser(where).manifest(raw)


def _canonical(document: dict[str, Any]) -> bytes:
    # json.dumps of what json.loads gave back reproduces the same text (key order kept,
    # floats round-trip through repr), so the writer and a reader checksum the same bytes.
    return json.dumps(document, allow_nan=False, separators=(",", ":")).encode()


def _tensor_json(t: TensorRecord) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": t.name,
        "dtype": dtype_name(t.dtype),
        "shape": list(t.shape),
        "nbytes": t.nbytes,
        "pieces": [
            {"file": p.file, "offset": p.offset, "length": p.length, "crc32c": p.checksum}
            for p in t.pieces
        ],
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
        try:
            doc = json.loads(raw, parse_constant=self._reject_constant)
        except (ValueError, RecursionError) as exc:
            raise self.fail(f"manifest is not valid JSON ({exc})") from exc
        doc = self.mapping(doc, "manifest")
        if doc.get("format") != FORMAT_NAME:
            raise self.fail(f"not an {FORMAT_NAME} manifest (format = {doc.get('format')!r})")
        # Tensor bytes have their own checksums; this one covers everything the manifest
        # says itself, the non-tensor state (learning rates, counters, RNG) included.
        recorded = doc.pop("manifest_crc32c", None)
        if recorded != crc32c.crc32c(_canonical(doc)):
            raise self.fail("manifest fails its crc32c checksum (manifest_crc32c)")
        version = self.integer(doc.get("format_version"), "format_version", 1, 2**31)
        if version > FORMAT_VERSION:
            raise self.fail(
                f"format_version {version} is newer than this aiockpt reads ({FORMAT_VERSION}); "
                "upgrade aiockpt"
            )
        files = self.files(doc.get("files"))
        sizes = {f.name: f.nbytes for f in files}
        tensors = self.tensors(doc.get("tensors"), sizes)
        state = self.mapping(doc.get("state"), "state")
        self.skeleton(state, len(tensors))
        versions = self.mapping(doc.get("versions", {}), "versions")
        algorithm = doc.get("checksum")
        if algorithm != "crc32c":
            raise self.fail(f"unknown checksum algorithm {algorithm!r}")
        created = doc.get("created", 0.0)
        if not isinstance(created, (int, float)) or isinstance(created, bool):
            raise self.fail(f"created = {created!r} is not a number")
        return Manifest(
            step=self.integer(doc.get("step"), "step", 0, 2**63 - 1),
            created=float(created),
            world_size=self.integer(doc.get("world_size", 1), "world_size", 1, 2**31),
            versions={str(k): str(v) for k, v in versions.items()},
            checksum_algorithm=algorithm,
            files=files,
            tensors=tensors,
            state=state,
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
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(f"{what} = {value!r} is not an integer from {low} to {high}")
        return value

    def string(self, value: Any, what: str) -> str:
        if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
            raise self.fail(f"{what} must be a string of at most {MAX_NAME_CHARS} characters")
        return value

    def files(self, value: Any) -> tuple[FileRecord, ...]:
        records = []
        seen: set[str] = set()
        for i, entry in enumerate(self.sequence(value, "files", MAX_FILES)):
            entry = self.mapping(entry, f"files[{i}]")
            name = self.string(entry.get("name"), f"files[{i}].name")
            if not DATA_FILE_PATTERN.fullmatch(name) or name in seen:
                raise self.fail(
                    f"files[{i}].name = {name!r} is not a unique data file name "
                    "(data-rNNNNN-cNNNNN.bin); names may not contain paths"
                )
            seen.add(name)
            records.append(
                FileRecord(
                    name, self.integer(entry.get("nbytes"), f"{name} nbytes", 0, MAX_TENSOR_BYTES)
                )
            )
        return tuple(records)

    def tensors(self, value: Any, sizes: Mapping[str, int]) -> tuple[TensorRecord, ...]:
        records = tuple(
            self.tensor(i, entry, sizes)
            for i, entry in enumerate(self.sequence(value, "tensors", MAX_TENSORS))
        )
        # Pieces may not overlap, so tensors can never claim more bytes than the files
        # hold: a reader allocates at most what is on disk.
        claimed, held = sum(t.nbytes for t in records), sum(sizes.values())
        if claimed > held:
            raise self.fail(f"tensors claim {claimed} bytes but the data files hold {held}")
        return records

    def tensor(self, i: int, entry: Any, sizes: Mapping[str, int]) -> TensorRecord:
        entry = self.mapping(entry, f"tensors[{i}]")
        name = self.string(entry.get("name"), f"tensors[{i}].name")
        where = f"tensor {name!r}"
        dtype_text = self.string(entry.get("dtype"), f"{where} dtype")
        dtype = dtype_from_name(dtype_text)
        if dtype is None:
            raise self.fail(
                f"{where} has dtype {dtype_text!r}, unknown to torch {torch.__version__}"
            )
        shape = tuple(
            self.integer(d, f"{where} shape", 0, MAX_TENSOR_BYTES)
            for d in self.sequence(entry.get("shape"), f"{where} shape", MAX_NDIM)
        )
        nbytes = self.integer(entry.get("nbytes"), f"{where} nbytes", 0, MAX_TENSOR_BYTES)
        expected = math.prod(shape) * dtype.itemsize
        if expected != nbytes:
            raise self.fail(
                f"{where}: shape {list(shape)} of {dtype_text} is {expected} bytes, not {nbytes}"
            )
        pieces = tuple(
            self.piece(where, j, p, sizes)
            for j, p in enumerate(self.sequence(entry.get("pieces"), f"{where} pieces", MAX_FILES))
        )
        if sum(p.length for p in pieces) != nbytes:
            raise self.fail(
                f"{where}: its pieces hold {sum(p.length for p in pieces)} bytes, not {nbytes}"
            )
        layer = entry.get("layer")
        if layer is not None:
            layer = self.string(layer, f"{where} layer")
        return TensorRecord(name, dtype, shape, nbytes, pieces, layer)

    def piece(self, where: str, j: int, entry: Any, sizes: Mapping[str, int]) -> PieceRecord:
        entry = self.mapping(entry, f"{where} piece {j}")
        file = entry.get("file")
        if file not in sizes:
            raise self.fail(
                f"{where} piece {j} names file {file!r}, which the manifest does not list"
            )
        offset = self.integer(entry.get("offset"), f"{where} offset", 0, MAX_TENSOR_BYTES)
        length = self.integer(entry.get("length"), f"{where} length", 0, MAX_TENSOR_BYTES)
        if offset + length > sizes[file]:
            raise self.fail(
                f"{where} claims bytes {offset}..{offset + length} of {file}, "
                f"which holds {sizes[file]} bytes"
            )
        crc = self.integer(entry.get("crc32c"), f"{where} crc32c", 0, 2**32 - 1)
        return PieceRecord(file, offset, length, crc)

    def skeleton(self, state: Mapping[str, Any], tensor_count: int) -> None:
        stack: list[tuple[Any, int]] = [(state, 0)]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_SKELETON_DEPTH:
                raise self.fail(f"state nests deeper than {MAX_SKELETON_DEPTH} levels")
            if isinstance(node, list):
                stack.extend((v, depth + 1) for v in node)
            elif isinstance(node, dict):
                tag = next(iter(node), None)
                if tag in (TENSOR_TAG, "$ndarray"):
                    self.integer(node[tag], "tensor reference", 0, tensor_count - 1)
                elif isinstance(tag, str) and tag.startswith("$"):
                    if tag not in _SKELETON_TAGS:
                        raise self.fail(f"state uses unknown tag {tag!r}")
                    if tag == "$dtype" and dtype_from_name(str(node[tag])) is None:
                        raise self.fail(f"state names unknown dtype {node[tag]!r}")
                    stack.extend((v, depth + 1) for v in node.values())
                else:
                    stack.extend((v, depth + 1) for v in node.values())


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
) -> Manifest:
    """Build the manifest of a written checkpoint from its layout and chunk checksums.

    ``checksums`` maps (tensor index, piece number) to the crc32c of that piece.
    """
    tensors = []
    for placement in layout_tensors:
        pieces = tuple(
            PieceRecord(
                file=file_names[p.chunk],
                offset=p.offset,
                length=p.length,
                checksum=checksums[(placement.index, j)],
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
        files=tuple(FileRecord(n, s) for n, s in zip(file_names, chunk_sizes, strict=True)),
        tensors=tuple(tensors),
        state=state,
    )
