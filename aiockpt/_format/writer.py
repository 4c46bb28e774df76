"""Manifests of one writer, encoded and checked at the cost of what changed.

The checkpoints of an unchanged layout share almost all of their manifest: the files, and
each tensor's name, dtype, shape and pieces. Only the step, the time, the pieces'
checksums and the non-tensor state differ. Building thousands of records again, encoding
them and parsing the result back (so that nothing is committed that a reader would refuse)
costs tens of milliseconds of Python per commit, on the event loop's thread, and every one
of them is taken from the training thread, which needs the GIL to launch its kernels.

So the first manifest of a layout is built and validated in full by the reader's own parser
(``Manifest.to_json``), and kept as text cut around its checksums. Later manifests of the
same layout are that text with the new checksums put in, and the parts that can differ are
validated as a reader validates them: the state (decoded as a reader decodes it, and checked
against the tensor table), the size and the container count of the whole. The bytes are the
same as ``Manifest.to_json`` gives for the same manifest (a test holds both to that).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import crc32c

from ..errors import CorruptCheckpointError
from .manifest import (
    _SHA256_HEX,
    FORMAT_NAME,
    MAX_MANIFEST_BYTES,
    MAX_STEP,
    SHARED_FILE_PATTERN,
    SHARED_FILES_VERSION,
    Manifest,
    SharedFiles,
    SkeletonError,
    TensorRecord,
    _Parser,
    _tensor_json,
    _unique_keys,
    check_skeleton,
    manifest_from_layout,
    refused_manifest,
)
from .tags import format_version_for

__all__ = ["ManifestWriter"]

# Stands for a checksum in the kept text; no JSON encoding of a checksum (an integer)
# or of a name (a string, its NUL escaped) can produce it.
_HOLE = "\x00checksum\x00"
_HOLE_JSON = json.dumps(_HOLE)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


class _Template:
    """The text of one layout's manifest, cut around its checksums."""

    def __init__(
        self, manifest: Manifest, key: tuple[object, ...], layout_tensors: Sequence[Any]
    ) -> None:
        self.key = key
        # Where each checksum goes, in the order the text has its holes; a piece with a
        # digest has two holes: its checksum, then its digest.
        self.pieces = [
            (placement.index, j)
            for placement in layout_tensors
            for j in range(len(placement.pieces))
        ]
        self.versions = manifest.versions
        self.files = [{"name": f.name, "nbytes": f.nbytes} for f in manifest.files]
        holed = [
            replace(
                t,
                pieces=tuple(
                    replace(
                        p,
                        checksum=_HOLE,  # type: ignore[arg-type]
                        digest=None if p.digest is None else _HOLE,
                    )
                    for p in t.pieces
                ),
            )
            for t in manifest.tensors
        ]
        self.fragments = _dumps([_tensor_json(t) for t in holed]).split(_HOLE_JSON)
        # The tensor table a reader would parse, for checking the state against it.
        self.tensors: tuple[TensorRecord, ...] = manifest.tensors
        # Tags are looked for in the whole text; the state is the one part that changes
        # (numbers cannot hold a tag, and the parts meet at fixed keys).
        fixed = _dumps(self.files) + _dumps(self.versions) + "".join(self.fragments)
        self.version = format_version_for(fixed.encode(), 1)
        if any(SHARED_FILE_PATTERN.fullmatch(f.name) for f in manifest.files):
            self.version = max(self.version, SHARED_FILES_VERSION)

    def tensors_text(self, checksums: Sequence[int], digests: Sequence[str | None] | None) -> str:
        parts = [self.fragments[0]]
        if digests is None:
            for checksum, fragment in zip(checksums, self.fragments[1:], strict=True):
                parts.append(str(checksum))
                parts.append(fragment)
            return "".join(parts)
        fragments = iter(self.fragments[1:])
        for checksum, digest in zip(checksums, digests, strict=True):
            parts.append(str(checksum))
            parts.append(next(fragments))
            if digest is not None:  # the same pieces as the template's have one
                parts.append(f'"{digest}"')  # hex digits: a JSON string as they are
                parts.append(next(fragments))
        return "".join(parts)


class ManifestWriter:
    """Encodes the manifests of one single-process writer (see the module docstring)."""

    def __init__(self) -> None:
        self._template: _Template | None = None

    def encode(
        self,
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
    ) -> bytes:
        """The manifest file's bytes, as ``manifest_from_layout(...).to_json()`` gives them.

        Raises:
            UnsupportedStateError: a reader would refuse the manifest; nothing is committed.
        """
        # The layout, names and layers are kept objects, replaced when the state's
        # structure changes: the same objects mean the same tensor table.
        # An incremental checkpoint's files and pieces' files are part of the kept text:
        # with a frozen part of the state they are the same from one checkpoint to the next.
        files = shared.files if shared is not None else None
        piece_files = shared.piece_files if shared is not None else None
        # Which pieces have a digest changes the text's holes.
        with_digests = None if digests is None else frozenset(digests)
        key = (
            layout_tensors, names, layers, tuple(file_names), tuple(chunk_sizes), files,
            piece_files, with_digests,
        )  # fmt: skip
        template = self._template
        if template is None or not _same(template.key, key) or template.versions != versions:
            manifest = manifest_from_layout(
                step=step,
                created=created,
                versions=versions,
                names=names,
                layout_tensors=layout_tensors,
                chunk_sizes=chunk_sizes,
                file_names=file_names,
                checksums=checksums,
                state=state,
                layers=layers,
                shared=shared,
                digests=digests,
            )
            payload = manifest.to_json()  # validated in full, as a reader would
            self._template = _Template(manifest, key, layout_tensors)
            return payload
        order = [checksums[piece] for piece in template.pieces]
        digest_order = (
            None if digests is None else [digests.get(piece) for piece in template.pieces]
        )
        return _encode(template, step, created, order, state, digest_order)


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    # Mostly the very same objects (then no element is compared); lists of the same
    # elements compare by identity element by element, which is cheap too.
    return all(x is y or x == y for x, y in zip(a, b, strict=True))


def _encode(
    template: _Template,
    step: int,
    created: float,
    checksums: list[int],
    state: dict[str, Any],
    digests: list[str | None] | None = None,
) -> bytes:
    if not 0 <= step <= MAX_STEP or not math.isfinite(created):
        raise refused_manifest(step, f"step {step} or time {created} out of range")
    try:
        state_text = _dumps(state)
    except ValueError as exc:
        raise refused_manifest(step, str(exc)) from exc
    if digests is not None and not all(d is None or _SHA256_HEX.fullmatch(d) for d in digests):
        raise refused_manifest(step, "a piece's sha256 is not 64 lowercase hex digits")
    tensors_text = template.tensors_text(checksums, digests)

    def document(version: int) -> str:
        head = _dumps(
            {
                "format": FORMAT_NAME,
                "format_version": version,
                "step": step,
                "created": created,
                "world_size": 1,
                "versions": template.versions,
                "checksum": "crc32c",
                "files": template.files,
            }
        )
        # json.dumps of a dict is its members' encodings in order: the same text as
        # encoding the whole document at once (Manifest._serialize).
        return f'{head[:-1]},"tensors":{tensors_text},"state":{state_text}}}'

    version = max(template.version, format_version_for(state_text.encode(), 1))
    canonical = document(version).encode()
    payload = canonical[:-1] + b',"manifest_crc32c":%d}' % crc32c.crc32c(canonical)
    _check_changing_parts(template, payload, state_text, step)
    return payload


def _check_changing_parts(template: _Template, payload: bytes, state_text: str, step: int) -> None:
    """What a reader checks of the parts that differ from the validated first manifest."""
    parser = _Parser("manifest")
    try:
        if len(payload) > MAX_MANIFEST_BYTES:
            raise parser.fail(
                f"manifest is {len(payload)} bytes, over the {MAX_MANIFEST_BYTES} limit"
            )
        parser.containers(payload)
        # Decoded as a reader decodes it: JSON turns keys into strings, which can make two
        # keys one, and the skeleton is checked against the same tensor table.
        try:
            decoded = json.loads(
                state_text, parse_constant=parser._reject_constant, object_pairs_hook=_unique_keys
            )
        except (ValueError, RecursionError) as exc:
            raise parser.fail(f"manifest is not valid JSON ({exc})") from exc
        try:
            check_skeleton(parser.mapping(decoded, "state"), template.tensors, 1)
        except SkeletonError as exc:
            raise parser.fail(str(exc)) from None
    except CorruptCheckpointError as exc:
        raise refused_manifest(step, str(exc).removeprefix("manifest: ")) from exc
