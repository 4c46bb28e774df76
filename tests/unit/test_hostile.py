"""Hostile and corrupt checkpoints, generated from a real one.

Every case starts from a copy of a real committed checkpoint (step 2, with an intact step 1
beside it) and damages it the way a failing disk, a careless tool or an attacker would.
Each must be refused with CorruptCheckpointError naming the file and the problem, and
restore() must fall back to step 1. While aiockpt reads the damaged checkpoint, a Python
audit hook watches every file it opens and every sensitive operation: nothing outside
the checkpoint directory may be opened, nothing may be opened for writing, renamed or
removed, and nothing may be unpickled or executed (a planted pickle payload that creates
a file when unpickled must leave no file behind).

Manifest edits that test the *parser's* checks are re-sealed (manifest_crc32c recomputed,
as a hostile writer would); a few are left unsealed to show the checksum catches them
first. Bit flips at seeded random places in the manifest and the data files are tallied:
each is detected, or (data-file padding only) provably harmless.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
from conftest import assert_state_equal

import aiockpt
from aiockpt._format.manifest import MAX_MANIFEST_BYTES, MAX_NDIM, MAX_SKELETON_DEPTH

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mkfifo, /proc")

FLIPS = 48  # seeded bit flips each in the manifest and in the data files
FLIP_SEED = int(os.environ.get("HOSTILE_TEST_SEED", "11"))


# -- watching what a load touches -----------------------------------------------------------
_SENSITIVE = (
    "pickle.find_class",
    "exec",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.fork",
    "subprocess.Popen",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "os.truncate",
    "os.symlink",
    "os.link",
    "shutil.rmtree",
    "shutil.copyfile",
    "ctypes.dlopen",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Audit:
    """Records file opens and sensitive operations while ``active`` (one hook per process)."""

    def __init__(self) -> None:
        self.active = False
        self.opened: list[tuple[str, int | None, bool]] = []  # (path, flags, for writing)
        self.sensitive: list[tuple[str, tuple[Any, ...]]] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event == "open":
            path, mode, flags = args
            if mode is None:
                writing = bool(flags & _WRITE_FLAGS)
            else:
                writing = any(c in str(mode) for c in "wax+")
            path = os.fsdecode(path) if path is not None else ""
            self.opened.append((path, flags if mode is None else None, writing))
        elif event.startswith(_SENSITIVE):
            self.sensitive.append((event, args))

    @contextlib.contextmanager
    def watch(self) -> Iterator[Audit]:
        self.opened.clear()
        self.sensitive.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def check(self, inside: Path) -> None:
        """Every open named a path inside ``inside`` and could not follow a link out."""
        root = os.path.normpath(inside) + os.sep
        outside = [p for p, _, _ in self.opened if not os.path.normpath(p).startswith(root)]
        assert not outside, f"opened outside {inside}: {outside}"
        followed = [
            p
            for p, flags, _ in self.opened
            if os.path.islink(p) and (flags is None or not flags & os.O_NOFOLLOW)
        ]
        assert not followed, f"opened through a symbolic link: {followed}"
        writes = [p for p, _, writing in self.opened if writing]
        assert not writes, f"opened for writing: {writes}"
        assert not self.sensitive, f"sensitive operations: {self.sensitive}"


AUDIT = Audit()


# -- the real checkpoint everything is made from --------------------------------------------
def state_of(step: int) -> dict[str, Any]:
    return {
        "w": torch.arange(20_000, dtype=torch.float32) * step,
        "ids": torch.arange(5_001, dtype=torch.int64) + step,
        "half": torch.full((33, 17), float(step), dtype=torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "lr": 0.5 * step,
        "betas": (0.9, 0.999),
        "name": f"run-{step}",
        "blob": b"\x00\x01\x02",
        "dtype": torch.float32,
        "nested": {"a": [1, 2, {"b": None}], "step": step},
    }


class Holder:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def config(directory: Path) -> aiockpt.Config:
    return aiockpt.Config(directory=directory, chunk_size_mb=0.04, keep_last=None, num_threads=2)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "ckpt"
    holder = Holder(state_of(1))
    with aiockpt.SyncCheckpointer(config(root), holder=holder) as ckpt:
        ckpt.checkpoint(1).wait()
        holder.state = state_of(2)
        ckpt.checkpoint(2).wait()
    assert len(list((root / "step-2").glob("data-*.bin"))) >= 3
    aiockpt.load(root / "step-2")  # a clean load first: lazy imports happen outside the audit
    return root


@dataclass
class Case:
    """A copy of the pristine checkpoints, whose step 2 a case damages."""

    root: Path
    step: Path
    outside: Path  # a directory beside the checkpoints, where nothing may be read

    @property
    def manifest_path(self) -> Path:
        return self.step / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_bytes())  # type: ignore[no-any-return]

    def data_files(self) -> list[str]:
        return [f["name"] for f in self.manifest()["files"]]

    def tensor(self, name: str) -> dict[str, Any]:
        for entry in self.manifest()["tensors"]:
            if entry["name"] == name:
                return entry  # type: ignore[no-any-return]
        raise KeyError(name)

    def edit(self, change: Callable[[dict[str, Any]], Any], *, reseal: bool = True) -> None:
        """Change the manifest; ``reseal`` recomputes manifest_crc32c as a forger would."""
        document = self.manifest()
        document.pop("manifest_crc32c")
        change(document)
        if reseal:
            canonical = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
            document["manifest_crc32c"] = crc32c.crc32c(canonical)
        else:
            document["manifest_crc32c"] = self.manifest()["manifest_crc32c"]
        self.manifest_path.write_text(json.dumps(document, separators=(",", ":")))


def make_case(pristine: Path, where: Path) -> Case:
    root = where / "ckpt"
    shutil.copytree(pristine, root, ignore=shutil.ignore_patterns(".aiockpt.lock"))
    outside = where / "outside"
    outside.mkdir()
    return Case(root, root / "step-2", outside)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


class CreatesFile:
    """Unpickling this calls open(path, "w"): it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def live_pickle(marker: Path) -> bytes:
    """A pickle payload that creates ``marker`` when loaded, proven live here."""
    payload = pickle.dumps(CreatesFile(marker))
    pickle.loads(payload).close()
    assert marker.exists()
    marker.unlink()
    return payload


# -- the corpus ---------------------------------------------------------------------------------
# Each mutation damages case.step and returns (the file the error must name, a regex for
# the problem). Names refer to data files by index: the case resolves them.
Mutation = Callable[[Case], tuple[str, str]]
SIZE_MISMATCH = r"file holds \d+ bytes, the manifest says \d+"
CHECKSUM = r"fail their crc32c checksum"
BAD_JSON = r"not valid JSON"
MANIFEST = "manifest.json"


def _first_data(case: Case) -> str:
    return case.data_files()[0]


def _truncate(fraction: float) -> Mutation:
    def mutate(case: Case) -> tuple[str, str]:
        path = case.step / _first_data(case)
        os.truncate(path, int(path.stat().st_size * fraction))
        return path.name, SIZE_MISMATCH

    return mutate


def _truncate_by_one(case: Case) -> tuple[str, str]:
    path = case.step / _first_data(case)
    os.truncate(path, path.stat().st_size - 1)
    return path.name, SIZE_MISMATCH


def _extend(case: Case) -> tuple[str, str]:
    path = case.step / case.data_files()[-1]
    with path.open("ab") as fh:
        fh.write(b"\0")
    return path.name, SIZE_MISMATCH


def _flip_in_tensor(where: str) -> Mutation:
    def mutate(case: Case) -> tuple[str, str]:
        piece = case.tensor("holder/w")["pieces"][0]
        offset = {
            "first": piece["offset"],
            "middle": piece["offset"] + piece["length"] // 2,
            "last": piece["offset"] + piece["length"] - 1,
        }[where]
        flip_bit(case.step / piece["file"], offset, bit=7)
        return piece["file"], CHECKSUM

    return mutate


def _missing_data(case: Case) -> tuple[str, str]:
    name = case.data_files()[1]
    (case.step / name).unlink()
    return name, "file is missing"


def _symlink_data_outside(case: Case) -> tuple[str, str]:
    """The data file becomes a link to an exact copy outside: only O_NOFOLLOW stops it."""
    name = _first_data(case)
    copy = case.outside / name
    shutil.move(case.step / name, copy)
    (case.step / name).symlink_to(copy)
    return name, r"cannot be opened safely"


def _symlink_manifest_outside(case: Case) -> tuple[str, str]:
    copy = case.outside / MANIFEST
    shutil.move(case.manifest_path, copy)
    case.manifest_path.symlink_to(copy)
    return MANIFEST, r"cannot be opened safely"


def _fifo(which: str) -> Mutation:
    def mutate(case: Case) -> tuple[str, str]:
        name = MANIFEST if which == "manifest" else _first_data(case)
        (case.step / name).unlink()
        os.mkfifo(case.step / name)
        return name, r"is not a regular file"

    return mutate


def _directory(which: str) -> Mutation:
    def mutate(case: Case) -> tuple[str, str]:
        name = MANIFEST if which == "manifest" else _first_data(case)
        (case.step / name).unlink()
        (case.step / name).mkdir()
        return name, r"is not a regular file"

    return mutate


def _pickle_as_data(case: Case) -> tuple[str, str]:
    """A live pickle payload padded to the data file's exact size: only the crc catches it."""
    name = _first_data(case)
    path = case.step / name
    payload = live_pickle(case.outside / "pwned-by-data")
    size = path.stat().st_size
    assert len(payload) <= size
    path.write_bytes(payload + b"." * (size - len(payload)))
    return name, CHECKSUM


def _pickle_as_manifest(case: Case) -> tuple[str, str]:
    case.manifest_path.write_bytes(live_pickle(case.outside / "pwned-by-manifest"))
    return MANIFEST, BAD_JSON


def _torch_save_as_manifest(case: Case) -> tuple[str, str]:
    marker = case.outside / "pwned-by-torch-save"
    torch.save({"payload": CreatesFile(marker)}, case.manifest_path)
    return MANIFEST, BAD_JSON


def _manifest_truncated(case: Case) -> tuple[str, str]:
    os.truncate(case.manifest_path, case.manifest_path.stat().st_size // 2)
    return MANIFEST, BAD_JSON


def _manifest_empty(case: Case) -> tuple[str, str]:
    case.manifest_path.write_bytes(b"")
    return MANIFEST, BAD_JSON


def _manifest_missing(case: Case) -> tuple[str, str]:
    case.manifest_path.unlink()
    return MANIFEST, "file is missing"


def _manifest_huge(case: Case) -> tuple[str, str]:
    """Beyond the 256 MiB limit (a sparse file: created at once, no disk used)."""
    with case.manifest_path.open("r+b") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)
    return MANIFEST, rf"manifest is {MAX_MANIFEST_BYTES + 1} bytes, over the .* limit"


def _manifest_deep_json(case: Case) -> tuple[str, str]:
    depth = 200_000
    case.manifest_path.write_bytes(b"[" * depth + b"]" * depth)
    return MANIFEST, BAD_JSON


def _manifest_deep_state(case: Case) -> tuple[str, str]:
    """Nesting JSON can parse, past the skeleton's limit; re-sealed."""

    def deepen(document: dict[str, Any]) -> None:
        node: Any = "bottom"
        for _ in range(MAX_SKELETON_DEPTH + 10):
            node = [node]
        document["state"]["holder"]["nested"] = node

    case.edit(deepen)
    return MANIFEST, rf"nests deeper than {MAX_SKELETON_DEPTH}"


def _manifest_nan(case: Case) -> tuple[str, str]:
    text = case.manifest_path.read_text()
    case.manifest_path.write_text(text.replace('"lr":1.0', '"lr":NaN', 1))
    assert "NaN" in case.manifest_path.read_text()
    return MANIFEST, r"non-standard JSON constant NaN"


def _edit(change: Callable[..., Any], problem: str | None, reseal: bool = True) -> Mutation:
    """A manifest edit; ``change(document)`` or ``change(document, case)``.

    ``problem=None`` means the parser lets it through and the reader must stop at the
    first data file, whose real size disagrees.
    """
    wants_case = len(inspect.signature(change).parameters) == 2

    def mutate(case: Case) -> tuple[str, str]:
        case.edit(lambda d: change(d, case) if wants_case else change(d), reseal=reseal)
        if not reseal:
            return MANIFEST, r"manifest fails its crc32c checksum"
        if problem is None:
            return case.data_files()[0], SIZE_MISMATCH
        return MANIFEST, problem

    return mutate


def _tensor(document: dict[str, Any], name: str = "holder/w") -> dict[str, Any]:
    return next(t for t in document["tensors"] if t["name"] == name)


def _rename_file(new: str) -> Callable[[dict[str, Any], Case], None]:
    """Point files[0] and every piece in it at ``new``, and plant a copy of its exact
    bytes there, so that a reader following the name would find a valid file."""

    def change(document: dict[str, Any], case: Case) -> None:
        old = document["files"][0]["name"]
        if new.startswith("/"):
            target = case.outside / Path(new).name
            new_name = str(target)
        else:
            target = Path(os.path.normpath(case.step / new))
            new_name = new
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(case.step / old, target)
        document["files"][0]["name"] = new_name
        for tensor in document["tensors"]:
            for piece in tensor["pieces"]:
                if piece["file"] == old:
                    piece["file"] = new_name

    return change


def _unlisted_piece_file(document: dict[str, Any], case: Case) -> None:
    shutil.copyfile(case.step / document["files"][0]["name"], case.outside / "x.bin")
    _tensor(document)["pieces"][0]["file"] = "../../outside/x.bin"


def _claims_more_than_its_file(document: dict[str, Any]) -> None:
    document["files"][0]["nbytes"] += 1


def _consistent_but_enormous(document: dict[str, Any]) -> None:
    """Every claim agrees with every other (16 TiB in one tensor), within every limit:
    only the real size of the file stops the reader before it allocates."""
    size = 2**44
    entry = _tensor(document)
    document["files"][0]["nbytes"] = size
    entry.update(dtype="uint8", shape=[2**22, 2**22], nbytes=size)
    entry["pieces"] = [
        {"file": document["files"][0]["name"], "offset": 0, "length": size, "crc32c": 0}
    ]
    document["tensors"] = [entry]
    document["state"] = {"holder": {"w": {"$tensor": 0}}}


def _set_tensor(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: _tensor(d).update(fields)


def _set_piece(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: _tensor(d)["pieces"][0].update(fields)


def _set_state(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["state"]["holder"].update({key: value})


CORPUS: dict[str, Mutation] = {
    # data files: torn, grown, flipped, missing, swapped for something else
    "data-truncated-by-one-byte": _truncate_by_one,
    "data-truncated-to-half": _truncate(0.5),
    "data-truncated-to-zero": _truncate(0.0),
    "data-grown-by-one-byte": _extend,
    "data-flipped-first-byte": _flip_in_tensor("first"),
    "data-flipped-middle-byte": _flip_in_tensor("middle"),
    "data-flipped-last-byte": _flip_in_tensor("last"),
    "data-missing": _missing_data,
    "data-symlink-to-outside-copy": _symlink_data_outside,
    "data-is-a-fifo": _fifo("data"),
    "data-is-a-directory": _directory("data"),
    "data-is-a-live-pickle-of-the-same-size": _pickle_as_data,
    # the manifest file itself
    "manifest-missing": _manifest_missing,
    "manifest-empty": _manifest_empty,
    "manifest-truncated": _manifest_truncated,
    "manifest-symlink-to-outside-copy": _symlink_manifest_outside,
    "manifest-is-a-fifo": _fifo("manifest"),
    "manifest-is-a-directory": _directory("manifest"),
    "manifest-is-a-live-pickle": _pickle_as_manifest,
    "manifest-is-a-torch-save-file": _torch_save_as_manifest,
    "manifest-over-the-size-limit": _manifest_huge,
    "manifest-json-nested-200000-deep": _manifest_deep_json,
    "manifest-state-nested-past-the-limit": _manifest_deep_state,
    "manifest-nan-literal": _manifest_nan,
    # re-sealed forgeries: names that would escape the directory
    "name-dot-dot": _edit(_rename_file("../../x.bin"), r"not a unique data file name"),
    "name-absolute-path": _edit(_rename_file("/abs/path.bin"), r"not a unique data file name"),
    "name-through-a-file": _edit(
        _rename_file("data-r00000-c00000.bin/../../../x.bin"), r"not a unique data file name"
    ),
    "name-in-a-subdirectory": _edit(
        _rename_file("sub/data-r00000-c00000.bin"), r"not a unique data file name"
    ),
    "name-duplicated": _edit(
        lambda d: d["files"].append(dict(d["files"][0])), r"not a unique data file name"
    ),
    "piece-names-an-unlisted-file": _edit(_unlisted_piece_file, r"does not list"),
    # absurd shapes, sizes and offsets
    "shape-2**60": _edit(_set_tensor(shape=[2**60]), r"shape \[\d+\] of float32 is \d+ bytes"),
    "shape-2**63": _edit(_set_tensor(shape=[2**63]), r"shape = \d+ is not an integer from 0"),
    "shape-negative": _edit(_set_tensor(shape=[-1]), r"shape = -1 is not an integer"),
    "shape-boolean": _edit(_set_tensor(shape=[True]), r"shape = True is not an integer"),
    "shape-too-many-dims": _edit(
        _set_tensor(shape=[1] * (MAX_NDIM + 1)), rf"over the limit of {MAX_NDIM}"
    ),
    "shape-disagrees-with-nbytes": _edit(_set_tensor(shape=[7]), r"is 28 bytes, not 80000"),
    "nbytes-2**60": _edit(_set_tensor(nbytes=2**60), r"nbytes = \d+ is not an integer from 0"),
    "nbytes-negative": _edit(_set_tensor(nbytes=-1), r"nbytes = -1 is not an integer"),
    "file-nbytes-2**60": _edit(
        lambda d: d["files"][0].update(nbytes=2**60), r"nbytes = \d+ is not an integer"
    ),
    "offset-2**60": _edit(_set_piece(offset=2**60), r"offset = \d+ is not an integer from 0"),
    "offset-negative": _edit(_set_piece(offset=-1), r"offset = -1 is not an integer"),
    "length-2**60": _edit(_set_piece(length=2**60), r"length = \d+ is not an integer from 0"),
    "piece-past-the-end-of-its-file": _edit(
        _set_piece(offset=2**40), r"claims bytes \d+\.\.\d+ of data-.*, which holds"
    ),
    "crc-out-of-range": _edit(_set_piece(crc32c=2**33), r"crc32c = \d+ is not an integer"),
    "consistent-but-16-TiB": _edit(_consistent_but_enormous, None),
    "manifest-claims-more-bytes-than-its-file": _edit(_claims_more_than_its_file, None),
    # types, tags and versions
    "dtype-unknown": _edit(_set_tensor(dtype="float128"), r"dtype 'float128', unknown"),
    "dtype-with-torch-prefix": _edit(_set_tensor(dtype="torch.float32"), r"unknown to torch"),
    "state-dtype-unknown": _edit(
        _set_state("dtype", {"$dtype": "float1024"}), r"unknown dtype 'float1024'"
    ),
    "state-unknown-tag": _edit(
        _set_state("lr", {"$pickle": "gASVIAAAAAAAAACMCGJ1aWx0aW5zlIwEb3BlbpSTlC4="}),
        r"unknown tag '\$pickle'",
    ),
    "state-tensor-index-out-of-range": _edit(
        _set_state("w", {"$tensor": 999}), r"tensor reference = 999 is not an integer"
    ),
    "state-tensor-index-negative": _edit(
        _set_state("w", {"$tensor": -1}), r"tensor reference = -1 is not an integer"
    ),
    "dtensor-shard-outside-its-tensor": _edit(
        _set_state(
            "w",
            {"$dtensor": {"shape": [10], "shards": [{"offset": [5], "data": {"$tensor": 0}}]}},
        ),
        r"lies outside its tensor",
    ),
    "dtensor-shard-bad-reference": _edit(
        _set_state(
            "w",
            {"$dtensor": {"shape": [10], "shards": [{"offset": [0], "data": {"$tensor": 7}}]}},
        ),
        r"tensor reference = 7 is not an integer",
    ),
    "dtensor-without-shards": _edit(
        _set_state("w", {"$dtensor": {"shape": [3]}}), r"must hold shape and shards"
    ),
    "ranks-not-a-list": _edit(_set_state("w", {"$ranks": {"0": 1}}), r"must be a JSON array"),
    "format-version-from-the-future": _edit(
        lambda d: d.update(format_version=5), r"format_version 5 is newer.*upgrade"
    ),
    "format-not-aiockpt": _edit(lambda d: d.update(format="pickle"), r"not an aiockpt manifest"),
    "checksum-algorithm-unknown": _edit(
        lambda d: d.update(checksum="md5"), r"unknown checksum algorithm 'md5'"
    ),
    "step-negative": _edit(lambda d: d.update(step=-1), r"step = -1 is not an integer"),
    "name-not-a-string": _edit(_set_tensor(name=["x"]), r"name must be a string"),
    # unsealed edits: the manifest's own checksum catches them first
    "unsealed-dot-dot-name": _edit(_rename_file("../../x.bin"), None, reseal=False),
    "unsealed-learning-rate": _edit(_set_state("lr", 0.25), None, reseal=False),
    "unsealed-shape-2**60": _edit(_set_tensor(shape=[2**60]), None, reseal=False),
    "unsealed-crc-of-a-piece": _edit(_set_piece(crc32c=12345), None, reseal=False),
}


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""

    def expired(*_: Any) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def load_hostile(case: Case) -> aiockpt.CorruptCheckpointError | None:
    """Load case.step under the audit; the CorruptCheckpointError (None if it loaded)."""
    with deadline(20), AUDIT.watch():
        try:
            aiockpt.load(case.step)
        except aiockpt.CorruptCheckpointError as error:
            caught: aiockpt.CorruptCheckpointError | None = error
        else:
            caught = None
    AUDIT.check(case.step)
    return caught


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_checkpoint_is_refused(pristine: Path, tmp_path: Path, name: str) -> None:
    case = make_case(pristine, tmp_path)
    file, problem = CORPUS[name](case)
    error = load_hostile(case)
    assert error is not None, f"{name}: loaded without complaint"
    message = str(error)
    assert str(case.step / file) in message, f"{name}: {message!r} does not name {file}"
    assert re.search(problem, message), f"{name}: {message!r} does not say {problem!r}"
    # Nothing ran: no marker of a pickle payload exists anywhere we planted one.
    assert sorted(p.name for p in case.outside.iterdir() if p.name.startswith("pwned")) == []

    # A restarted job skips it, says why, and resumes from step 1 exactly.
    holder = Holder({})
    with deadline(20), aiockpt.SyncCheckpointer(config(case.root), holder=holder) as ckpt:
        assert ckpt.restore() == 1, name
    assert_state_equal(holder.state, state_of(1))
    # Nothing outside the checkpoint directory changed.
    assert not [p for p in case.outside.iterdir() if p.name.startswith("pwned")]


def test_bit_flips_in_the_manifest_are_all_detected(pristine: Path, tmp_path: Path) -> None:
    rng = random.Random(FLIP_SEED)
    size = (pristine / "step-2" / MANIFEST).stat().st_size
    spots = [(rng.randrange(size), rng.randrange(8)) for _ in range(FLIPS)]
    detected, same = 0, 0
    for i, (offset, bit) in enumerate(spots):
        case = make_case(pristine, tmp_path / str(i))
        flip_bit(case.manifest_path, offset, bit)
        error = load_hostile(case)
        if error is None:
            # Only a flip that changes no value may pass (e.g. 'e' -> 'E' in 1e-05).
            assert_state_equal(aiockpt.load(case.step), aiockpt.load(pristine / "step-2"))
            same += 1
            continue
        assert str(case.manifest_path) in str(error), str(error)
        detected += 1
    print(f"\nmanifest bit flips: {detected} detected, {same} changed nothing, of {FLIPS}")
    assert detected + same == FLIPS and detected >= FLIPS - 2


def test_bit_flips_in_data_files_are_detected_or_in_padding(pristine: Path, tmp_path: Path) -> None:
    """A flip in a tensor's bytes is always caught; a flip in the padding between tensors
    (unspecified bytes, FORMAT.md section 2) changes nothing that loads."""
    rng = random.Random(FLIP_SEED + 1)
    step = pristine / "step-2"
    manifest = json.loads((step / MANIFEST).read_bytes())
    files = [(f["name"], f["nbytes"]) for f in manifest["files"]]
    used = {
        (p["file"], b)
        for t in manifest["tensors"]
        for p in t["pieces"]
        for b in range(p["offset"], p["offset"] + p["length"])
    }
    detected, padding = 0, 0
    for i in range(FLIPS):
        name, nbytes = rng.choice(files)
        offset, bit = rng.randrange(nbytes), rng.randrange(8)
        case = make_case(pristine, tmp_path / str(i))
        flip_bit(case.step / name, offset, bit)
        error = load_hostile(case)
        if (name, offset) in used:
            assert error is not None, f"flip at {name}:{offset} bit {bit} was not detected"
            assert str(case.step / name) in str(error) and re.search(CHECKSUM, str(error))
            detected += 1
        else:
            assert error is None
            assert_state_equal(aiockpt.load(case.step), aiockpt.load(step))
            padding += 1
    print(f"\ndata bit flips: {detected} in tensor bytes, all detected; {padding} in padding")
    assert detected > FLIPS // 2


def test_symlinked_checkpoint_directory_is_not_a_checkpoint(pristine: Path, tmp_path: Path) -> None:
    """step-3 -> a valid checkpoint elsewhere: restore() must not follow it out."""
    case = make_case(pristine, tmp_path)
    elsewhere = case.outside / "step-3"
    shutil.copytree(case.step, elsewhere)
    (case.root / "step-3").symlink_to(elsewhere, target_is_directory=True)
    assert [i.step for i in aiockpt.list_checkpoints(case.root)] == [1, 2]
    holder = Holder({})
    with AUDIT.watch(), aiockpt.SyncCheckpointer(config(case.root), holder=holder) as ckpt:
        assert ckpt.restore() == 2
    opened = [p for p, _, _ in AUDIT.opened if str(case.outside) in os.path.realpath(p)]
    assert opened == []
    assert_state_equal(holder.state, state_of(2))
