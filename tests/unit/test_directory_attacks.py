"""A checkpoint directory under attack: planted files, hostile names, other processes.

Every name in a checkpoint directory may be something other than what aiockpt wrote:
a FIFO, a symlink (to /dev/zero, or to someone else's file), a directory, bytes that are
not UTF-8, a sparse file of 20 GiB. Readers must neither hang, nor exhaust memory, nor
follow a link, nor fail anything beyond the one checkpoint that is damaged; writers must
replace what is only a hint (``latest``) and refuse what they would otherwise write
through (the lock file). Every tool reaches the same verdict as ``load()``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Bag

import aiockpt
from aiockpt._format.manifest import MANIFEST_NAME
from aiockpt.cli.ls import list_directory
from aiockpt.cli.main import main
from aiockpt.errors import CheckpointError, ConfigError, CorruptCheckpointError
from aiockpt.storage.local import LATEST_NAME, LOCK_NAME, CheckpointStore, read_latest

REPO = Path(__file__).resolve().parents[2]


def _state(step: int) -> Bag:
    generator = torch.Generator().manual_seed(step)
    return Bag({"w": torch.randn(64, 64, generator=generator), "step": step})


def save(root: Path, steps: list[int], keep_last: int | None = None) -> None:
    config = aiockpt.Config(directory=root, keep_last=keep_last, num_threads=2)
    bag = Bag()
    with aiockpt.SyncCheckpointer(config, bag=bag) as writer:
        for step in steps:
            bag.state = _state(step).state
            writer.checkpoint(step).wait()


def restore(root: Path, keep_last: int | None = None) -> tuple[int | None, Bag]:
    bag = Bag()
    config = aiockpt.Config(directory=root, keep_last=keep_last, num_threads=2)
    with aiockpt.SyncCheckpointer(config, bag=bag) as reader:
        return reader.restore(), bag


def data_file(step_dir: Path) -> Path:
    return next(step_dir.glob("data-*.bin"))


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``'s result, failing the test if it blocks (a FIFO read blocks forever)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(call())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if errors:
        raise errors[0]
    return result[0]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    save(directory, [100, 200])
    return directory


# -- `latest`: a hint, replaced when bad, never followed or read without bound ----------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe step-200 \x80\n")


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("x")


def _huge(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(8 * 2**30)  # sparse: costs no disk, would cost 8 GiB of memory


def _names_missing(path: Path) -> None:
    path.write_text("step-999\n")


LATEST_ATTACKS = [_fifo, _dev_zero, _not_utf8, _directory, _huge, _names_missing]


@pytest.mark.parametrize("plant", LATEST_ATTACKS, ids=lambda f: f.__name__.lstrip("_"))
def test_a_planted_latest_neither_blocks_nor_fails_readers_and_writers(
    root: Path, plant: Callable[[Path], None]
) -> None:
    latest = root / LATEST_NAME
    if latest.is_dir():
        shutil.rmtree(latest)
    else:
        latest.unlink()
    plant(latest)
    report = within(20, lambda: list_directory(root))
    assert [row["step"] for row in report["checkpoints"]] == [100, 200]
    assert all(row["status"] == "unverified" for row in report["checkpoints"])
    assert report["latest"] in (None, "step-999")
    assert within(20, lambda: restore(root))[0] == 200
    # A writer's commit replaces the bad hint instead of failing on it, and every later
    # checkpoint's handle succeeds.
    within(60, lambda: save(root, [300, 400]))
    assert latest.is_file() and not latest.is_symlink()
    assert latest.read_text() == "step-400\n"
    assert read_latest(root) == "step-400"


def test_a_stray_latest_tmp_is_never_written_through(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (root / f"{LATEST_NAME}.tmp").symlink_to(victim)
    store = CheckpointStore(root, durable=True)
    store.point_latest("step-100", force=True)
    assert victim.read_text() == "precious"
    assert read_latest(root) == "step-100"


# -- the lock file: never followed, truncated or written through ------------------------------


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(
    root: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    (root / LOCK_NAME).unlink()
    (root / LOCK_NAME).symlink_to(victim)
    with pytest.raises(CheckpointError, match=r"symbolic link.*remove it"):
        aiockpt.SyncCheckpointer(aiockpt.Config(directory=root), bag=Bag())
    assert victim.read_text() == "precious data"
    # Probes do not follow it either, and see no live writer.
    assert within(20, lambda: list_directory(root))["writer"]["live"] is False


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_lock_file_that_is_not_a_file_is_a_clear_error(root: Path, kind: str) -> None:
    (root / LOCK_NAME).unlink()
    if kind == "fifo":
        os.mkfifo(root / LOCK_NAME)
    else:
        (root / LOCK_NAME).mkdir()
    with pytest.raises(CheckpointError, match="not aiockpt's lock file"):
        within(20, lambda: aiockpt.SyncCheckpointer(aiockpt.Config(directory=root), bag=Bag()))
    assert within(20, lambda: list_directory(root))["writer"]["live"] is False


# -- errors reading one checkpoint are that checkpoint's corruption: restore falls back -------


def test_a_manifest_symlink_loop_is_corruption_and_restore_falls_back(root: Path) -> None:
    manifest = root / "step-200" / MANIFEST_NAME
    manifest.unlink()
    manifest.symlink_to(manifest.name)  # a link to itself: ELOOP
    step, bag = restore(root)
    assert step == 100 and bag.state["step"] == 100
    with pytest.raises(CorruptCheckpointError):
        aiockpt.load(root / "step-200")
    rows = list_directory(root)["checkpoints"]
    assert [(r["step"], r["status"]) for r in rows] == [(100, "unverified"), (200, "corrupt")]


def test_a_data_file_symlink_loop_is_corruption_and_restore_falls_back(root: Path) -> None:
    data = data_file(root / "step-200")
    data.unlink()
    data.symlink_to(data.name)
    assert restore(root)[0] == 100
    with pytest.raises(CorruptCheckpointError):
        aiockpt.load(root / "step-200")


_UNPRIVILEGED_RESTORE = textwrap.dedent(
    """
    import ctypes, sys
    # Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: even root then obeys a directory's
    # permission bits, so a chmod 000 step directory really is unreadable.
    libc = ctypes.CDLL(None, use_errno=True)
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    header, data = Header(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0
    mask = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF
    data[0].effective &= mask
    data[0].permitted &= mask
    assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
    try:
        open(sys.argv[2] + "/manifest.json").close()
        print("STILL-READABLE")
        sys.exit(0)
    except PermissionError:
        pass
    import aiockpt
    from conftest import Bag
    bag = Bag()
    config = aiockpt.Config(directory=sys.argv[1], keep_last=None)
    with aiockpt.SyncCheckpointer(config, bag=bag) as ckpt:
        print("RESTORED", ckpt.restore(), bag.state["step"])
    try:
        aiockpt.load(sys.argv[2])
    except aiockpt.CorruptCheckpointError as exc:
        print("LOAD-CORRUPT", exc)
    """
)


def test_an_unreadable_newest_step_directory_is_corruption_and_restore_falls_back(
    root: Path,
) -> None:
    newest = root / "step-200"
    newest.chmod(0o000)
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        result = subprocess.run(
            [sys.executable, "-c", _UNPRIVILEGED_RESTORE, str(root), str(newest)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
    finally:
        newest.chmod(0o755)
    if "STILL-READABLE" in result.stdout:
        pytest.skip("this process cannot give up its permission override")
    assert result.returncode == 0, result.stderr
    assert "RESTORED 100 100" in result.stdout
    assert "LOAD-CORRUPT" in result.stdout and "Permission denied" in result.stdout


# -- sizes are checked before anything is read -----------------------------------------------


def test_a_sparse_20_gib_file_in_place_of_a_data_file_is_never_streamed(root: Path) -> None:
    data = data_file(root / "step-200")
    listed = data.stat().st_size
    os.truncate(data, 20 * 2**30)
    from aiockpt.cli.verify import verify_checkpoints

    started = time.perf_counter()
    (verdict,) = verify_checkpoints([root / "step-200"], threads=2)
    assert time.perf_counter() - started < 10
    assert verdict.status == "corrupt"
    assert verdict.bytes_read <= listed  # never more than the manifest lists
    assert any(str(20 * 2**30) in p.message for p in verdict.problems)
    with pytest.raises(CorruptCheckpointError, match="the manifest says"):
        aiockpt.load(root / "step-200")
    assert restore(root)[0] == 100


# -- one validator: every tool agrees with load() -------------------------------------------


def _reseal(step_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit a manifest and give it a matching manifest_crc32c again (a forger's move)."""
    import crc32c

    path = step_dir / MANIFEST_NAME
    doc = json.loads(path.read_bytes())
    doc.pop("manifest_crc32c")
    edit(doc)
    doc["manifest_crc32c"] = crc32c.crc32c(json.dumps(doc, separators=(",", ":")).encode())
    path.write_bytes(json.dumps(doc, separators=(",", ":")).encode())


def _overlapping_pieces(step_dir: Path) -> None:
    def edit(doc: dict[str, Any]) -> None:
        # A second tensor entry whose bytes are the first one's: restore must refuse
        # pieces that overlap, whatever their checksums say.
        first = doc["tensors"][0]
        doc["tensors"].append({**first, "name": first["name"] + ".alias"})
        doc["files"][0]["nbytes"] += 0

    _reseal(step_dir, edit)


def _claims_more_bytes(step_dir: Path) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["files"][0]["nbytes"] += 4096

    _reseal(step_dir, edit)


def _step_mismatch(step_dir: Path) -> None:
    _reseal(step_dir, lambda doc: doc.update(step=150))


def _data_symlink_outside(step_dir: Path) -> None:
    data = data_file(step_dir)
    outside = step_dir.parent.parent / "outside.bin"
    shutil.move(data, outside)
    data.symlink_to(outside)


def _data_fifo(step_dir: Path) -> None:
    data = data_file(step_dir)
    data.unlink()
    os.mkfifo(data)


def _truncated(step_dir: Path) -> None:
    data = data_file(step_dir)
    os.truncate(data, data.stat().st_size // 2)


def _sparse_extended(step_dir: Path) -> None:
    data = data_file(step_dir)
    os.truncate(data, data.stat().st_size + 2**30)


def _flipped_byte(step_dir: Path) -> None:
    data = data_file(step_dir)
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x40
    data.write_bytes(bytes(raw))


def _manifest_loop(step_dir: Path) -> None:
    (step_dir / MANIFEST_NAME).unlink()
    (step_dir / MANIFEST_NAME).symlink_to(MANIFEST_NAME)


def _untouched(step_dir: Path) -> None:
    pass


# (mutation, whether the damage lies in tensor bytes only, seen only by reading them)
FORGERIES = [
    (_untouched, False),
    (_overlapping_pieces, False),
    (_claims_more_bytes, False),
    (_step_mismatch, False),
    (_data_symlink_outside, False),
    (_data_fifo, False),
    (_truncated, False),
    (_sparse_extended, False),
    (_manifest_loop, False),
    (_flipped_byte, True),
]


def _accepts(call: Callable[[], Any]) -> bool:
    try:
        within(60, call)
    except aiockpt.AiockptError:
        return False
    return True


def _cli_accepts(capsys: pytest.CaptureFixture[str], *argv: object) -> bool:
    code = within(60, lambda: main([str(a) for a in argv]))
    capsys.readouterr()
    return code == 0


@pytest.mark.parametrize(
    ("forge", "bytes_only"), FORGERIES, ids=[f.__name__.lstrip("_") for f, _ in FORGERIES]
)
def test_every_tool_reaches_the_verdict_of_load(
    root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forge: Callable[[Path], None],
    bytes_only: bool,
) -> None:
    from aiockpt.cli.inspect import describe
    from aiockpt.cli.ls import list_directory
    from aiockpt.cli.prune import prune

    target = root / "step-200"
    forge(target)
    loads = _accepts(lambda: aiockpt.load(target))
    assert loads == (forge is _untouched)
    verdicts = {
        "verify": _cli_accepts(capsys, "verify", "--json", target),
        "ls --verify": _cli_accepts(capsys, "ls", "--verify", "--json", root),
        "export": _cli_accepts(capsys, "export", target, "--to", "torch", tmp_path / "out.pt"),
        "restore": within(60, lambda: restore(root))[0] == 200,
    }
    if not bytes_only:
        rows = list_directory(root)["checkpoints"]
        verdicts["ls"] = rows[-1]["status"] != "corrupt"
        verdicts["inspect"] = _accepts(lambda: describe(target))
    for tool, accepts in verdicts.items():
        assert accepts == loads, f"{tool} {'accepts' if accepts else 'refuses'}, load does not"
    # prune keeps the checkpoint a restart needs: this one if load accepts it, else step 100.
    report = within(60, lambda: prune(root, keep_last=0))
    kept = [row["step"] for row in report["checkpoints"] if row["action"] == "keep"]
    assert kept == ([200] if loads else [100])
    assert read_latest(root) == f"step-{kept[0]}"


# -- a read-only probe never makes a writer fail ----------------------------------------------

_PROBE_LOOP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from aiockpt.cli.scan import probe_writer
    from aiockpt.cli.ls import list_directory
    root = Path(sys.argv[1])
    print("probing", flush=True)
    end = time.monotonic() + float(sys.argv[2])
    probes = 0
    while time.monotonic() < end:
        probe_writer(root)
        probes += 1
        if probes % 50 == 0:
            list_directory(root)  # what `aiockpt ls` does
    print(probes, flush=True)
    """
)


def test_a_looping_probe_never_makes_a_writer_open_fail(tmp_path: Path) -> None:
    # Without the writer's retry about 1 open in 300 collides with a probe's shared lock.
    root = tmp_path / "ckpt"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = subprocess.Popen(
        [sys.executable, "-c", _PROBE_LOOP, str(root), "120"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert probe.stdout is not None and probe.stdout.readline().strip() == "probing"
        failures = []
        for _ in range(1500):
            store = CheckpointStore(root, durable=False)
            try:
                store.open()
            except aiockpt.AiockptError as exc:
                failures.append(str(exc))
            finally:
                store.close()
        assert probe.poll() is None, "the probe stopped before the writers were done"
    finally:
        probe.send_signal(signal.SIGKILL)
        probe.wait()
    assert failures == []


def test_a_live_writer_still_keeps_the_directory(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    first = CheckpointStore(root, durable=False)
    first.open()
    try:
        with pytest.raises(aiockpt.DirectoryLockedError, match=f"pid {os.getpid()}"):
            CheckpointStore(root, durable=False).open()
    finally:
        first.close()


# -- paths -----------------------------------------------------------------------------------


def test_a_directory_path_through_a_regular_file_is_a_config_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("not a directory")
    for directory in (plain / "ckpt", plain):
        with pytest.raises(ConfigError, match=r"plain\.txt"):
            aiockpt.SyncCheckpointer(aiockpt.Config(directory=directory), bag=Bag())


@pytest.mark.parametrize("command", ["verify", "ls", "inspect", "prune"])
def test_a_file_given_for_a_checkpoint_directory_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    state = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, state)
    argv = [command, str(state)] + (["--keep-last", "1"] if command == "prune" else [])
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "is a file, not a checkpoint directory" in err
    assert "aiockpt import" in err
    with pytest.raises(aiockpt.NoCheckpointError, match="aiockpt import"):
        aiockpt.load(state)
