"""Incremental checkpoints: find the tensors that did not change, and share their bytes.

How a change is found, and why so: each piece of every tensor (the bytes one data file
holds of it) gets a SHA-256 digest, computed on the writer thread from the staged copy that
is about to be written, so the training thread pays nothing and the digest is of exactly
the bytes the checkpoint saves. A piece whose digest, length and place in the layout equal
those of the previous committed checkpoint of the same pipeline (the same tier) is not
written again: the new checkpoint lists the file that holds it (storage/sharing.py).

- Exact: it compares content. A tensor changed in place through ``.data`` or under
  ``torch.no_grad()`` (which ``tensor._version`` does not always see) has other bytes, so
  another digest. SHA-256 is a cryptographic hash: two different pieces with one digest
  have never been found, unlike a CRC, which the manifest keeps only to detect damage.
- Cheap: hashlib releases the GIL on large buffers and runs at ~1 GB/s per writer thread,
  overlapped with the writes of other chunks. The digests are kept for the next
  checkpoint's comparison and recorded in the manifest (each piece's ``sha256``), so a
  run that restores compares with what it restored, and a promotion into another tier
  shares what that tier holds already.
- Work is skipped only where that can cost bytes, never exactness: a piece that differed
  at the last SKIP_AFTER checkpoints is written again without hashing (the digest is what
  lets a piece be shared; without one it is simply written). Every PROBE_EVERY
  checkpoints all pieces are hashed again. When the previous checkpoint's file cannot be
  shared any more (retention deleted it meanwhile, a filesystem without hard links), its
  pieces are written like changed ones.

The previous checkpoint is the last one this pipeline committed, and only with the same
layout (same tensors, dtypes, shapes, chunks and names): otherwise everything is written.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._format.manifest import Manifest, SharedFiles
from .._util.location import Location
from ..errors import AiockptError
from ..storage.base import CheckpointStorage
from ..storage.sharing import SharedPieces, shared_name
from .layout import Layout
from .reader import read_manifest

__all__ = ["ChangeTracker", "Tracking", "files_held_by_newest", "share_into"]

PieceKey = tuple[int, int]  # (tensor index, piece number)

# A piece found changed at this many checkpoints in a row is written without hashing until
# the next probe: trained tensors change at every step, so hashing them is work for nothing.
# Every PROBE_EVERY checkpoints every piece is hashed again, so a tensor that stops changing
# (a layer frozen mid-run) is shared a few checkpoints later. A frozen tensor changed once
# (a merge of adapters into it) is hashed on, and shared again from the next checkpoint.
SKIP_AFTER = 2
PROBE_EVERY = 8


def _streak(prior: _Held | None, digest: bytes | None, *, reused: bool) -> int:
    if digest is None:  # not hashed: as changing as before
        return prior.streak if prior is not None else 0
    if reused or prior is None or prior.digest is None:  # equal, or nothing to compare
        return 0
    return prior.streak + 1


@dataclass(frozen=True, slots=True)
class _Held:
    """One piece as a committed checkpoint holds it."""

    file: str
    length: int
    digest: bytes | None  # None: written without hashing (it changed last time)
    checksum: int
    # Checkpoints in a row at which it was compared with the one before and differed
    # (kept while it is written without hashing).
    streak: int = 0


@dataclass(frozen=True)
class _Baseline:
    """The last checkpoint this pipeline committed: what its pieces are and where."""

    directory: Path
    step: int
    layout_key: tuple[object, ...]
    pieces: dict[PieceKey, _Held]
    file_sizes: dict[str, int]


@dataclass(eq=False)
class Tracking:
    """The change detection of one checkpoint; its chunks are written on several threads
    at once, each into its own entries."""

    storage: CheckpointStorage
    sharing: SharedPieces  # the same backend, as one that shares files
    step: int
    layout_key: tuple[object, ...]
    baseline: _Baseline | None
    # Hash every piece, also those that changed last time (see PROBE_EVERY).
    probe: bool = True
    held: dict[PieceKey, _Held] = field(default_factory=dict)
    # Per chunk index: the files it needed, (name, nbytes), in order.
    chunk_files: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    piece_files: dict[PieceKey, str] = field(default_factory=dict)
    written_bytes: int = 0
    shared_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def write_chunk(
        self,
        temporary: Path,
        chunk_index: int,
        own_name: str,
        data: memoryview,
        ranges: Sequence[tuple[int, int]],
        keys: Sequence[PieceKey],
        room: memoryview | None,
    ) -> list[int]:
        """Write one chunk's changed pieces and share its unchanged ones (writer thread);
        the CRC-32C of every piece, in the order of ``ranges``."""
        baseline = self.baseline.pieces if self.baseline is not None else {}
        priors = [baseline.get(key) for key in keys]
        digests = [
            None
            if not self.probe and prior is not None and prior.streak >= SKIP_AFTER
            else hashlib.sha256(data[o : o + n]).digest()
            for (o, n), prior in zip(ranges, priors, strict=True)
        ]
        reused = self._share_unchanged(temporary, ranges, keys, digests)
        changed = [i for i in range(len(ranges)) if i not in reused]
        files: list[tuple[str, int]] = sorted(
            {(f, self.baseline.file_sizes[src]) for src, f, _ in reused.values()}  # type: ignore[union-attr]
        )
        sums = [0] * len(ranges)
        if changed:
            if reused:
                spans = [ranges[i] for i in changed]
                written = self.sharing.write_spans(temporary, own_name, data, spans)
                size = max(o + n for o, n in spans)
            else:
                written = self.storage.write_chunk(temporary, own_name, data, ranges, room)
                size = len(data)
            files.append((own_name, size))
            for i, crc in zip(changed, written, strict=True):
                sums[i] = crc
        with self._lock:
            for i, key in enumerate(keys):
                if i in reused:
                    _, name, held = reused[i]
                    sums[i] = held.checksum
                    self.piece_files[key] = name
                    self.shared_bytes += ranges[i][1]
                else:
                    self.written_bytes += ranges[i][1]
                self.held[key] = _Held(
                    reused[i][1] if i in reused else own_name,
                    ranges[i][1],
                    digests[i],
                    sums[i],
                    streak=_streak(priors[i], digests[i], reused=i in reused),
                )
            self.chunk_files[chunk_index] = files
        return sums

    def _share_unchanged(
        self,
        temporary: Path,
        ranges: Sequence[tuple[int, int]],
        keys: Sequence[PieceKey],
        digests: Sequence[bytes | None],
    ) -> dict[int, tuple[str, str, _Held]]:
        """Pieces equal to the baseline's, whose file could be shared: position ->
        (the baseline's file, its name here, the baseline's piece)."""
        baseline = self.baseline
        if baseline is None:
            return {}
        by_file: dict[str, list[tuple[int, _Held]]] = {}
        for i, (key, digest) in enumerate(zip(keys, digests, strict=True)):
            held = baseline.pieces.get(key)
            if (
                held is not None
                and digest is not None
                and held.length == ranges[i][1]
                and held.digest == digest
            ):
                by_file.setdefault(held.file, []).append((i, held))
        reused: dict[int, tuple[str, str, _Held]] = {}
        for source, members in by_file.items():
            name = shared_name(source, baseline.step)
            if self.sharing.share_file(baseline.directory, source, temporary, name):
                for i, held in members:
                    reused[i] = (source, name, held)
        return reused

    def digests(self) -> dict[PieceKey, str]:
        """Every piece's SHA-256, for the manifest: what a later writer (a new process, or
        a promotion into another tier) compares with, without reading the bytes again."""
        return {
            key: held.digest.hex() for key, held in self.held.items() if held.digest is not None
        }

    def shared_files(self) -> SharedFiles | None:
        """The manifest's file list and pieces' files; None when nothing is shared, so
        that the checkpoint is written as one of the format version it needs."""
        if not self.piece_files:
            return None
        # A file two chunks share (a baseline cut into other chunks) is listed once.
        files = {f[0]: f for index in sorted(self.chunk_files) for f in self.chunk_files[index]}
        return SharedFiles(tuple(files.values()), dict(self.piece_files))


class ChangeTracker:
    """Remembers the last committed checkpoint of one pipeline, for the next to compare."""

    def __init__(self, store: CheckpointStorage) -> None:
        assert isinstance(store, SharedPieces)
        self.store = store
        self.sharing: SharedPieces = store
        self._baseline: _Baseline | None = None
        self._seed: tuple[Path, Manifest] | None = None
        self._since_probe = 0

    @staticmethod
    def applies_to(store: CheckpointStorage) -> bool:
        """Can ``store`` share files between checkpoints?"""
        return isinstance(store, SharedPieces)

    def start(self, step: int, layout: Layout, names: Sequence[str]) -> Tracking:
        key = (layout.signature, tuple(names))
        if self._seed is not None:
            directory, manifest = self._seed
            self._seed = None
            self._baseline = _baseline_from_manifest(directory, manifest, layout, names, key)
        baseline = self._baseline
        if baseline is not None and baseline.layout_key != key:
            baseline = None
        self._since_probe += 1
        probe = self._since_probe >= PROBE_EVERY
        if probe:
            self._since_probe = 0
        return Tracking(self.store, self.sharing, step, key, baseline, probe=probe)

    def restored(self, checkpoint: Path, manifest: Manifest) -> None:
        """The state was just restored from committed ``checkpoint`` of this store: the next
        checkpoint compares with it, by the digests its manifest recorded (so a run that
        resumes does not write its frozen part again)."""
        self._baseline = None
        self._seed = (checkpoint, manifest)

    def committed(self, tracking: Tracking, final: Path) -> None:
        """``tracking``'s checkpoint is committed as ``final``: the next compares to it."""
        sizes = {name: size for files in tracking.chunk_files.values() for name, size in files}
        self._baseline = _Baseline(
            final, tracking.step, tracking.layout_key, dict(tracking.held), sizes
        )

    def forget(self) -> None:
        """Compare the next checkpoint to nothing (it is written whole)."""
        self._baseline = None
        self._seed = None


def _baseline_from_manifest(
    directory: Path,
    manifest: Manifest,
    layout: Layout,
    names: Sequence[str],
    key: tuple[object, ...],
) -> _Baseline | None:
    """The baseline a committed manifest gives for ``layout``, when it describes the same
    tensors at the same places, with a digest for every piece; None otherwise."""
    if len(manifest.tensors) != len(layout.tensors):
        return None
    pieces: dict[PieceKey, _Held] = {}
    for record, placement in zip(manifest.tensors, layout.tensors, strict=True):
        if (
            record.name != names[placement.index]
            or record.dtype != placement.dtype
            or record.shape != placement.shape
            or len(record.pieces) != len(placement.pieces)
        ):
            return None
        for j, (saved, planned) in enumerate(zip(record.pieces, placement.pieces, strict=True)):
            # Shared pieces keep their offsets: the same place in the same chunk.
            if saved.offset != planned.offset or saved.length != planned.length:
                return None
            digest = None if saved.digest is None else bytes.fromhex(saved.digest)
            pieces[(placement.index, j)] = _Held(saved.file, saved.length, digest, saved.checksum)
    sizes = {f.name: f.nbytes for f in manifest.files}
    return _Baseline(directory, manifest.step, key, pieces, sizes)


def files_held_by_newest(
    store: CheckpointStorage, manifest: Manifest, step: int
) -> dict[str, Location]:
    """The data files of ``manifest`` (a checkpoint being copied into ``store``, another
    tier) that the newest committed checkpoint of ``store`` below ``step`` holds with the
    very same bytes: name -> that checkpoint.

    Exact by the SHA-256 digests both manifests record: every piece ``manifest`` places in
    a file is a piece of the same offset, length and digest in the file of that name and
    size there. Nothing when ``store`` cannot share files or a manifest has no digests.
    """
    if not isinstance(store, SharedPieces):
        return {}
    earlier = [info for info in store.list_committed() if info.step < step]
    if not earlier:
        return {}
    newest = earlier[-1].path
    try:
        theirs = read_manifest(newest, store)
    except (AiockptError, OSError):  # unreadable, or deleted meanwhile: the files are copied
        return {}
    sizes = {f.name: f.nbytes for f in theirs.files}
    have = {
        (p.file, p.offset, p.length, p.digest)
        for t in theirs.tensors
        for p in t.pieces
        if p.digest is not None
    }
    wanted: dict[str, list[tuple[str, int, int, str | None]]] = {}
    for tensor in manifest.tensors:
        for piece in tensor.pieces:
            wanted.setdefault(piece.file, []).append(
                (piece.file, piece.offset, piece.length, piece.digest)
            )
    held = {}
    for record in manifest.files:
        needs = wanted.get(record.name, [])
        if (
            needs
            and sizes.get(record.name) == record.nbytes
            and all(need[3] is not None and need in have for need in needs)
        ):
            held[record.name] = newest
    return held


def share_into(
    store: CheckpointStorage, checkpoint: Location, name: str, temporary: Location
) -> bool:
    """Share file ``name`` of ``checkpoint`` into ``temporary`` under the same name (only
    a backend that shares files, which is local: its locations are paths)."""
    if not isinstance(store, SharedPieces):
        return False
    return store.share_file(Path(checkpoint), name, Path(temporary), name)
