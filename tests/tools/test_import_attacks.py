"""`aiockpt import` and `export` against hostile sources: nothing runs, nothing outside the
source is opened, nothing blocks, nothing is allocated beyond what the files hold, and
nothing is written that cannot be loaded back."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MixedModel, assert_state_equal, make_config

import aiockpt
from aiockpt.cli.main import main

REPO = Path(__file__).resolve().parents[2]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# -- proving that nothing ran ---------------------------------------------------------------------

# Events a hostile file would cause if anything in it ran: starting programs, running code,
# importing modules. Audit hooks cannot be removed, so one hook records while `watching`.
_FORBIDDEN_EVENTS = frozenset(
    {
        "os.system",
        "subprocess.Popen",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "exec",
        "compile",
        "import",
        "ctypes.dlopen",
        "socket.connect",
    }
)


class _Audit:
    def __init__(self) -> None:
        self.watching = False
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if self.watching and (event in _FORBIDDEN_EVENTS or event == "open"):
            self.events.append((event, args))

    @contextmanager
    def watch(self) -> Iterator[None]:
        self.events.clear()
        self.watching = True
        try:
            yield
        finally:
            self.watching = False

    @staticmethod
    def _inside(path: Any, root: Path) -> bool:
        if isinstance(path, int):
            return True  # an fd already open
        resolved = Path(os.path.realpath(os.fsdecode(path)))
        return resolved.is_relative_to(os.path.realpath(root))

    def assert_clean(self, root: Path) -> None:
        ran = [(e, str(a)[:200]) for e, a in self.events if e != "open"]
        assert not ran, f"code ran while importing: {ran}"
        outside = [a[0] for e, a in self.events if e == "open" and not self._inside(a[0], root)]
        assert not outside, f"opened outside {root}: {outside}"


_AUDIT = _Audit()
sys.addaudithook(_AUDIT)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def warmed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One legitimate import of each format first, so that the modules they use are loaded
    before the audit watches (a lazy import would look like code from the file)."""
    root = tmp_path_factory.mktemp("warm")
    torch.save({"model": {"w": torch.ones(2)}}, root / "a.pt")
    assert main(["import", str(root / "a.pt"), "--from", "torch", "--step", "1", str(root)]) == 0
    dcp.save(_plain_state(), storage_writer=dcp.FileSystemWriter(root / "d"), no_dist=True)
    assert main(["import", str(root / "d"), "--from", "dcp", "--step", "2", str(root)]) == 0
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.ones(2)}, str(root / "m.safetensors"))
    assert (
        main(
            [
                "import",
                str(root / "m.safetensors"),
                "--from",
                "safetensors",
                "--step",
                "3",
                str(root),
            ]
        )
        == 0
    )
    for bad in (b"\x80\x02cos\nsystem\n.", b"not a pickle"):
        (root / "d" / ".metadata").write_bytes(bad)
        main(["import", str(root / "d"), "--from", "dcp", "--step", "4", str(root)])


@pytest.fixture
def audit(warmed: None) -> _Audit:
    """The audit, once the modules a legitimate import needs are loaded."""
    return _AUDIT


def assert_refused(code: int, err: str, *needles: str) -> None:
    """Exit 1 with one error line (plus at most a hint), no traceback, naming ``needles``."""
    lines = err.strip().splitlines()
    assert code == 1, err
    assert "Traceback" not in err
    assert len(lines) <= 2 and lines[0].startswith("aiockpt "), err
    assert len(lines) == 1 or lines[1].startswith("  hint: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# -- DCP checkpoints, real and forged --------------------------------------------------------------


def _plain_state() -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)},
        "extra": {"epoch": 3, "name": "warmup"},
    }


@pytest.fixture
def dcp_dir(tmp_path: Path) -> Path:
    """A checkpoint written by torch.distributed.checkpoint.save itself."""
    directory = tmp_path / "dcp"
    dcp.save(_plain_state(), storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    return directory


def _metadata(directory: Path) -> Metadata:
    with open(directory / ".metadata", "rb") as file:
        return pickle.load(file)


def _save_metadata(directory: Path, metadata: Any) -> None:
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))


def _storage(metadata: Metadata) -> dict[MetadataIndex, _StorageInfo]:
    return metadata.storage_data  # type: ignore[no-any-return]


def _forge_dcp(directory: Path, tensors: dict[str, tuple[tuple[int, ...], list[Any]]]) -> None:
    """A DCP directory of tensors in chunks: {name: (size, [(offsets, chunk tensor), ...])}."""
    directory.mkdir()
    data = io.BytesIO()
    declared: dict[str, Any] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for name, (size, chunks) in tensors.items():
        records = []
        for offsets, chunk in chunks:
            start = data.tell()
            torch.save(chunk, data)
            storage[MetadataIndex(name, offsets)] = _StorageInfo(
                "__0_0.distcp", start, data.tell() - start
            )
            records.append(ChunkStorageMetadata(torch.Size(offsets), chunk.shape))
        properties = TensorProperties(dtype=chunks[0][1].dtype)
        declared[name] = TensorStorageMetadata(properties, torch.Size(size), records)
    (directory / "__0_0.distcp").write_bytes(data.getvalue())
    paths = {name: ("model", name) for name in tensors}
    _save_metadata(directory, Metadata(declared, planner_data=paths, storage_data=storage))


def test_a_real_dcp_checkpoint_imports_and_restores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    model = MixedModel(seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    source = tmp_path / "dcp"
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(source), no_dist=True)

    code, _, err = run_cli(capsys, "import", source, "--from", "dcp", "--step", 9, tmp_path / "c")
    assert code == 0, err

    restored = MixedModel(seed=1)
    restored_opt = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    with aiockpt.SyncCheckpointer(
        make_config(tmp_path, directory=tmp_path / "c"), model=restored, optimizer=restored_opt
    ) as ckpt:
        assert ckpt.restore() == 9
    assert_state_equal(dict(restored.state_dict()), dict(model.state_dict()))
    assert_state_equal(restored_opt.state_dict()["state"], optimizer.state_dict()["state"])


def test_a_tensor_saved_in_chunks_is_put_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    whole = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    _forge_dcp(
        tmp_path / "dcp",
        {"w": ((4, 6), [((0, 0), whole[:2].clone()), ((2, 0), whole[2:].clone())])},
    )
    code, _, err = run_cli(
        capsys, "import", tmp_path / "dcp", "--from", "dcp", "--step", 1, tmp_path / "c"
    )
    assert code == 0, err
    assert torch.equal(aiockpt.load(tmp_path / "c" / "step-1")["model"]["w"], whole)


def test_chunks_that_overlap_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # Same element count as the tensor, but two chunks cover row 1 and none covers row 2.
    _forge_dcp(
        tmp_path / "dcp",
        {"w": ((3, 2), [((0, 0), torch.ones(2, 2)), ((1, 0), torch.ones(1, 2))])},
    )
    code, _, err = run_cli(
        capsys, "import", tmp_path / "dcp", "--from", "dcp", "--step", 1, tmp_path / "c"
    )
    assert_refused(code, err, "overlap")
    assert not (tmp_path / "c" / "step-1").exists()


# -- DCP metadata that reaches for code ----------------------------------------------------------


def _string(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _global_call(module: str, name: str, argument: str) -> bytes:
    """A protocol-2 pickle calling module.name(argument) through GLOBAL + REDUCE."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + _string(argument) + b"\x85R."


def _stack_global_call(module: str, name: str, argument: str) -> bytes:
    """The same through protocol 4's STACK_GLOBAL."""
    return b"\x80\x04" + _string(module) + _string(name) + b"\x93" + _string(argument) + b"\x85R."


def _inst_call(module: str, name: str, argument: str) -> bytes:
    """The same through protocol 0's INST."""
    return b"(" + _string(argument) + b"i" + f"{module}\n{name}\n".encode() + b"."


REACHES = [
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "Popen"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("importlib", "import_module"),
    ("torch", "load"),
    ("torch", "save"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.jit", "load"),
    ("copyreg", "_reconstructor"),
    # Dotted names through a module that is allowed: still only its exact classes.
    ("torch.distributed.checkpoint.metadata", "os.system"),
    ("torch.distributed.checkpoint.metadata", "torch.load"),
    ("torch.distributed.checkpoint.filesystem", "pickle.loads"),
    ("torch", "os.system"),
    ("collections", "OrderedDict.fromkeys"),
]


@pytest.mark.parametrize("opcodes", [_global_call, _stack_global_call, _inst_call])
@pytest.mark.parametrize(("module", "name"), REACHES, ids=[f"{m}.{n}" for m, n in REACHES])
def test_metadata_that_reaches_for_code_is_refused_and_nothing_runs(
    dcp_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    audit: _Audit,
    module: str,
    name: str,
    opcodes: Any,
):
    marker = tmp_path / "ran"
    argument = {
        "eval": f"open({str(marker)!r}, 'w')",
        "exec": f"open({str(marker)!r}, 'w')",
    }.get(name, f"touch {marker}")
    (dcp_dir / ".metadata").write_bytes(opcodes(module, name, argument))
    with audit.watch():
        code, _, err = run_cli(
            capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c"
        )
    assert_refused(code, err, f"{module}.{name}", "refused")
    assert not marker.exists()
    audit.assert_clean(tmp_path)
    assert not (tmp_path / "c" / "step-1").exists()


class _Reach:
    """Pickles as a call of ``function(*args)``."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.function, self.args


def test_a_call_hidden_inside_real_metadata_is_refused(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], audit: _Audit
):
    marker = tmp_path / "ran"
    metadata = _metadata(dcp_dir)
    metadata.planner_data["extra.epoch"] = _Reach(os.system, f"touch {marker}")
    _save_metadata(dcp_dir, metadata)
    with audit.watch():
        code, _, err = run_cli(
            capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c"
        )
    assert_refused(code, err, "system")
    assert not marker.exists()
    audit.assert_clean(tmp_path)


def _build(target: bytes, key: str, value: bytes) -> bytes:
    """A pickle that pushes ``target`` and BUILDs {key: value} onto it."""
    return b"\x80\x02" + target + b"}" + _string(key) + value + b"sb."


_METADATA_CLASS = b"ctorch.distributed.checkpoint.metadata\nMetadata\n"
_STORAGE_INFO = b"ctorch.distributed.checkpoint.filesystem\n_StorageInfo\n)\x81"  # an instance


@pytest.mark.parametrize(
    "payload",
    [
        # Attributes set on an allowed class itself would change it for the whole process.
        _build(_METADATA_CLASS, "__eq__", b"ccollections\nOrderedDict\n"),
        _build(_METADATA_CLASS, "__doc__", _string("changed")),
        # A __setstate__ planted in an instance would be called by the next BUILD.
        _build(_STORAGE_INFO, "__setstate__", b"ctorch\nSize\n"),
        _build(_STORAGE_INFO, "not_a_field", _string("x")),
        # A global object (a dtype) is not a record either.
        _build(b"ctorch\nfloat32\n", "is_signed", _string("x")),
    ],
    ids=["class-method", "class-doc", "planted-setstate", "unknown-field", "dtype-object"],
)
def test_metadata_may_only_set_fields_of_dcp_records(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], audit: _Audit, payload: bytes
):
    doc, eq = Metadata.__doc__, Metadata.__eq__
    (dcp_dir / ".metadata").write_bytes(payload)
    with audit.watch():
        code, _, err = run_cli(
            capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c"
        )
    assert_refused(code, err, "refused")
    assert Metadata.__doc__ == doc and Metadata.__eq__ is eq
    audit.assert_clean(tmp_path)


@pytest.mark.parametrize(
    "raw", [b"", b"\x80\x02", b"garbage", pickle.dumps({"not": "metadata"}), b"\x80\x02K\x01."]
)
def test_metadata_that_is_not_dcp_metadata_is_refused(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes
):
    (dcp_dir / ".metadata").write_bytes(raw)
    code, _, err = run_cli(capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c")
    assert_refused(code, err, ".metadata")


def test_values_inside_dcp_load_weights_only(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], audit: _Audit
):
    """A non-tensor value is a torch.save record in a data file: one that pickles a call
    is refused, not run."""
    marker = tmp_path / "ran"
    metadata = _metadata(dcp_dir)
    buffer = io.BytesIO()
    torch.save(_Reach(os.system, f"touch {marker}"), buffer)
    data = dcp_dir / "__0_0.distcp"
    start = data.stat().st_size
    with open(data, "ab") as file:
        file.write(buffer.getvalue())
    _storage(metadata)[MetadataIndex("extra.epoch")] = _StorageInfo(
        "__0_0.distcp", start, len(buffer.getvalue())
    )
    _save_metadata(dcp_dir, metadata)
    with audit.watch():
        code, _, err = run_cli(
            capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c"
        )
    assert_refused(code, err, "system", "cannot be loaded safely")
    assert not marker.exists()
    audit.assert_clean(tmp_path)


# -- DCP paths and sizes -------------------------------------------------------------------------


def _retarget(directory: Path, relative_path: str) -> None:
    metadata = _metadata(directory)
    for index, info in _storage(metadata).items():
        _storage(metadata)[index] = dataclasses.replace(info, relative_path=relative_path)
    _save_metadata(directory, metadata)


@pytest.mark.parametrize(
    "name",
    [
        "../outside.distcp",
        "sub/../../outside.distcp",
        "OUTSIDE_ABSOLUTE",
        "/etc/passwd",
        "/dev/zero",
        "",
        "a\x00b",
    ],
)
def test_data_files_outside_the_directory_are_never_opened(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], audit: _Audit, name: str
):
    # A readable copy outside: were it opened, the import would succeed.
    shutil.copy(dcp_dir / "__0_0.distcp", tmp_path / "outside.distcp")
    if name == "OUTSIDE_ABSOLUTE":
        name = str(tmp_path / "outside.distcp")
    _retarget(dcp_dir, name)
    with audit.watch():
        code, _, err = run_cli(
            capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c"
        )
    assert_refused(code, err, ".metadata")
    audit.assert_clean(dcp_dir)  # nothing opened outside the source, not even the target
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("link", ["file", "directory"])
def test_symlinks_out_of_the_directory_are_not_followed(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], audit: _Audit, link: str
):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(dcp_dir / "__0_0.distcp", outside / "__0_0.distcp")
    if link == "file":
        (dcp_dir / "__0_0.distcp").unlink()
        (dcp_dir / "__0_0.distcp").symlink_to(outside / "__0_0.distcp")
    else:
        (dcp_dir / "sub").symlink_to(outside)
        _retarget(dcp_dir, "sub/__0_0.distcp")
    with audit.watch():
        code, _, err = run_cli(
            capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c"
        )
    assert_refused(code, err)
    assert "symbolic link" in err or "outside the checkpoint directory" in err
    audit.assert_clean(dcp_dir)


def test_a_link_to_dev_zero_with_a_huge_length_allocates_nothing(dcp_dir: Path, tmp_path: Path):
    """Measured in a child process: its peak memory stays far below the declared 64 GiB."""
    (dcp_dir / "zero.distcp").symlink_to("/dev/zero")
    metadata = _metadata(dcp_dir)
    _storage(metadata)[MetadataIndex("extra.epoch")] = _StorageInfo("zero.distcp", 0, 64 << 30)
    _save_metadata(dcp_dir, metadata)
    regular = tmp_path / "regular"
    shutil.copytree(dcp_dir, regular, symlinks=True)
    (regular / "zero.distcp").unlink()
    (regular / "zero.distcp").write_bytes(b"\0" * 4096)  # a regular file, far too short
    script = (
        "import resource, sys\n"
        "from aiockpt.cli.main import main\n"
        "codes = [main(['import', d, '--from', 'dcp', '--step', '1', d + '-out'])\n"
        "         for d in sys.argv[1:]]\n"
        "print(codes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(dcp_dir), str(regular)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    codes, peak_kib = done.stdout.rsplit("]", 1)
    assert codes == "[1, 1", done.stdout + done.stderr
    assert int(peak_kib) < 2 * 2**20, f"peak RSS {int(peak_kib) >> 10} MiB"
    assert "outside the checkpoint directory" in done.stderr
    assert "which holds 4096 bytes" in done.stderr
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr


def _edit_storage(directory: Path, edit: Any) -> None:
    """Apply ``edit(info, size of the data file)`` to every storage record."""
    size = (directory / "__0_0.distcp").stat().st_size
    metadata = _metadata(directory)
    for index, info in list(_storage(metadata).items()):
        _storage(metadata)[index] = edit(info, size)
    _save_metadata(directory, metadata)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda info, _: dataclasses.replace(info, length=64 << 30), "which holds"),
        (lambda info, _: dataclasses.replace(info, offset=2**62), "which holds"),
        (lambda info, _: dataclasses.replace(info, offset=-1), "bad byte range"),
        (lambda info, _: dataclasses.replace(info, length="10"), "bad byte range"),
        # Every value pointing at the same bytes: more declared than the files hold.
        (lambda info, size: dataclasses.replace(info, offset=0, length=size // 2), "overlap"),
        (lambda info, _: dataclasses.replace(info, transform_descriptors=["zstd"]), "transforms"),
    ],
    ids=["64GiB-length", "huge-offset", "negative", "not-an-int", "overlapping", "transforms"],
)
def test_declared_ranges_are_checked_against_the_files_before_reading(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Any, needle: str
):
    _edit_storage(dcp_dir, edit)
    code, _, err = run_cli(capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c")
    assert_refused(code, err, needle)


@pytest.mark.parametrize(
    ("size", "chunk", "needle"),
    [
        ((2**40,), (2**40,), "stored in"),  # a terabyte declared in a 1.5 KB record
        ((2**40, 3), (2, 3), "do not make up its size"),
        ((2, 3), (2, 4), "outside its size"),
        ((2, -3), (2, 3), "non-negative"),
    ],
)
def test_declared_tensor_sizes_are_bounded_by_the_stored_bytes(
    dcp_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    size: tuple[int, ...],
    chunk: tuple[int, ...],
    needle: str,
):
    metadata = _metadata(dcp_dir)
    record = metadata.state_dict_metadata["model.w"]
    assert isinstance(record, TensorStorageMetadata)
    offsets = (0,) * len(chunk)
    info = _storage(metadata).pop(MetadataIndex("model.w", (0, 0)))
    _storage(metadata)[MetadataIndex("model.w", offsets)] = info
    record.size = torch.Size(size) if min(size) >= 0 else size  # type: ignore[assignment]
    record.chunks = [ChunkStorageMetadata(torch.Size(offsets), torch.Size(chunk))]
    _save_metadata(dcp_dir, metadata)
    code, _, err = run_cli(capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c")
    assert_refused(code, err, needle)


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        (("model", "w", 10**9), "bad state path"),  # a list of a billion Nones
        (("model", 0, "w"), "conflicts"),  # "model" is a dict elsewhere
        ((), "bad state path"),
        ((3,), "bad state path"),
    ],
)
def test_state_paths_are_checked(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], path: Any, needle: str
):
    metadata = _metadata(dcp_dir)
    metadata.planner_data["model.w"] = path
    _save_metadata(dcp_dir, metadata)
    code, _, err = run_cli(capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c")
    assert_refused(code, err, needle)


def test_a_chunk_holding_another_dtype_or_shape_is_refused(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    metadata = _metadata(dcp_dir)
    record = metadata.state_dict_metadata["model.b"]
    assert isinstance(record, TensorStorageMetadata)
    record.properties.dtype = torch.int8  # the record holds float32
    _save_metadata(dcp_dir, metadata)
    code, _, err = run_cli(capsys, "import", dcp_dir, "--from", "dcp", "--step", 1, tmp_path / "c")
    assert_refused(code, err, "float32", "torch.int8")


# -- FIFOs and other files that are not regular --------------------------------------------------


def _fifo_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    if case in ("torch", "safetensors"):
        source = tmp_path / f"source.{case}"
        os.mkfifo(source)
        return source, case
    source = tmp_path / "dcp"
    dcp.save(_plain_state(), storage_writer=dcp.FileSystemWriter(source), no_dist=True)
    victim = source / (".metadata" if case == "dcp-metadata" else "__0_0.distcp")
    victim.unlink()
    os.mkfifo(victim)
    return source, "dcp"


@pytest.mark.parametrize("case", ["torch", "safetensors", "dcp-metadata", "dcp-data"])
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, case: str):
    source, fmt = _fifo_case(tmp_path, case)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiockpt",
            "import",
            str(source),
            "--from",
            fmt,
            "--step",
            "1",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,  # a blocking open() would never return
    )
    assert_refused(done.returncode, done.stderr, "FIFO", "not a regular file")


def test_a_directory_given_as_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "dir.pt").mkdir()
    code, _, err = run_cli(
        capsys, "import", tmp_path / "dir.pt", "--from", "torch", "--step", 1, tmp_path / "c"
    )
    assert_refused(code, err, "is a directory")
    (tmp_path / "file").write_bytes(b"x")
    code, _, err = run_cli(
        capsys, "import", tmp_path / "file", "--from", "dcp", "--step", 1, tmp_path / "c"
    )
    assert_refused(code, err, "not a directory")


# -- torch.save files ----------------------------------------------------------------------------


class _NotWeights:
    pass


def test_torch_files_load_weights_only_and_name_what_they_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], audit: _Audit
):
    marker = tmp_path / "ran"
    cases = {
        "call.pt": {"model": {"w": torch.ones(1)}, "evil": _Reach(os.system, f"touch {marker}")},
        "class.pt": {"model": {"w": torch.ones(1)}, "obj": _NotWeights()},
    }
    for name, state in cases.items():
        torch.save(state, tmp_path / name)
    for name, needle in (("call.pt", "system"), ("class.pt", "_NotWeights")):
        with audit.watch():
            code, _, err = run_cli(
                capsys, "import", tmp_path / name, "--from", "torch", "--step", 1, tmp_path / "c"
            )
        assert_refused(code, err, needle, "cannot be loaded safely")
    assert not marker.exists()
    audit.assert_clean(tmp_path)
    assert not (tmp_path / "c" / "step-1").exists()


def test_torch_files_that_could_declare_more_than_they_hold_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    state = {"model": {"w": torch.ones(4)}}
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(state, tmp_path / "plain.pt")
    with (
        zipfile.ZipFile(tmp_path / "plain.pt") as plain,
        zipfile.ZipFile(
            tmp_path / "deflated.pt", "w", compression=zipfile.ZIP_DEFLATED
        ) as deflated,
    ):
        for record in plain.infolist():
            deflated.writestr(record.filename, plain.read(record))
    code, _, err = run_cli(
        capsys, "import", tmp_path / "legacy.pt", "--from", "torch", "--step", 1, tmp_path / "c"
    )
    assert_refused(code, err, "not a torch.save zip archive")
    code, _, err = run_cli(
        capsys, "import", tmp_path / "deflated.pt", "--from", "torch", "--step", 1, tmp_path / "c"
    )
    assert_refused(code, err, "compressed")
    (tmp_path / "short.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:300])
    code, _, err = run_cli(
        capsys, "import", tmp_path / "short.pt", "--from", "torch", "--step", 1, tmp_path / "c"
    )
    assert_refused(code, err, "short.pt")
    assert not (tmp_path / "c" / "step-1").exists()


# -- what import writes can be loaded -------------------------------------------------------------


def test_top_level_keys_that_cannot_name_an_object_are_refused_or_nested(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    state = {"$x": {"w": torch.ones(2)}, "model": {"$tensor": torch.ones(1), "a": 1}}
    torch.save(state, tmp_path / "dollar.pt")
    code, _, err = run_cli(
        capsys, "import", tmp_path / "dollar.pt", "--from", "torch", "--step", 1, tmp_path / "c"
    )
    assert_refused(code, err, "'$x'")
    assert "--key" in err and not (tmp_path / "c" / "step-1").exists()

    # Under one name, "$" keys are ordinary nested keys: the encoder escapes them.
    code, _, err = run_cli(
        capsys,
        "import",
        tmp_path / "dollar.pt",
        "--from",
        "torch",
        "--step",
        1,
        tmp_path / "c",
        "--key",
        "all",
    )
    assert code == 0, err
    assert_state_equal(aiockpt.load(tmp_path / "c" / "step-1")["all"], state)

    torch.save({"a/b": {"w": torch.ones(1)}}, tmp_path / "slash.pt")
    code, _, err = run_cli(
        capsys, "import", tmp_path / "slash.pt", "--from", "torch", "--step", 2, tmp_path / "c"
    )
    assert_refused(code, err, "'a/b'")


def _deep(levels: int) -> Any:
    node: Any = torch.ones(1)
    for _ in range(levels):
        node = {"k": node}
    return node


@pytest.mark.parametrize(
    "state",
    [
        {"model": {"k" * 5000: torch.ones(1)}},
        {"model": {"w": torch.zeros([1] * 64)}},
        {"model": _deep(520)},
    ],
    ids=["long-key", "64-dims", "deep"],
)
def test_import_never_leaves_a_checkpoint_that_load_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], state: dict[str, Any]
):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(5000)  # torch.save itself recurses per level
    try:
        torch.save(state, tmp_path / "s.pt")
    finally:
        sys.setrecursionlimit(limit)
    code, _, err = run_cli(
        capsys, "import", tmp_path / "s.pt", "--from", "torch", "--step", 1, tmp_path / "c"
    )
    if code == 0:
        aiockpt.load(tmp_path / "c" / "step-1")
    else:
        assert_refused(code, err)
        assert not (tmp_path / "c" / "step-1").exists()
        assert aiockpt.list_checkpoints(tmp_path / "c") == []
        assert not (tmp_path / "c" / "latest").exists()  # naming nothing that is gone


def test_a_written_checkpoint_that_fails_to_load_back_is_withdrawn(tmp_path: Path):
    from aiockpt.cli.convert import _verify_written
    from aiockpt.errors import ConversionError

    torch.save({"model": {"w": torch.ones(64)}}, tmp_path / "s.pt")
    source, directory = str(tmp_path / "s.pt"), str(tmp_path / "c")
    assert main(["import", source, "--from", "torch", "--step", "0", directory]) == 0
    assert main(["import", source, "--from", "torch", "--step", "1", directory]) == 0
    step = tmp_path / "c" / "step-1"
    data = next(step.glob("data-*"))
    data.write_bytes(b"\xff" + data.read_bytes()[1:])
    with pytest.raises(ConversionError, match="fails to load back"):
        _verify_written(step)
    assert not step.exists() and not list((tmp_path / "c").glob(".trash-*"))
    assert (tmp_path / "c" / "latest").read_text().strip() == "step-0"  # not the one withdrawn
    assert [info.step for info in aiockpt.list_checkpoints(tmp_path / "c")] == [0]


# -- export to safetensors -------------------------------------------------------------------------


class _Holder:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


@pytest.mark.parametrize(
    "tensor",
    [torch.zeros(3, dtype=torch.complex128), torch.zeros(3, dtype=torch.int16).view(torch.bits16)],
    ids=["complex128", "bits16"],
)
def test_export_of_a_dtype_safetensors_cannot_hold_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tensor: torch.Tensor
):
    with aiockpt.SyncCheckpointer(
        make_config(tmp_path), model=_Holder({"fine": torch.ones(2), "odd": tensor})
    ) as ckpt:
        ckpt.checkpoint(1).wait()
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    code, _, err = run_cli(
        capsys, "export", tmp_path / "ckpt" / "step-1", "--to", "safetensors", out
    )
    assert_refused(code, err, "'model/odd'", str(tensor.dtype).removeprefix("torch."))
    assert "--to torch" in err
    assert list(out.parent.iterdir()) == []  # no output, no temporary left behind


def test_export_to_safetensors_without_numpy_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    with aiockpt.SyncCheckpointer(
        make_config(tmp_path), model=_Holder({"w": torch.ones(2)})
    ) as ckpt:
        ckpt.checkpoint(1).wait()
    monkeypatch.setitem(sys.modules, "numpy", None)  # as if not installed
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(
        capsys, "export", tmp_path / "ckpt" / "step-1", "--to", "safetensors", out
    )
    assert_refused(code, err, "numpy")
    assert not out.exists()


# -- Hugging Face tied weights -------------------------------------------------------------------


def _hf_files(directory: Path, config: dict[str, Any] | None, *, head: bool = False) -> Path:
    import safetensors.torch

    directory.mkdir()
    tensors = {"model.embed_tokens.weight": torch.randn(8, 4), "model.norm.weight": torch.ones(4)}
    if head:
        tensors["lm_head.weight"] = torch.randn(8, 4)
    safetensors.torch.save_file(tensors, str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory / "model.safetensors"


@pytest.mark.parametrize(
    ("config", "head", "warned"),
    [
        ({"model_type": "llama", "tie_word_embeddings": True}, False, True),
        ({"model_type": "gpt2"}, False, True),  # tie_word_embeddings defaults to true
        ({"model_type": "llama", "tie_word_embeddings": False}, False, False),
        ({"model_type": "llama", "tie_word_embeddings": True}, True, False),
        (None, False, False),  # no config.json: nothing says the head is tied
    ],
    ids=["tied", "tied-by-default", "untied", "head-present", "no-config"],
)
def test_safetensors_import_reports_tied_weights_left_out(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    config: dict[str, Any] | None,
    head: bool,
    warned: bool,
):
    source = _hf_files(tmp_path / "hf", config, head=head)
    code, out, err = run_cli(
        capsys, "import", source, "--from", "safetensors", "--step", 0, tmp_path / "c", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    if warned:
        assert report["tied_keys_missing"] == [
            {"key": "lm_head.weight", "tied_to": "model.embed_tokens.weight", "under": "model"}
        ]
        (line,) = err.strip().splitlines()
        assert line.startswith("warning: lm_head.weight") and "model.embed_tokens.weight" in line
    else:
        assert report["tied_keys_missing"] == [] and err == ""
    assert ("lm_head.weight" in aiockpt.load(tmp_path / "c" / "step-0")["model"]) == head


class _TinyLM(torch.nn.Module):
    """The shape of a Hugging Face causal LM whose head is tied to its input embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(8, 4)
        self.model.norm = torch.nn.LayerNorm(4)
        self.lm_head = torch.nn.Linear(4, 8, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight


def test_the_tied_weights_advice_makes_the_import_restore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    import safetensors.torch

    trained = _TinyLM()
    (tmp_path / "hf").mkdir()
    source = tmp_path / "hf" / "model.safetensors"
    saved = {k: v for k, v in trained.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(saved, str(source))
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    code, _, err = run_cli(
        capsys, "import", source, "--from", "safetensors", "--step", 0, tmp_path / "a"
    )
    assert code == 0 and "tied.pt" in err
    config = make_config(tmp_path, directory=tmp_path / "a")
    with (
        aiockpt.SyncCheckpointer(config, model=_TinyLM()) as ckpt,
        pytest.raises(aiockpt.StateMismatchError, match=r"missing keys \['lm_head\.weight'\]"),
    ):
        ckpt.restore()  # a strict restore: what the warning announced

    # What the warning says to do:
    sd = safetensors.torch.load_file(str(source))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    torch.save(sd, tmp_path / "tied.pt")
    code, _, err = run_cli(
        capsys, "import", tmp_path / "tied.pt", "--from", "torch", "--step", 0, tmp_path / "b"
    )
    assert code == 0, err
    restored = _TinyLM()
    with aiockpt.SyncCheckpointer(
        make_config(tmp_path, directory=tmp_path / "b"), model=restored
    ) as ckpt:
        assert ckpt.restore() == 0
    assert torch.equal(restored.lm_head.weight, trained.model.embed_tokens.weight)
    assert restored.lm_head.weight is restored.model.embed_tokens.weight  # still tied


def test_a_config_json_that_is_a_fifo_is_passed_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    source = _hf_files(tmp_path / "hf", None)
    os.mkfifo(tmp_path / "hf" / "config.json")  # opening it for reading would block
    code, out, err = run_cli(
        capsys, "import", source, "--from", "safetensors", "--step", 0, tmp_path / "c", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["tied_keys_missing"] == []


def test_a_torch_record_declaring_more_than_it_holds_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(10)}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        records = {r.filename: archive.read(r) for r in archive.infolist()}
    pickled = next(name for name in records if name.endswith("data.pkl"))
    # The storage's element count (10, as BININT1) becomes 2**30: 1 GiB claimed, 40 B held.
    records[pickled] = records[pickled].replace(b"K\n", b"J" + struct.pack("<i", 2**30), 1)
    with zipfile.ZipFile(tmp_path / "forged.pt", "w") as forged:
        for name, data in records.items():
            forged.writestr(name, data)
    code, _, err = run_cli(
        capsys, "import", tmp_path / "forged.pt", "--from", "torch", "--step", 1, tmp_path / "c"
    )
    assert_refused(code, err, "cannot be read as torch.save data")
    assert not (tmp_path / "c" / "step-1").exists()


def test_a_torch_export_that_weights_only_would_refuse_is_not_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """Whatever value types checkpoints come to hold, `--to torch` publishes only a file that
    torch.load(weights_only=True) loads; one holding a class it refuses is not written."""
    import aiockpt.cli.convert

    with aiockpt.SyncCheckpointer(
        make_config(tmp_path), model=_Holder({"w": torch.ones(2)})
    ) as ckpt:
        ckpt.checkpoint(1).wait()
    portable = aiockpt.cli.convert._portable

    def with_odd_value(value: Any) -> Any:  # the top-level state gains a value torch refuses
        top = isinstance(value, dict) and "model" in value
        return {**portable(value), "odd": _NotWeights()} if top else portable(value)

    monkeypatch.setattr(aiockpt.cli.convert, "_portable", with_odd_value)
    out = tmp_path / "out" / "state.pt"
    out.parent.mkdir()
    code, _, err = run_cli(capsys, "export", tmp_path / "ckpt" / "step-1", "--to", "torch", out)
    assert_refused(code, err, "_NotWeights", "weights_only")
    assert list(out.parent.iterdir()) == []
