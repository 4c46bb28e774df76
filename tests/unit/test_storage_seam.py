"""The storage seam: locations resolved by scheme, and the contract every backend keeps.

The contract tests drive the backend only through ``CheckpointStorage`` (the protocol in
``aiockpt.storage.base``), so that a later backend can be run through the same checks by
adding it to ``BACKENDS``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
from conftest import Bag

import aiockpt
from aiockpt._format.manifest import MANIFEST_NAME
from aiockpt._util.location import SERVED_SCHEMES, local_directory, storage_location
from aiockpt.cli.main import main
from aiockpt.errors import ConfigError, DirectoryLockedError
from aiockpt.storage import CheckpointStorage, open_storage
from aiockpt.storage.local import LATEST_NAME

REPO = Path(__file__).resolve().parents[2]
UNSERVED = ["gs://bucket/run-1", "az://container/run", "foo://x/y", "GS://Bucket/run"]


# -- locations --------------------------------------------------------------------------
@pytest.mark.parametrize("url", UNSERVED)
def test_config_refuses_a_scheme_no_backend_serves(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scheme = url.split("://")[0].lower()
    with pytest.raises(ConfigError) as caught:
        aiockpt.Config(directory=url)
    message = str(caught.value)
    assert f"{scheme}://" in message and url in message
    assert "file://" in message and "plain paths" in message
    assert list(tmp_path.iterdir()) == []  # no local folder named "s3:" appears


def test_every_way_of_building_a_config_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "aiockpt.toml"
    toml.write_text('[checkpoint]\ndirectory = "gs://bucket/run"\n')
    with pytest.raises(ConfigError, match=r"gs://.*aiockpt\.toml"):
        aiockpt.Config.from_toml(toml, env=False)
    with pytest.raises(ConfigError, match=r"AIOCKPT_DIRECTORY.*gs://"):
        aiockpt.Config.from_env(environ={"AIOCKPT_DIRECTORY": "gs://bucket/run"})
    with pytest.raises(ConfigError, match="gs://"):
        aiockpt.Config(directory=tmp_path).replace(directory="gs://b/run")
    with pytest.raises(ConfigError, match="gs://"):
        aiockpt.list_checkpoints("gs://bucket/run")


def test_a_file_url_is_its_local_directory(tmp_path: Path) -> None:
    root = tmp_path / "a dir"
    url = "file://" + str(root).replace(" ", "%20")
    config = aiockpt.Config(directory=url, num_threads=2)
    assert config.directory == root
    assert aiockpt.Config(directory=f"file://localhost{root}").directory == root
    bag = Bag({"w": torch.arange(10.0)})
    with aiockpt.SyncCheckpointer(config, bag=bag) as writer:
        writer.checkpoint(5).wait()
    assert [info.step for info in aiockpt.list_checkpoints(url)] == [5]
    assert (root / "step-5" / MANIFEST_NAME).is_file()


@pytest.mark.parametrize("url", ["file://host/x", "file://relative", "file:///x?y=1"])
def test_a_file_url_that_names_no_local_path_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="file:///absolute/path"):
        aiockpt.Config(directory=url)


def test_names_with_a_colon_stay_plain_paths(tmp_path: Path) -> None:
    # Only "<scheme>://" marks a URL: "s3:" is a legal directory name, and a Path has
    # folded "//" already, so neither is refused nor rewritten.
    assert aiockpt.Config(directory="s3:/run").directory == Path("s3:/run")
    assert aiockpt.Config(directory=Path("s3://run")).directory == Path("s3:/run")
    assert local_directory(tmp_path) == tmp_path


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "gs://bucket/run"],
        ["ls", "--json", "az://container/run"],
        ["verify", "gs://bucket/run"],
        ["inspect", "gs://bucket/run"],
        ["prune", "--keep-last", "1", "gs://bucket/run"],
        ["export", "gs://bucket/run", "--to", "torch", "out.pt"],
    ],
)
def test_cli_commands_refuse_it_in_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2  # a location no backend serves: fix the command
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    scheme = next(a for a in argv if "://" in a).split("://")[0]
    assert lines[0].startswith(f"aiockpt {argv[0]}: error: ")
    assert f"{scheme}://" in lines[0] and "file://" in lines[0]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_cli_import_refuses_it_for_the_target_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, source)
    code = main(["import", str(source), "--from", "torch", "--step", "1", "gs://bucket/run"])
    assert code == 2
    assert "gs://" in capsys.readouterr().err


def test_a_served_cli_url_lists_the_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = aiockpt.Config(directory=tmp_path, num_threads=2)
    with aiockpt.SyncCheckpointer(config, bag=Bag({"w": torch.ones(3)})) as writer:
        writer.checkpoint(3).wait()
    assert main(["ls", "--json", f"file://{tmp_path}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["step"] for row in report["checkpoints"]] == [3]


def test_every_served_scheme_opens_a_backend(tmp_path: Path) -> None:
    pytest.importorskip("obstore", reason="s3:// needs the s3 extra")
    for scheme, form in SERVED_SCHEMES.items():
        # Opening takes the lock: building a backend touches nothing (no network either).
        location = f"file://{tmp_path}" if scheme == "file" else form
        storage = open_storage(location, durable=False)
        assert isinstance(storage, CheckpointStorage)
        assert storage.root == (tmp_path if scheme == "file" else storage_location(form))
    with pytest.raises(ConfigError, match="gs://"):
        open_storage("gs://bucket/run", durable=False)


# -- the contract, through the protocol only ----------------------------------------------
BACKENDS: dict[str, Callable[[Path], CheckpointStorage]] = {
    "local": lambda root: open_storage(root, durable=True),
}


@pytest.fixture(params=sorted(BACKENDS))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStorage:
    backend = BACKENDS[request.param](tmp_path / "ckpt")
    backend.open()
    request.addfinalizer(backend.close)
    return backend


def _manifest(step: int, name: str, data: bytes) -> bytes:
    # The smallest manifest Manifest.parse accepts: one file, one tensor of uint8 bytes.
    body = {
        "format": "aiockpt",
        "format_version": 1,
        "step": step,
        "created": 0.0,
        "versions": {},
        "checksum": "crc32c",
        "files": [{"name": name, "nbytes": len(data)}],
        "tensors": [
            {
                "name": "w",
                "dtype": "uint8",
                "shape": [len(data)],
                "nbytes": len(data),
                "pieces": [
                    {"file": name, "offset": 0, "length": len(data), "crc32c": crc32c.crc32c(data)}
                ],
            }
        ],
        "state": {"bag": {"w": {"$tensor": 0}}},
    }
    compact = json.dumps(body, separators=(",", ":")).encode()
    body["manifest_crc32c"] = crc32c.crc32c(compact)
    return json.dumps(body, separators=(",", ":")).encode()


def _save(storage: CheckpointStorage, step: int, data: bytes) -> Path:
    async def go() -> Path:
        temporary = await storage.begin(step)
        name = "data-r00000-c00000.bin"
        sums = storage.write_chunk(temporary, name, memoryview(data), [(0, len(data))])
        assert sums == [crc32c.crc32c(data)]
        storage.make_durable(temporary)
        return await storage.commit(temporary, step, _manifest(step, name, data))

    return asyncio.run(go())


def test_a_committed_checkpoint_reads_back_through_the_seam(storage: CheckpointStorage) -> None:
    data = bytes(range(256)) * 16
    final = _save(storage, 7, data)
    assert [info.step for info in storage.list_committed()] == [7]
    file = storage.open_file(final, "data-r00000-c00000.bin")
    try:
        assert file.size == len(data)
        head, tail = bytearray(60), bytearray(40)
        file.read_into([memoryview(head), memoryview(tail)], 1000)
        assert bytes(head + tail) == data[1000:1100]
        with pytest.raises(EOFError):
            file.read_into([memoryview(bytearray(10))], len(data) - 5)
    finally:
        file.close()
    with pytest.raises(FileNotFoundError):
        storage.open_file(final, "data-r00000-c00001.bin")
    assert storage.latest_name() == "step-7"
    state = aiockpt.load(final)
    assert bytes(state["bag"]["w"].numpy()) == data


def test_a_temporary_is_invisible_until_its_manifest_commits(storage: CheckpointStorage) -> None:
    async def begin_twice() -> tuple[Path, Path, Path]:
        shared = await storage.begin(9, "abcd1234")
        again = await storage.begin(9, "abcd1234")  # every rank names the same one
        private = await storage.begin(9)
        return shared, again, private

    shared, again, private = asyncio.run(begin_twice())
    assert shared == again == storage.shared_temporary(9, "abcd1234")
    assert private != shared
    storage.write_chunk(shared, "data-r00001-c00000.bin", memoryview(b"x" * 64), [(0, 64)])
    assert storage.list_committed() == []
    assert aiockpt.list_checkpoints(storage.root) == []
    storage.abort(shared)
    storage.abort(private)
    assert not shared.exists() and not private.exists()


def test_commit_never_writes_through_a_planted_manifest(
    storage: CheckpointStorage, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")

    async def plant_and_commit() -> None:
        temporary = await storage.begin(4)
        (temporary / MANIFEST_NAME).symlink_to(victim)
        await storage.commit(temporary, 4, _manifest(4, "data-r00000-c00000.bin", b""))

    with pytest.raises(FileExistsError):
        asyncio.run(plant_and_commit())
    assert victim.read_bytes() == b"precious"
    assert storage.list_committed() == []


def test_latest_is_replaced_never_written_through(
    storage: CheckpointStorage, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (storage.root / f"{LATEST_NAME}.tmp").symlink_to(victim)
    (storage.root / LATEST_NAME).symlink_to(victim)
    _save(storage, 2, b"abc")
    assert victim.read_bytes() == b"precious"
    assert not (storage.root / LATEST_NAME).is_symlink()
    assert storage.latest_name() == "step-2"
    assert not os.path.lexists(storage.root / f"{LATEST_NAME}.tmp")


def test_retention_hides_and_deletes_but_keeps_the_newest(storage: CheckpointStorage) -> None:
    for step in (1, 2, 3):
        _save(storage, step, bytes([step]) * 10)
    removed = storage.retain(1)
    assert sorted(p.name for p in removed) == ["step-1", "step-2"]
    assert [info.step for info in storage.list_committed()] == [3]
    assert storage.latest_name() == "step-3"
    storage.remove(storage.list_committed()[0].path)
    assert storage.list_committed() == []


def test_a_second_writer_is_refused_and_tools_see_the_first(storage: CheckpointStorage) -> None:
    rival = open_storage(storage.root, durable=True)
    with pytest.raises(DirectoryLockedError, match="another process"):
        rival.open()
    writer = rival.probe_writer()  # looking never takes the lock
    assert writer.live and writer.pid == os.getpid()
    storage.close()
    assert not rival.probe_writer().live
    rival.open()  # free once the first writer is gone
    rival.close()


def test_a_killed_writers_temporary_stays_invisible_and_the_next_one_cleans_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ckpt"
    writer = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from aiockpt.storage import open_storage

        async def main():
            storage = open_storage({str(root)!r}, durable=True)
            storage.open()
            temporary = await storage.begin(11)
            storage.write_chunk(temporary, "data-r00000-c00000.bin", memoryview(b"z" * 4096),
                                [(0, 4096)])
            (temporary / "manifest.json").write_bytes(b"{{")  # a commit cut short
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", writer], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1
    assert aiockpt.list_checkpoints(root) == []
    successor = open_storage(root, durable=True)
    successor.open()  # the lock died with its holder
    try:
        assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
        assert successor.list_committed() == []
    finally:
        successor.close()


# -- the commit path on the loop ----------------------------------------------------------
def test_a_commit_needs_no_writer_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one writer thread busy on the next checkpoint's data (a disk that stalls), the
    previous checkpoint still commits: its manifest, rename and ``latest`` are awaited
    through aiofiles on the loop, never queued behind bulk writes."""
    import aiockpt.storage.local as local_storage

    release = threading.Event()
    real_write = local_storage.write_pieces

    def stalling_write(path: str, *args: Any, **kwargs: Any) -> Any:
        if "/.tmp-step-1-" in path:
            time.sleep(0.5)  # step 2's write queues for the thread before step 1 commits
        if "/.tmp-step-2-" in path:
            release.wait(30)
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(local_storage, "write_pieces", stalling_write)
    # Room for both snapshots at once, so step 2 is admitted without waiting for step 1.
    config = aiockpt.Config(
        directory=tmp_path / "ckpt", num_threads=1, max_async=2, pinned_ratio=2.0
    )
    bag = Bag({"w": torch.arange(1000.0)})
    try:
        with aiockpt.SyncCheckpointer(config, bag=bag) as writer:
            first = writer.checkpoint(1)
            second = writer.checkpoint(2)
            info = first.wait(timeout=20)  # while step 2's write holds the only thread
            assert info is not None and info.step == 1
            assert not second.done()
            assert [i.step for i in aiockpt.list_checkpoints(config.directory)] == [1]
            release.set()
            second.wait(timeout=20)
    finally:
        release.set()
    assert [i.step for i in aiockpt.list_checkpoints(config.directory)] == [1, 2]
