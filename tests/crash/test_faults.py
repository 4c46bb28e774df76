"""Faults at the OS-call boundary: kills anywhere, EIO, and a slow disk.

- Kill anywhere: a short run of tests/crash/kill_harness.py (real child processes, real SIGKILL
  at a chosen point of every phase); the full 200-kill run is the script's own CLI.
- EIO: ``os.pwrite``/``os.write``/``os.fsync``/``os.open``/``os.rename``/``os.preadv`` are
  wrapped *in this process* so the N-th call on one kind of checkpoint file fails with
  ``OSError(EIO)``, as a failing disk would make it. Nothing else is mocked: the library
  runs as usual and meets the error where the kernel would have given it.
- A slow disk: ``os.pwrite`` sleeps before each checkpoint write, so requests arrive faster
  than they drain, and the backpressure policy has to hold memory bounded.

Seeds: KILL_TEST_SEED=N reruns the short kill run with seed N (default fixed).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from aiofiles.threadpool.binary import AsyncFileIO

import aiockpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kill_harness

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

KILL_SEED = int(os.environ.get("KILL_TEST_SEED", "5"))
CI_KILLS = 18  # three per phase
TEMPORARY = (".tmp-", ".trash-")
MIB = 2**20


# -- kill anywhere (short form) ----------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_every_phase(tmp_path: Path) -> None:
    """Three kills in each phase, each at a point drawn from the seed; all must recover."""
    lines: list[str] = []
    report = kill_harness.harness(
        kills=CI_KILLS, seed=KILL_SEED, workdir=tmp_path, echo=lines.append
    )
    print("\n".join(lines))
    failures = "\n".join(str(f) for f in report["failures"])
    assert report["survived"] == report["kills"] == CI_KILLS, failures
    assert all(row["landed"] == 3 for row in report["phases"].values()), report["phases"]
    assert set(report["phases"]) == set(kill_harness.PHASES)


def test_the_harness_catches_a_broken_commit(tmp_path: Path) -> None:
    """Control: a child whose commit makes a checkpoint visible before its manifest is
    written, killed half-way through that manifest, must be reported as a failure."""
    plan = kill_harness.Plan(
        index=0,
        seed=7,
        phase="commit",
        point="torn-manifest",
        count=2,
        arm_after=1,
        keep_last=3,
        max_async=1,
        chunk_mb=3.0,
        sabotage="visible-early",
    )
    with kill_harness.fork_server() as server:
        outcome = kill_harness.run_kill(server, tmp_path, plan)
    print(outcome)
    assert outcome.landed, outcome
    assert not outcome.survived
    assert any("does not load" in p for p in outcome.problems), outcome.problems


# -- EIO at the OS-call boundary ----------------------------------------------------------
def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


TARGETS: dict[str, Callable[[str, Path], bool]] = {
    "data": lambda p, root: bool(re.search(r"/\.tmp-step-\d+-\w+/data-r\d+-c\d+\.bin$", p)),
    "manifest": lambda p, root: p.endswith("/manifest.json") and "/.tmp-step-" in p,
    "checkpoint-dir": lambda p, root: os.path.basename(p).startswith(".tmp-step-"),
    "parent-dir": lambda p, root: p == str(root),
    "committed-data": lambda p, root: bool(re.search(r"/step-2/data-r\d+-c\d+\.bin$", p)),
    "retention": lambda p, root: os.path.basename(p) == "step-1",
}


class Faults:
    """Make the N-th matching call of ``os.<name>`` fail with OSError(errno)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.monkeypatch = monkeypatch
        self.root = Path(os.path.realpath(root))
        self.armed = False
        self.raised: list[OSError] = []

    def fail(self, name: str, target: str, *, nth: int = 1, code: int = errno.EIO) -> None:
        real = getattr(os, name)
        matches = TARGETS[target]
        seen = [0]

        def check(path: str) -> None:
            if self.armed and matches(path, self.root):
                seen[0] += 1
                if seen[0] == nth:
                    error = OSError(code, os.strerror(code), path)
                    self.raised.append(error)
                    raise error

        def wrapper(first: Any, *args: Any, **kwargs: Any) -> Any:
            check(fd_path(first) if isinstance(first, int) else os.fspath(first))
            return real(first, *args, **kwargs)

        self.monkeypatch.setattr(os, name, wrapper)
        if name == "write":
            # The commit writes the manifest through aiofiles.open: io.FileIO.write, which
            # never calls os.write, fails where the disk says so.
            file_write = AsyncFileIO.write

            async def failing_file_write(file: Any, data: Any) -> Any:
                check(fd_path(file.fileno()))
                return await file_write(file, data)

            self.monkeypatch.setattr(AsyncFileIO, "write", failing_file_write)


def values(step: int) -> dict[str, torch.Tensor]:
    return {
        "a": torch.arange(300_000, dtype=torch.float32) + step,
        "b": torch.full((1000, 7), step, dtype=torch.int64),
    }


class Model:
    """A Stateful of about 1.3 MiB whose values say the step."""

    def __init__(self, step: int = 0) -> None:
        self.set(step)

    def set(self, step: int) -> None:
        self.step = step
        self.tensors = values(step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tensors": dict(self.tensors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.tensors = dict(state["tensors"])


def config(directory: Path, **overrides: Any) -> aiockpt.Config:
    base: dict[str, Any] = dict(directory=directory, chunk_size_mb=0.25, num_threads=4)
    return aiockpt.Config(**{**base, "keep_last": 3, **overrides})


def leftovers(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(TEMPORARY) or n == "latest.tmp"]


def assert_committed(directory: Path, steps: list[int]) -> None:
    """Exactly ``steps`` are committed, each verifies and holds its own values."""
    committed = aiockpt.list_checkpoints(directory)
    assert [info.step for info in committed] == steps
    for info in committed:
        state = aiockpt.load(info.path)["model"]
        assert state["step"] == info.step
        for name, want in values(info.step).items():
            assert torch.equal(state["tensors"][name], want), f"{info.path}: {name}"


def assert_eio(error: BaseException, step: int) -> None:
    assert isinstance(error, aiockpt.BackgroundError), repr(error)
    assert f"step {step}" in str(error)
    cause = error.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.EIO, repr(cause)


# (os call, which file, which matching call fails)
WRITE_PATH_FAULTS = [
    ("open", "data", 3),
    ("pwrite", "data", 2),
    ("fsync", "data", 4),
    ("write", "manifest", 1),
    ("fsync", "manifest", 1),
    ("fsync", "checkpoint-dir", 1),
    ("fsync", "parent-dir", 1),  # after the rename into place: must be taken back out
]


@pytest.mark.parametrize(("call", "target", "nth"), WRITE_PATH_FAULTS)
def test_eio_on_the_write_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, target: str, nth: int
) -> None:
    directory = tmp_path / "ckpt"
    faults = Faults(monkeypatch, directory)
    faults.fail(call, target, nth=nth)
    model = Model()

    async def main() -> None:
        async with aiockpt.Checkpointer(config(directory), model=model) as ckpt:
            model.set(1)
            await (await ckpt.checkpoint(1))
            faults.armed = True
            model.set(2)
            handle = await ckpt.checkpoint(2)  # captured fine: the disk is what fails
            with pytest.raises(aiockpt.BackgroundError) as caught:
                await ckpt.wait()
            assert_eio(caught.value, 2)
            assert caught.value.__cause__ is faults.raised[0]
            assert handle.done() and ckpt.stats.failed == 1
            faults.armed = False

            # Step 1 is intact, step 2 invisible, and nothing of it is left.
            assert_committed(directory, [1])
            assert leftovers(directory) == []
            assert (directory / "latest").read_text() == "step-1\n"

            model.set(3)
            assert await (await ckpt.checkpoint(3)) is not None
        assert_committed(directory, [1, 3])

        fresh = Model()
        async with aiockpt.Checkpointer(config(directory), model=fresh) as again:
            assert await again.restore() == 3
        assert fresh.step == 3 and torch.equal(fresh.tensors["a"], values(3)["a"])

    asyncio.run(main())
    assert len(faults.raised) == 1


def test_eio_surfaces_at_the_next_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training that never looks at the handle learns of the failure from checkpoint()."""
    directory = tmp_path / "ckpt"
    faults = Faults(monkeypatch, directory)
    faults.fail("fsync", "data", nth=1)
    model = Model()
    with aiockpt.SyncCheckpointer(config(directory), model=model) as ckpt:
        model.set(1)
        ckpt.checkpoint(1).wait()
        faults.armed = True
        model.set(2)
        handle = ckpt.checkpoint(2)
        deadline = time.monotonic() + 30
        while not handle.done():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        faults.armed = False
        model.set(3)
        with pytest.raises(aiockpt.BackgroundError) as caught:
            ckpt.checkpoint(3)
        assert_eio(caught.value, 2)
        ckpt.checkpoint(3).wait()  # reported once; then training goes on
        assert leftovers(directory) == []
    assert_committed(directory, [1, 3])


def test_eio_with_on_error_warn_keeps_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "ckpt"
    faults = Faults(monkeypatch, directory)
    faults.fail("pwrite", "data", nth=1)
    model = Model()

    async def main() -> aiockpt.Checkpointer:
        async with aiockpt.Checkpointer(config(directory, on_error="warn"), model=model) as ckpt:
            model.set(1)
            await (await ckpt.checkpoint(1))
            faults.armed = True
            model.set(2)
            await ckpt.checkpoint(2)
            await ckpt.wait()  # a warning, not an exception
            faults.armed = False
            for step in (3, 4):
                model.set(step)
                assert await (await ckpt.checkpoint(step)) is not None
            return ckpt

    with caplog.at_level(logging.WARNING, logger="aiockpt"):
        ckpt = asyncio.run(main())
    assert (ckpt.stats.committed, ckpt.stats.failed) == (3, 1)
    warned = [r for r in caplog.records if r.exc_info and "step 2" in r.getMessage()]
    assert len(warned) == 1
    error = warned[0].exc_info[1]  # type: ignore[index]
    assert isinstance(error, OSError) and error.errno == errno.EIO
    assert_committed(directory, [1, 3, 4])
    assert leftovers(directory) == []


@pytest.mark.parametrize("call", ["rename", "fsync"])
def test_eio_in_retention_does_not_fail_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, call: str
) -> None:
    """Step 2 is committed and durable before retention starts: a failure to delete
    step 1 is a warning, and step 1 is either kept or left as trash the next open
    deletes (never half-deleted under its own name)."""
    directory = tmp_path / "ckpt"
    faults = Faults(monkeypatch, directory)
    # With keep_last=1, step 2's parent-directory fsyncs are: after its rename, after
    # `latest` moved, after step 1 was renamed to trash (the third: retention's).
    if call == "rename":
        faults.fail(call, "retention", nth=1)
    else:
        faults.fail(call, "parent-dir", nth=3)
    model = Model()
    cfg = config(directory, keep_last=1)
    with (
        caplog.at_level(logging.WARNING, logger="aiockpt"),
        aiockpt.SyncCheckpointer(cfg, model=model) as ckpt,
    ):
        model.set(1)
        ckpt.checkpoint(1).wait()
        faults.armed = True
        model.set(2)
        info = ckpt.checkpoint(2).wait()
        faults.armed = False
        assert info is not None and info.step == 2
        assert ckpt.stats.failed == 0
        assert any("retention" in r.getMessage() for r in caplog.records)
        steps = [i.step for i in aiockpt.list_checkpoints(directory)]
        assert steps == ([1, 2] if call == "rename" else [2])
        model.set(3)
        ckpt.checkpoint(3).wait()  # the next retention catches up
    assert len(faults.raised) == 1
    with aiockpt.SyncCheckpointer(config(directory, keep_last=1), model=Model()) as again:
        assert again.restore() == 3
        assert leftovers(directory) == []
    assert_committed(directory, [3])


def test_eio_reading_the_newest_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad sector in the newest checkpoint: restore() resumes from the one before."""
    directory = tmp_path / "ckpt"
    saved = Model()
    with aiockpt.SyncCheckpointer(config(directory), model=saved) as ckpt:
        for step in (1, 2):
            saved.set(step)
            ckpt.checkpoint(step).wait()
    faults = Faults(monkeypatch, directory)
    faults.fail("preadv", "committed-data", nth=1)
    faults.armed = True
    model = Model()
    with (
        caplog.at_level(logging.WARNING, logger="aiockpt"),
        aiockpt.SyncCheckpointer(config(directory), model=model) as ckpt,
    ):
        assert ckpt.restore() == 1
    assert model.step == 1 and torch.equal(model.tensors["a"], values(1)["a"])
    assert any("Input/output error" in r.getMessage() for r in caplog.records)
    faults.fail("preadv", "committed-data", nth=1)
    with pytest.raises(aiockpt.CorruptCheckpointError, match=r"step-2/data-.*Input/output") as e:
        aiockpt.load(directory / "step-2")
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.EIO


# -- a slow disk ----------------------------------------------------------------------------
def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Big:
    """About 8 MiB; bigger than allocator noise, so a queued copy of it would show."""

    def __init__(self) -> None:
        self.w = torch.zeros(2 * MIB, dtype=torch.float32)
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "w": self.w}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.w.copy_(state["w"])


@pytest.mark.parametrize("policy", ["block", "skip"])
def test_slow_disk_backlog_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    directory = tmp_path / "ckpt"
    real_pwrite = os.pwrite
    delay = 0.02

    def slow_pwrite(fd: int, data: Any, offset: int) -> int:
        if "/.tmp-step-" in fd_path(fd):
            time.sleep(delay)  # a disk that takes 20 ms per write call
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    big = Big()
    state_bytes = big.w.numel() * 4
    requests = 24
    cfg = config(
        directory,
        chunk_size_mb=1,
        max_async=2,
        pinned_ratio=2.0,  # room for two snapshots, so max_async is what binds
        keep_last=None,
        on_backpressure=policy,
    )

    async def main() -> dict[str, Any]:
        async with aiockpt.Checkpointer(cfg, big=big) as ckpt:
            await (await ckpt.checkpoint(0))  # sizes the staging memory once
            staging = ckpt.staging
            assert staging is not None
            pool = staging.host_pool_bytes
            rss_before = rss_bytes()
            peak_rss, peak_in_flight, handles = rss_before, 0, []
            started = time.perf_counter()
            for step in range(1, requests + 1):
                big.step = step
                big.w.fill_(step)  # training changes the state right after each call
                handles.append(await ckpt.checkpoint(step))
                staging = ckpt.staging
                assert staging is not None
                peak_in_flight = max(peak_in_flight, staging.in_flight)
                peak_rss = max(peak_rss, rss_bytes())
                assert staging.host_pool_bytes == pool
            requesting = time.perf_counter() - started
            await ckpt.wait()
            after = ckpt.staging
            assert after is not None
            return dict(
                pool=pool,
                pool_after=after.host_pool_bytes,
                rss_growth=peak_rss - rss_before,
                peak_in_flight=peak_in_flight,
                handles=handles,
                stats=ckpt.stats,
                requesting=requesting,
            )

    result = asyncio.run(main())
    handles = result["handles"]
    skipped = [h for h in handles if h.skipped]
    stats = result["stats"]
    print(
        f"\n{policy}: {requests} requests in {result['requesting']:.2f} s, "
        f"{len(skipped)} skipped; host pool {result['pool'] / MIB:.1f} MiB "
        f"({result['pool'] / state_bytes:.2f}x the state), RSS growth "
        f"{result['rss_growth'] / MIB:.1f} MiB, at most {result['peak_in_flight']} in flight"
    )
    assert result["pool_after"] == result["pool"]
    assert result["pool"] <= cfg.pinned_ratio * state_bytes + MIB  # + at most a chunk
    assert result["peak_in_flight"] == cfg.max_async
    # Queued snapshots would take 8 MiB each (24 of them: 192 MiB).
    assert result["rss_growth"] < 2 * state_bytes, result["rss_growth"]
    committed = [i.step for i in aiockpt.list_checkpoints(directory)]
    if policy == "block":
        assert not skipped and committed == list(range(requests + 1))
        assert max(h.metrics.queue_wait_ms for h in handles) > delay * 1e3  # it did wait
    else:
        assert skipped, "a disk this slow must make some requests skip"
        assert stats.skipped == len(skipped)
        assert committed == [0] + [h.step for h in handles if not h.skipped]
        assert stats.committed == 1 + requests - len(skipped)
    for step in committed[-2:]:
        state = aiockpt.load(directory / f"step-{step}")["big"]
        assert state["step"] == step and bool((state["w"] == step).all())
    assert leftovers(directory) == []
