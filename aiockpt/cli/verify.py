"""``aiockpt verify``: re-read every byte of a checkpoint and check every checksum.

Restore already verifies what it loads; this is for checking checkpoints at rest (after a
copy, on suspect storage, before deleting older ones). Each data file is streamed once, in
large blocks, on a pool of threads; every piece's CRC-32C is accumulated across block
boundaries, so the cost is one sequential read per file however many tensors it holds.
Problems are collected, not raised: the report names every bad file, byte range and
tensor, not just the first.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c

from .._engine.reader import check_data_size, check_step, open_checkpoint_file, read_manifest
from .._format.manifest import MANIFEST_NAME, FileRecord
from .._util.location import Location, storage_location
from ..errors import AiockptError
from ..storage.base import DataFile
from ..storage.sharing import sharing_checkpoints

__all__ = ["CheckpointVerdict", "Problem", "verify_checkpoints"]

# Large enough that syscalls and Python overhead vanish next to the read and the CRC
# (both release the GIL), small enough that `threads` buffers stay modest.
_BLOCK = 8 * 2**20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint; ``file``/``start``/``end``/``tensor`` when known."""

    message: str
    file: str | None = None
    start: int | None = None
    end: int | None = None
    tensor: str | None = None
    # The other checkpoints that hold this very file (incremental checkpoints share the
    # bytes of unchanged tensors): a damaged shared file damages every one of them.
    shared_with: tuple[str, ...] = ()

    def describe(self) -> str:
        where = self.file or "checkpoint"
        if self.start is not None and self.end is not None:
            where += f" bytes {self.start}..{self.end}"
        if self.tensor is not None:
            where += f" (tensor {self.tensor!r})"
        shared = ""
        if self.shared_with:
            shared = f" (shared file: the same bytes are in {', '.join(self.shared_with)})"
        return f"{where}: {self.message}{shared}"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "start": self.start,
            "end": self.end,
            "tensor": self.tensor,
            "message": self.message,
            "shared_with": list(self.shared_with),
        }


@dataclass
class CheckpointVerdict:
    path: Location
    step: int | None = None
    files: int = 0
    pieces: int = 0
    nbytes: int = 0  # bytes the manifest lists
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    # Removed (by a live writer's retention) while we read it: not corrupt, just gone.
    vanished: bool = False

    @property
    def valid(self) -> bool:
        return not self.problems and not self.vanished

    @property
    def status(self) -> str:
        if self.vanished:
            return "removed"
        return "valid" if self.valid else "corrupt"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "step": self.step,
            "status": self.status,
            "valid": self.valid,
            "files": self.files,
            "pieces": self.pieces,
            "nbytes": self.nbytes,
            "bytes_read": self.bytes_read,
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass(frozen=True)
class _Piece:
    offset: int
    length: int
    checksum: int
    tensor: str


@dataclass(frozen=True)
class _FileJob:
    verdict: CheckpointVerdict
    path: Location
    record: FileRecord
    pieces: tuple[_Piece, ...]


def verify_checkpoints(
    paths: Sequence[Location],
    *,
    threads: int = 8,
    on_bytes: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> list[CheckpointVerdict]:
    """Verify each checkpoint directory in ``paths``; one verdict each, in order.

    ``on_total`` hears the number of bytes to read once the manifests are parsed, and
    ``on_bytes`` each block as it is read (from worker threads), for a progress bar.
    """
    verdicts: list[CheckpointVerdict] = []
    jobs: list[_FileJob] = []
    for path in paths:
        verdict = CheckpointVerdict(path)
        verdicts.append(verdict)
        jobs.extend(_plan(verdict))
    if on_total is not None:
        on_total(sum(job.record.nbytes for job in jobs))
    count = on_bytes or (lambda n: None)
    if jobs:
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="aiockpt-verify") as pool:
            results = list(pool.map(lambda job: _check_file(job, count), jobs))
        for job, (problems, nread) in zip(jobs, results, strict=True):
            job.verdict.problems.extend(problems)
            job.verdict.bytes_read += nread
    for verdict in verdicts:
        verdict.problems.sort(key=lambda p: (p.file or "", p.start or 0))
        if verdict.problems and not _still_there(verdict.path):
            # A live writer's retention renamed it away mid-read: that is not corruption.
            verdict.vanished = True
            verdict.problems.clear()
    return verdicts


def _plan(verdict: CheckpointVerdict) -> list[_FileJob]:
    path = verdict.path
    try:
        manifest = read_manifest(path)
    except AiockptError as exc:
        if not _still_there(path):
            verdict.vanished = True
        else:
            verdict.problems.append(Problem(str(exc), file=MANIFEST_NAME))
        return []
    verdict.step = manifest.step
    try:
        check_step(path, manifest)
    except AiockptError as exc:
        verdict.problems.append(Problem(str(exc), file=MANIFEST_NAME))
    by_file: dict[str, list[_Piece]] = defaultdict(list)
    for tensor in manifest.tensors:
        for piece in tensor.pieces:
            by_file[piece.file].append(
                _Piece(piece.offset, piece.length, piece.checksum, tensor.name)
            )
            verdict.pieces += 1
    verdict.files = len(manifest.files)
    verdict.nbytes = manifest.nbytes
    return [
        _FileJob(verdict, path, record, tuple(sorted(by_file[record.name], key=_offset)))
        for record in manifest.files
    ]


def _offset(piece: _Piece) -> int:
    return piece.offset


def _check_file(job: _FileJob, count: Callable[[int], None]) -> tuple[list[Problem], int]:
    """Stream one data file; the problems found and the bytes read."""
    name = job.record.name
    try:
        # The checks every reader makes: a regular file (opened without following a link
        # or blocking on a FIFO) of exactly the listed size.
        file = open_checkpoint_file(job.path, name)
    except AiockptError as exc:
        return [Problem(_without_path(exc, job.path / name), file=name)], 0
    try:
        problems: list[Problem] = []
        try:
            check_data_size(job.path, job.record, file.size)
        except AiockptError as exc:
            problems.append(Problem(_without_path(exc, job.path / name), file=name))
        # Never read beyond what the manifest lists (a sparse 20 GiB file in place of
        # 16 KiB costs nothing); a short file is still read to name the pieces it lost.
        size = min(file.size, job.record.nbytes)
        sums, nread, error = _stream(file, size, job.pieces, count)
        if error is not None:
            problems.append(Problem(f"read failed at byte {nread}: {error}", file=name))
        for piece, crc in zip(job.pieces, sums, strict=True):
            end = piece.offset + piece.length
            if end > nread:
                if error is None:
                    problems.append(
                        Problem(
                            "bytes are missing (file too short)",
                            name,
                            piece.offset,
                            end,
                            piece.tensor,
                        )
                    )
            elif crc != piece.checksum:
                problems.append(
                    Problem(
                        f"crc32c {crc:#010x} does not match {piece.checksum:#010x} in the manifest",
                        name,
                        piece.offset,
                        end,
                        piece.tensor,
                    )
                )
        if problems:
            shared = sharing_checkpoints(job.path, name) if isinstance(job.path, Path) else []
            holders = tuple(sorted(shared, key=_step_order))
            problems = [dataclasses.replace(p, shared_with=holders) for p in problems]
        return problems, nread
    finally:
        file.close()


def _step_order(name: str) -> tuple[int, str]:
    step = name.removeprefix("step-")
    return (int(step), name) if step.isdigit() else (-1, name)


def _without_path(error: Exception, path: Location) -> str:
    return str(error).removeprefix(f"{path}: ")


def _stream(
    file: DataFile, size: int, pieces: Sequence[_Piece], count: Callable[[int], None]
) -> tuple[list[int], int, str | None]:
    """Read the whole file once; the running CRC of each piece, bytes read, any I/O error."""
    sums = [0] * len(pieces)
    buffer = memoryview(bytearray(min(_BLOCK, max(size, 1))))
    first = 0  # pieces before this index are complete (pieces are sorted, disjoint)
    position = 0
    while position < size:
        got = min(len(buffer), size - position)
        try:
            file.read_into([buffer[:got]], position)
        except EOFError:
            break  # the file shrank while we read it: what is left counts as missing
        except OSError as exc:
            return sums, position, exc.strerror or str(exc)
        block_end = position + got
        i = first
        while i < len(pieces) and pieces[i].offset < block_end:
            piece = pieces[i]
            start, end = max(piece.offset, position), min(piece.offset + piece.length, block_end)
            if end > start:
                sums[i] = crc32c.crc32c(buffer[start - position : end - position], sums[i])
            i += 1
        while first < len(pieces) and pieces[first].offset + pieces[first].length <= block_end:
            first += 1
        count(got)
        position = block_end
    return sums, position, None


# -- the command ------------------------------------------------------------------------------


def _still_there(path: Location) -> bool:
    from .scan import checkpoint_exists

    return checkpoint_exists(path)


def _targets(path: Location) -> list[Location]:
    from ..errors import NoCheckpointError, UsageError
    from .scan import committed_checkpoints, is_checkpoint, not_a_directory

    if is_checkpoint(path):
        return [path]
    if isinstance(path, Path) and path.is_file():
        raise not_a_directory(path)
    if isinstance(path, Path) and not path.exists():
        raise UsageError(f"{path}: no such file or directory", hint="check the path")
    committed = committed_checkpoints(path)
    if not committed:
        raise NoCheckpointError(
            f"{path}: not a checkpoint (no {MANIFEST_NAME}) and holds no committed checkpoints",
            hint="pass a checkpoint such as checkpoints/step-100, or the directory holding them",
        )
    return [info.path for info in committed]


def render(verdicts: Sequence[CheckpointVerdict], seconds: float) -> None:
    from rich.markup import escape

    from .._util.console import human_bytes, stdout_console

    console = stdout_console()
    colour = {"valid": "green", "corrupt": "red", "removed": "yellow"}
    for verdict in verdicts:
        status = verdict.status
        detail = (
            f"{human_bytes(verdict.bytes_read)} in {verdict.files} files, {verdict.pieces} pieces"
            if status != "removed"
            else "deleted by the live writer's retention while being verified"
        )
        console.print(
            f"[{colour[status]}]{status.upper():8}[/{colour[status]}] "
            f"{escape(str(verdict.path))}  ({detail})"
        )
        for problem in verdict.problems:
            console.print(f"    {escape(problem.describe())}")
    total = sum(v.bytes_read for v in verdicts)
    corrupt = sum(1 for v in verdicts if v.status == "corrupt")
    rate = f", {human_bytes(total / seconds)}/s" if seconds > 0 else ""
    console.print(
        f"{len(verdicts)} checkpoint{'s' * (len(verdicts) != 1)}: "
        f"{sum(1 for v in verdicts if v.valid)} valid, {corrupt} corrupt "
        f"({human_bytes(total)} in {seconds:.2f} s{rate})"
    )
    if corrupt:
        console.print(
            "a restore skips corrupt checkpoints and falls back to the newest valid one; "
            "copy back the named files from a replica if you have one"
        )


def run(args: Any) -> int:
    import time

    from .._util.console import byte_progress, print_json

    targets: list[Location] = []
    for given in args.paths:
        targets.extend(_targets(storage_location(given)))
    started = time.perf_counter()
    with byte_progress(0, "verifying", enabled=not args.json) as count:
        verdicts = verify_checkpoints(
            targets, threads=args.threads, on_bytes=count, on_total=count.set_total
        )
    seconds = time.perf_counter() - started
    if args.json:
        print_json(
            {
                "valid": all(v.status != "corrupt" for v in verdicts),
                "seconds": seconds,
                "checkpoints": [v.to_json() for v in verdicts],
            }
        )
    else:
        render(verdicts, seconds)
    return 1 if any(v.status == "corrupt" for v in verdicts) else 0
