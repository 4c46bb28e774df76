"""Errors at the command line and in the library functions behind it.

Every command runs in a real subprocess, once with a usage error (exit 2: the command as
typed cannot run) and once with a failure (exit 1: it ran, and the checkpoint, the disk or
the source failed). Either way stderr holds one error line (and a hint), never a
traceback, and stdout holds nothing. The library functions raise aiockpt's own errors and
print nothing; ``load()`` and ``restore()`` refuse a missing name with the same error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import aiockpt
from aiockpt.cli.convert import export_checkpoint, import_checkpoint
from aiockpt.cli.main import main
from aiockpt.cli.prune import prune
from aiockpt.cli.scan import committed_checkpoints, resolve_checkpoint
from aiockpt.errors import (
    AiockptError,
    CorruptCheckpointError,
    DirectoryLockedError,
    MissingStateError,
    NoCheckpointError,
    RestoreError,
    UsageError,
)
from tests.conftest import MixedModel, make_config

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Dirs:
    """Made once per module: what the commands are pointed at."""

    good: Path  # committed steps 1 and 2
    corrupt: Path  # the same, step 2 with a flipped byte in its data
    lockable: Path  # a copy of good that a test may hold the writer lock of
    junk: Path  # a file that no format can read
    plain_file: Path  # a regular file where a directory is expected
    existing_out: Path  # an output file that exists already


def _flip_first_data_byte(checkpoint: Path) -> None:
    data = sorted(checkpoint.glob("data-*.bin"))[0]
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Dirs:
    root = tmp_path_factory.mktemp("exit-codes")
    config = make_config(root, directory=root / "good", keep_last=None, num_threads=2)
    with aiockpt.SyncCheckpointer(config, model=MixedModel()) as writer:
        writer.checkpoint(1).wait()
        writer.checkpoint(2).wait()
    corrupt = Path(shutil.copytree(root / "good", root / "corrupt"))
    _flip_first_data_byte(corrupt / "step-2")
    shutil.copytree(root / "good", root / "lockable")
    (root / "junk.pt").write_bytes(b"\x00not a checkpoint of any format\xff" * 64)
    (root / "plain").write_text("a file, not a directory\n")
    (root / "out.pt").write_bytes(b"already here")
    return Dirs(
        good=root / "good",
        corrupt=corrupt,
        lockable=root / "lockable",
        junk=root / "junk.pt",
        plain_file=root / "plain",
        existing_out=root / "out.pt",
    )


@dataclass(frozen=True)
class Case:
    command: str
    argv: Callable[[Dirs], list[object]]
    code: int
    says: str  # in the error line
    locked: bool = False  # run while this process holds dirs.lockable's writer lock


_TINY = ["--preset", "tiny", "--max-seconds", "5"]
CASES = [
    # usage: a path argument that does not exist, or is the wrong kind of thing
    Case("ls", lambda d: ["ls", d.good / "missing"], 2, "no such directory"),
    Case("inspect", lambda d: ["inspect", d.plain_file], 2, "is a file"),
    Case("verify", lambda d: ["verify", d.good / "missing"], 2, "no such file"),
    Case(
        "import",
        lambda d: ["import", d.good / "nope.pt", "--from", "torch", "--step", 3, d.good],
        2,
        "no such file",
    ),
    # usage: an option that cannot work
    Case(
        "export", lambda d: ["export", d.good, "--to", "torch", d.existing_out], 2, "already exists"
    ),
    Case(
        "prune", lambda d: ["prune", d.good, "--keep-last", 1, "--keep-every", 0], 2, "--keep-every"
    ),
    Case(
        "diagnose",
        lambda d: ["diagnose", "--directory", d.good.parent / "diag"],
        2,
        "nothing to diagnose",
    ),
    Case(
        "bench",
        lambda d: ["bench", *_TINY[:2], "--systems", "bogus", "--directory", d.good.parent / "b"],
        2,
        "unknown",
    ),
    # failures: corrupt, not found, locked, unreadable, I/O
    Case("ls", lambda d: ["ls", d.corrupt, "--verify"], 1, ""),
    Case(
        "inspect",
        lambda d: ["inspect", d.good, "--step", 7],
        1,
        "no committed checkpoint of step 7",
    ),
    Case("verify", lambda d: ["verify", d.corrupt], 1, ""),
    Case(
        "export",
        lambda d: ["export", d.corrupt, "--to", "torch", d.good.parent / "x.pt"],
        1,
        "step-2",
    ),
    Case(
        "import",
        lambda d: ["import", d.junk, "--from", "torch", "--step", 3, d.good.parent / "imported"],
        1,
        "junk.pt",
    ),
    Case(
        "prune", lambda d: ["prune", d.lockable, "--keep-last", 1], 1, "being written", locked=True
    ),
    Case("diagnose", lambda d: ["diagnose", *_TINY, "--directory", d.plain_file], 1, "File exists"),
    Case(
        "bench",
        lambda d: ["bench", *_TINY[:2], "--steps", 1, "--rounds", 1, "--directory", d.plain_file],
        1,
        "File exists",
    ),
]


@pytest.fixture
def writer_lock(dirs: Dirs) -> Iterator[None]:
    """A live writer of dirs.lockable: this process, holding the directory's lock."""
    config = make_config(dirs.lockable, directory=dirs.lockable, keep_last=None)
    with aiockpt.SyncCheckpointer(config, model=MixedModel()):
        yield


def _aiockpt(*argv: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOCKPT_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "aiockpt", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=240,
    )


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c.command}-{'usage' if c.code == 2 else 'failure'}" for c in CASES]
)
def test_every_command_exits_2_on_bad_usage_and_1_on_failure(
    case: Case, dirs: Dirs, request: pytest.FixtureRequest
) -> None:
    if case.locked:
        request.getfixturevalue("writer_lock")
    done = _aiockpt(*case.argv(dirs))
    assert done.returncode == case.code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    if case.code == 1 and case.command in ("ls", "verify"):
        # A corrupt checkpoint found is the report itself, on stdout, not an error.
        assert "corrupt" in done.stdout.lower(), done.stdout
        return
    assert done.stdout == "", done.stdout
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"aiockpt {case.command}: error: "), done.stderr
    assert case.says in errors[0], done.stderr
    hint = done.stderr.splitlines()[-1]
    assert hint.startswith("  hint: ") or case.command == "bench", done.stderr


@pytest.mark.parametrize(
    "command", ["ls", "inspect", "verify", "export", "import", "prune", "diagnose", "bench"]
)
def test_an_unknown_flag_is_bad_usage_for_every_command(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--no-such-flag"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: aiockpt") and ": error: " in err and "Traceback" not in err


def test_a_bad_log_level_is_bad_usage(dirs: Dirs, capsys: pytest.CaptureFixture[str]) -> None:
    os.environ["AIOCKPT_LOG_LEVEL"] = "LOUD"
    try:
        assert main(["ls", str(dirs.good)]) == 2
    finally:
        del os.environ["AIOCKPT_LOG_LEVEL"]
    out, err = capsys.readouterr()
    assert out == "" and "AIOCKPT_LOG_LEVEL='LOUD' is not a log level" in err and "hint:" in err


# -- the library functions behind the commands --------------------------------------------------


def test_library_functions_raise_aiockpt_errors_and_print_nothing(
    dirs: Dirs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert resolve_checkpoint(dirs.good) == dirs.good / "step-2"
    with pytest.raises(UsageError, match="no such file or directory") as missing:
        resolve_checkpoint(tmp_path / "missing")
    assert missing.value.hint
    with pytest.raises(UsageError, match="is a file"):
        committed_checkpoints(dirs.plain_file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoCheckpointError, match="holds no committed"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(NoCheckpointError, match="step 7") as absent:
        resolve_checkpoint(dirs.good, step=7)
    assert "[1, 2]" in (absent.value.hint or "")
    with pytest.raises(UsageError, match="--keep-last"):
        prune(dirs.good, keep_last=-1)
    with pytest.raises(UsageError, match="already exists"):
        export_checkpoint(dirs.good / "step-1", "torch", dirs.existing_out)
    with pytest.raises(UsageError, match="no top-level key 'nope'"):
        export_checkpoint(dirs.good / "step-1", "torch", tmp_path / "o.pt", keys=["nope"])
    with pytest.raises(CorruptCheckpointError):
        export_checkpoint(dirs.corrupt / "step-2", "torch", tmp_path / "o.pt")
    with pytest.raises(UsageError, match="unknown format"):
        import_checkpoint(dirs.junk, "pickle", 1, tmp_path / "ckpt")
    assert capsys.readouterr() == ("", "")  # said nothing: the command line does the talking
    assert not (tmp_path / "o.pt").exists()


def test_prune_beside_a_live_writer_raises_directory_locked(dirs: Dirs, writer_lock: None) -> None:
    with pytest.raises(DirectoryLockedError, match="being written") as locked:
        prune(dirs.lockable, keep_last=1)
    assert "--force" in (locked.value.hint or "")
    assert [i.step for i in aiockpt.list_checkpoints(dirs.lockable)] == [1, 2]


def test_load_and_restore_refuse_a_missing_name_with_the_same_error(
    dirs: Dirs, tmp_path: Path
) -> None:
    with pytest.raises(MissingStateError) as loading:
        aiockpt.load(dirs.good / "step-2", keys=["model", "optimizer"])
    config = make_config(tmp_path, directory=Path(shutil.copytree(dirs.good, tmp_path / "c")))
    with (
        aiockpt.SyncCheckpointer(config, model=MixedModel(), optimizer=MixedModel()) as ckpt,
        pytest.raises(MissingStateError) as restoring,
    ):
        ckpt.restore(step=2)
    for error in (loading.value, restoring.value):
        # One type for both, catchable as either of what each raised before.
        assert isinstance(error, RestoreError) and isinstance(error, KeyError)
        assert isinstance(error, AiockptError)
        message = str(error)  # a sentence, not a KeyError's quoted key
        assert not message.startswith("'") and "'optimizer'" in message
        assert "it holds ['model']" in message
