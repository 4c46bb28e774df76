"""A process that checkpoints is SIGKILLed at a random instant; the next one must resume.

Each kill is real: a child process (tests/crash/crash_child.py) checkpoints step 1, 2, 3, ...
of a state whose every tensor encodes its step, and records each committed step in a
progress file; the test kills it with SIGKILL after a seeded random delay (or the moment a
retention is seen under way), then opens the directory with a new Checkpointer and checks
what the promise says: the lock is taken, no temporaries are left, restore() returns a
step no older than the newest one the child saw committed, every value is exactly that
step's (nothing torn), and every committed directory verifies its checksums.

Seeds: CRASH_TEST_SEED=N reruns with seeds N, N+1, ...; every failure message names its
seed and delay, and the delays come from random.Random(seed).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import aiockpt

CHILD = Path(__file__).with_name("crash_child.py")
BASE_SEED = int(os.environ.get("CRASH_TEST_SEED", "20240607"))
KILLS = 12
RETENTION_KILLS = 6
TEMPORARY = (".tmp-", ".trash-")
STARTUP_TIMEOUT = 90.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, flock")


def _import_child() -> object:
    spec = importlib.util.spec_from_file_location("crash_child", CHILD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


crash_child = _import_child()
ForkServer = crash_child.ForkServer  # type: ignore[attr-defined]


# -- child processes -----------------------------------------------------------------------
@dataclass
class Child:
    """A running crash_child: a forked one (``server``) or a plain subprocess (``proc``)."""

    pid: int
    log: Path
    server: ForkServer | None = None
    proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")  # not a zombie

    def sigkill(self) -> int:
        """SIGKILL it now and wait until it is gone; its exit code."""
        with contextlib.suppress(ProcessLookupError):  # already reaped: it died on its own
            os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            return self.proc.wait(timeout=30)
        assert self.server is not None
        return int(self.server.ask(f"reap {self.pid}"))

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""


def spawn(server: ForkServer | None, run_dir: Path, seed: int, *extra: str) -> Child:
    args = [str(run_dir / "ckpt"), str(seed), *extra]
    log = run_dir / "child.log"
    if server is not None:
        args += ["--progress", str(run_dir / "progress")]
        pid = int(server.ask("spawn " + json.dumps({"argv": args, "log": str(log)})))
        return Child(pid, log, server=server)
    with log.open("wb") as out:  # the progress file defaults to DIR/../progress
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args], stdout=out, stderr=subprocess.STDOUT
        )
    return Child(proc.pid, log, proc=proc)


def committed_steps(progress: Path) -> list[int]:
    """Steps the child recorded as committed (whole lines only)."""
    try:
        text = progress.read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split("\n")[:-1] if line]


def wait_for_first_commit(child: Child, progress: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not committed_steps(progress):
        assert child.alive(), f"child exited before its first commit:\n{child.output()}"
        assert time.monotonic() < deadline, f"no commit in {STARTUP_TIMEOUT} s:\n{child.output()}"
        time.sleep(0.005)


def temporaries(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(TEMPORARY))


@dataclass
class Kill:
    """What one kill left behind, as seen by the parent."""

    seed: int
    directory: Path
    recorded: list[int]
    left_at_kill: list[str] = field(default_factory=list)
    how: str = ""

    def __str__(self) -> str:
        newest = self.recorded[-1] if self.recorded else None
        return (
            f"seed={self.seed} ({self.how}); newest recorded commit {newest}; "
            f"temporaries at the kill: {self.left_at_kill}; dir {self.directory}"
        )


def kill_child(
    server: ForkServer | None,
    run_dir: Path,
    seed: int,
    trigger: Callable[[Child, Path], str],
    *extra: str,
) -> Kill:
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = run_dir / "progress"
    child = spawn(server, run_dir, seed, *extra)
    try:
        wait_for_first_commit(child, progress)
        how = trigger(child, run_dir / "ckpt")
        assert child.alive(), f"seed={seed}: child died on its own:\n{child.output()}"
    finally:
        code = child.sigkill()
    # The child is gone: nothing it recorded can change any more.
    kill = Kill(seed, run_dir / "ckpt", committed_steps(progress), how=how)
    kill.left_at_kill = temporaries(kill.directory)
    print(kill)
    assert code == -signal.SIGKILL, f"{kill}: exit code {code}\n{child.output()}"
    return kill


def after_random_delay(seed: int) -> Callable[[Child, Path], str]:
    delay = random.Random(seed).uniform(0.05, 1.5)

    def trigger(child: Child, directory: Path) -> str:
        time.sleep(delay)
        return f"killed {delay:.3f} s after the first commit"

    return trigger


def during_retention(seed: int) -> Callable[[Child, Path], str]:
    """After a seeded delay, kill the moment a checkpoint is being deleted (``.trash-``)."""
    delay = random.Random(seed).uniform(0.0, 0.6)

    def trigger(child: Child, directory: Path) -> str:
        time.sleep(delay)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and child.alive():
            for entry in os.scandir(directory):
                if entry.name.startswith(".trash-"):
                    return f"waited {delay:.3f} s, then killed on seeing {entry.name}"
        return f"waited {delay:.3f} s, saw no retention in 20 s; killed anyway"

    return trigger


# -- what the next process must find -----------------------------------------------------------
def check_recovery(kill: Kill, keep_last: int) -> int:
    """Open, restore and verify as a restarted training job would; the restored step."""
    seed, directory = kill.seed, kill.directory
    state = crash_child.CrashState(seed)
    state.poison()
    config = aiockpt.Config(
        directory=directory, chunk_size_mb=0.25, max_async=2, keep_last=keep_last, num_threads=4
    )

    async def resume() -> int:
        async with aiockpt.Checkpointer(config, state=state) as ckpt:
            # The dead child's flock went with it; opening took the lock and cleaned up.
            holder = (directory / ".aiockpt.lock").read_text().strip()
            assert holder == str(os.getpid()), f"{kill}: lock file names pid {holder}"
            assert temporaries(directory) == [], f"{kill}: temporaries left after open"

            restored = await ckpt.restore()
            assert restored is not None, f"{kill}: restore() found nothing"
            if kill.recorded:
                assert restored >= kill.recorded[-1], f"{kill}: restored older step {restored}"
            problems = crash_child.mismatches(state.state_dict(), restored, seed)
            assert not problems, f"{kill}: restored step {restored} is torn: {problems}"

            committed = aiockpt.list_checkpoints(directory)
            steps = [info.step for info in committed]
            assert steps[-1] == restored, f"{kill}: restore() chose {restored} of {steps}"
            # Retention runs right after each commit, so one extra at most survives a kill.
            assert len(steps) <= keep_last + 1, f"{kill}: committed {steps}"
            for info in committed:
                loaded = aiockpt.load(info.path)  # verifies every crc32c
                problems = crash_child.mismatches(loaded["state"], info.step, seed)
                assert not problems, f"{kill}: {info.path.name} is torn: {problems}"
            latest = directory / "latest"
            if latest.exists():
                name = latest.read_text().strip()
                assert name in {info.path.name for info in committed}, f"{kill}: latest={name}"

            # Training goes on from there: the next checkpoint commits normally.
            state.set_step(restored + 1)
            info = await (await ckpt.checkpoint(restored + 1))
            assert info is not None and info.step == restored + 1
        return restored

    restored = asyncio.run(resume())
    newest = aiockpt.list_checkpoints(directory)[-1]
    assert newest.step == restored + 1, f"{kill}: newest after resuming is {newest}"
    problems = crash_child.mismatches(aiockpt.load(newest.path)["state"], newest.step, seed)
    assert not problems, f"{kill}: checkpoint written after the restart is wrong: {problems}"
    assert temporaries(directory) == []
    return restored


# -- tests --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fork_server() -> Iterator[ForkServer]:
    server = ForkServer(CHILD)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [BASE_SEED + i for i in range(KILLS)])
def test_sigkill_at_random_instant(fork_server: ForkServer, tmp_path: Path, seed: int) -> None:
    kill = kill_child(fork_server, tmp_path, seed, after_random_delay(seed))
    check_recovery(kill, keep_last=3)


@pytest.mark.slow
def test_sigkill_during_retention(fork_server: ForkServer, tmp_path: Path) -> None:
    """keep_last=1: every commit deletes the previous checkpoint; kill while it does."""
    interrupted = []
    for i in range(RETENTION_KILLS):
        seed = BASE_SEED + 1000 + i
        run_dir = tmp_path / f"kill-{i}"
        trigger = during_retention(seed)
        kill = kill_child(fork_server, run_dir, seed, trigger, "--keep-last", "1")
        trash = [name for name in kill.left_at_kill if name.startswith(".trash-")]
        if trash:
            left = len(os.listdir(kill.directory / trash[0]))
            print(f"  {trash[0]} still held {left} files")
            interrupted.append(seed)
        check_recovery(kill, keep_last=1)
    print(f"retention interrupted mid-way in {len(interrupted)}/{RETENTION_KILLS}: {interrupted}")
    assert interrupted, "no kill landed while a checkpoint was being deleted"


def test_sigkill_plain_child_process(tmp_path: Path) -> None:
    """The script as documented: ``python tests/crash/crash_child.py DIR SEED``, no fork server."""
    seed = BASE_SEED + 2000
    kill = kill_child(None, tmp_path, seed, after_random_delay(seed))
    check_recovery(kill, keep_last=3)
