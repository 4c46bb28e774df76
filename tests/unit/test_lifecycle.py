"""Load and lifecycle: a 1000-checkpoint soak, concurrent callers, close() mid-write,
errors raised by the user's own state_dict(), many open/close cycles.

The soak checkpoints with ``durable = true`` (every fsync done), two in flight at a time,
and measures what a long run must not grow: disk use, temporary directories, open file
descriptors, threads, resident memory and staging memory. It prints its figures (run with
``-s`` to see them; docs/RELIABILITY.md quotes a run). Two processes on one directory are
tested in tests/unit/test_pipeline.py (test_directory_lock_excludes_a_second_writer), interpreter
exit with a checkpoint in flight in the same file.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

import aiockpt
from aiockpt._engine.runtime import IO_THREADS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

SOAK_CHECKPOINTS = int(os.environ.get("SOAK_CHECKPOINTS", "1000"))
TEMPORARY = (".tmp-", ".trash-")
MIB = 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def disk_bytes(directory: Path) -> int:
    """Bytes of every file under ``directory``; files of checkpoints in flight may move or
    vanish (renamed into place, retained away) while it walks."""
    total = 0
    for folder, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue
    return total


def threads_settled(expected: int, timeout: float = 5.0) -> int:
    """The thread count once it is back to ``expected`` (or the timeout passed).

    restore() reads on the monitor loop's default executor, and closing an event loop
    does not wait for that executor's threads: they exit a moment after close().
    """
    deadline = time.monotonic() + timeout
    while threading.active_count() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count()


def writing_begun(directory: Path, timeout: float = 10.0) -> bool:
    """Whether a checkpoint's temporary directory shows up (checkpoint() returns once the
    state is captured, before the background has begun writing it)."""
    deadline = time.monotonic() + timeout
    while not any(n.startswith(".tmp-") for n in os.listdir(directory)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def leftovers(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(TEMPORARY) or n == "latest.tmp"]


class Small:
    """About 200 KiB over four tensors, plus non-tensor state; every value says the step."""

    def __init__(self, device: str = "cpu") -> None:
        self.step = 0
        self.tensors = {
            "w": torch.zeros(256, 128, device=device),
            "b": torch.zeros(128, device=device),
            "m": torch.zeros(128, 128, dtype=torch.float64, device=device),
            "n": torch.zeros(1000, dtype=torch.int64, device=device),
        }

    def set(self, step: int) -> None:
        self.step = step
        for tensor in self.tensors.values():
            tensor.fill_(step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": [self.step - 1, self.step], **self.tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        for name, tensor in self.tensors.items():
            tensor.copy_(state[name])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def assert_step(state: dict[str, Any], step: int) -> None:
    assert state["step"] == step and state["history"] == [step - 1, step]
    for name in ("w", "b", "m", "n"):
        assert bool((state[name] == step).all()), f"{name} of step {step}"


def warm_up(tmp_path: Path) -> None:
    """Open and close one checkpointer first: uvloop keeps one pipe for the whole process
    from its first loop on, which is not a leak of any checkpointer."""
    cfg = aiockpt.Config(directory=tmp_path / "warm-up", durable=False)
    with aiockpt.SyncCheckpointer(cfg, small=Small()) as ckpt:
        ckpt.checkpoint(0).wait()
        ckpt.restore()


# -- the soak -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "staging",
    [
        "cpu",
        pytest.param("gpu", marks=pytest.mark.gpu),
        pytest.param("host", marks=pytest.mark.gpu),
    ],
)
@pytest.mark.slow
def test_soak_1000_checkpoints_keep_last_3(tmp_path: Path, staging: str) -> None:
    """staging "cpu": a CPU state; "gpu"/"host": a CUDA state staged either way, which
    also shows pinned host memory and GPU memory staying flat."""
    directory = tmp_path / "ckpt"
    cuda = staging != "cpu"
    small = Small("cuda" if cuda else "cpu")
    keep_last, max_async = 3, 2
    cfg = aiockpt.Config(
        staging="auto" if not cuda else staging,
        directory=directory,
        keep_last=keep_last,
        max_async=max_async,
        pinned_ratio=4.0,  # room for two snapshots of part-filled chunks: max_async binds
        chunk_size_mb=0.0625,
        num_threads=2,
        durable=True,
    )
    warm_up(tmp_path)
    # Garbage of earlier tests (GPU tensors in reference cycles) must not be collected in
    # the middle of the soak, where it would read as GPU memory that moved.
    gc.collect()
    fds_before, threads_before = open_fds(), threading.active_count()
    samples: list[dict[str, int]] = []

    async def main() -> dict[str, Any]:
        async with aiockpt.Checkpointer(cfg, small=small) as ckpt:
            started = time.perf_counter()
            pending: list[aiockpt.CheckpointHandle] = []
            in_flight_max = 0
            for step in range(1, SOAK_CHECKPOINTS + 1):
                small.set(step)
                pending.append(await ckpt.checkpoint(step))  # blocks while 2 are in flight
                staging = ckpt.staging
                assert staging is not None
                in_flight_max = max(in_flight_max, staging.in_flight)
                if step % 100 == 0:
                    in_flight_disk = disk_bytes(directory)
                    await ckpt.wait()  # measure at rest: nothing in flight holds a file
                    samples.append(
                        dict(
                            step=step,
                            fds=open_fds(),
                            threads=threading.active_count(),
                            rss=rss_bytes(),
                            disk=disk_bytes(directory),
                            disk_in_flight=in_flight_disk,
                            committed=len(aiockpt.list_checkpoints(directory)),
                            pool=staging.host_pool_bytes,
                            pinned=int(staging.pinned),
                            gpu=torch.cuda.memory_allocated() if cuda else 0,
                        )
                    )
                if len(pending) > 64:
                    for handle in pending:
                        assert handle.done() or await handle is not None
                    pending.clear()
            await ckpt.wait()
            seconds = time.perf_counter() - started
            # A restarted job's reads leak nothing either.
            fds_open = open_fds()
            for _ in range(20):
                assert await ckpt.restore() == SOAK_CHECKPOINTS
            assert open_fds() == fds_open
            assert_step(small.state_dict(), SOAK_CHECKPOINTS)
            return dict(seconds=seconds, stats=ckpt.stats, in_flight_max=in_flight_max)

    result = asyncio.run(main())
    stats = result["stats"]
    one = disk_bytes(directory / f"step-{SOAK_CHECKPOINTS}")
    first, last = samples[0], samples[-1]
    figures = {
        "checkpoints": SOAK_CHECKPOINTS,
        "seconds": round(result["seconds"], 1),
        "in_flight_max": result["in_flight_max"],
        "checkpoint_bytes": one,
        "disk_at_rest_bytes": [min(s["disk"] for s in samples), max(s["disk"] for s in samples)],
        "disk_in_flight_max_bytes": max(s["disk_in_flight"] for s in samples),
        "committed_at_rest": sorted({s["committed"] for s in samples}),
        "fds": [s["fds"] for s in samples],
        "threads": [s["threads"] for s in samples],
        "rss_mib": [round(s["rss"] / MIB, 1) for s in samples],
        "rss_growth_mib_100_to_last": round((last["rss"] - first["rss"]) / MIB, 2),
        "staging": staging,
        "staging_pool_bytes": sorted({s["pool"] for s in samples}),
        "staging_pool_pinned": sorted({s["pinned"] for s in samples}),
        "gpu_allocated_bytes": sorted({s["gpu"] for s in samples}),
        "fds_before_after": [fds_before, open_fds()],
        "threads_before_after": [threads_before, threads_settled(threads_before)],
    }
    print("\nsoak:", json.dumps(figures))
    if os.environ.get("SOAK_REPORT"):
        with open(os.environ["SOAK_REPORT"], "a") as report:
            report.write(json.dumps(figures) + "\n")

    assert (stats.committed, stats.failed, stats.skipped) == (SOAK_CHECKPOINTS, 0, 0)
    assert figures["in_flight_max"] == max_async
    # Disk: never more than keep_last committed plus the ones in flight (and the one
    # committed but not yet retained); at rest, exactly keep_last, nothing temporary.
    assert figures["disk_in_flight_max_bytes"] <= (keep_last + max_async + 1) * one + 4096
    assert figures["committed_at_rest"] == [keep_last]
    # Manifests differ by a digit or two of `created`, and (incremental checkpoints) by the
    # SHA-256 digests of the pieces hashed at that checkpoint: a few hundred bytes.
    rest = figures["disk_at_rest_bytes"]
    slack = max(64, keep_last * one // 100)
    assert rest[-1] - rest[0] < slack and rest[-1] <= keep_last * one + slack, rest
    assert [i.step for i in aiockpt.list_checkpoints(directory)] == [998, 999, 1000][-keep_last:]
    assert leftovers(directory) == []
    for info in aiockpt.list_checkpoints(directory):
        assert_step(aiockpt.load(info.path)["small"], info.step)
    # File descriptors, threads and staging memory: flat while running, all back after close.
    assert len(set(figures["fds"])) == 1, figures["fds"]
    # Thread pools start their threads lazily, up to their size, when work first overlaps
    # (which may take hundreds of checkpoints): the writers, and the monitor loop's bounded
    # executor for the commit path. A leak would grow without bound.
    threads = figures["threads"]
    assert max(threads) - min(threads) <= cfg.num_threads + IO_THREADS, threads
    assert len(figures["staging_pool_bytes"]) == 1
    assert figures["staging_pool_pinned"] == [int(cuda)]
    assert len(figures["gpu_allocated_bytes"]) == 1
    assert figures["fds_before_after"][1] == fds_before
    assert figures["threads_before_after"][1] == threads_before
    # Resident memory: flat from the 100th to the last checkpoint (allocator noise only).
    assert figures["rss_growth_mib_100_to_last"] < 8, figures["rss_mib"]  # shrinking is fine


def test_open_close_cycles_leak_nothing(tmp_path: Path) -> None:
    """A job that makes a checkpointer per phase (or per test) gives everything back."""
    small = Small()
    cfg = aiockpt.Config(directory=tmp_path / "ckpt", keep_last=2, durable=False)
    warm_up(tmp_path)
    fds, threads, rss = open_fds(), threading.active_count(), rss_bytes()
    for step in range(1, 41):
        with aiockpt.SyncCheckpointer(cfg, small=small) as ckpt:
            small.set(step)
            ckpt.checkpoint(step).wait()
            assert ckpt.restore() == step
    growth = (rss_bytes() - rss) / MIB
    threads_after = threads_settled(threads)
    print(
        f"\n40 open/close cycles: fds {fds} -> {open_fds()}, threads {threads} -> "
        f"{threads_after}, RSS growth {growth:.1f} MiB"
    )
    assert open_fds() == fds
    assert threads_after == threads
    assert growth < 16


# -- concurrency and shutdown -------------------------------------------------------------
@pytest.mark.parametrize("use_monitor", [True, False])
def test_checkpoint_from_several_tasks_at_once(tmp_path: Path, use_monitor: bool) -> None:
    small = Small()
    small.set(7)
    cfg = aiockpt.Config(
        directory=tmp_path / "ckpt", keep_last=None, max_async=2, use_monitor=use_monitor
    )
    steps = list(range(10, 90, 10))

    async def one(ckpt: aiockpt.Checkpointer, step: int) -> aiockpt.CheckpointInfo | None:
        await asyncio.sleep(0)
        handle = await ckpt.checkpoint(step)
        return await handle

    async def main() -> list[aiockpt.CheckpointInfo | None]:
        async with aiockpt.Checkpointer(cfg, small=small) as ckpt:
            # The very first checkpoint plans the layout: let every task race for it.
            infos = await asyncio.gather(*(one(ckpt, step) for step in steps))
            assert ckpt.stats.committed == len(steps) and ckpt.stats.failed == 0
            return list(infos)

    infos = asyncio.run(main())
    assert sorted(i.step for i in infos if i is not None) == steps
    committed = aiockpt.list_checkpoints(cfg.directory)
    assert [i.step for i in committed] == steps
    for info in committed:
        state = aiockpt.load(info.path)["small"]
        assert bool((state["w"] == 7).all())
    assert (cfg.directory / "latest").read_text() == f"step-{steps[-1]}\n"
    assert leftovers(cfg.directory) == []


@pytest.mark.parametrize("front", ["async", "sync"])
def test_close_with_writes_in_flight_drains_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, front: str
) -> None:
    directory = tmp_path / "ckpt"
    real_pwrite = os.pwrite
    gate = threading.Event()

    def held_pwrite(fd: int, data: Any, offset: int) -> int:
        if "/.tmp-step-" in os.readlink(f"/proc/self/fd/{fd}"):
            gate.wait(timeout=30)  # the disk answers only once close() has been called
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", held_pwrite)
    small = Small()
    cfg = aiockpt.Config(
        directory=directory, keep_last=None, max_async=2, pinned_ratio=4.0, chunk_size_mb=0.0625
    )
    handles: list[Any] = []
    opened = threading.Timer(0.2, gate.set)  # 0.2 s into close(), writes go through
    if front == "async":

        async def main() -> None:
            ckpt = aiockpt.Checkpointer(cfg, small=small)
            for step in (1, 2):
                small.set(step)
                handles.append(await ckpt.checkpoint(step))
            assert not any(h.done() for h in handles)
            assert writing_begun(directory)
            opened.start()
            await ckpt.close()

        asyncio.run(main())
    else:
        ckpt = aiockpt.SyncCheckpointer(cfg, small=small)
        for step in (1, 2):
            small.set(step)
            handles.append(ckpt.checkpoint(step))
        assert not any(h.done() for h in handles)
        opened.start()
        ckpt.close()
    assert gate.is_set()  # close() returned only after the writes could go through
    assert all(h.done() for h in handles)
    committed = aiockpt.list_checkpoints(directory)
    assert [i.step for i in committed] == [1, 2]
    for info in committed:
        assert_step(aiockpt.load(info.path)["small"], info.step)
    assert leftovers(directory) == []
    # The lock went with close(): another writer may open the directory at once.
    with aiockpt.SyncCheckpointer(cfg, small=Small()) as again:
        assert again.restore() == 2


# -- errors from the user's own code --------------------------------------------------------
class Faulty:
    """state_dict() fails in a helper of its own, as a user's bug would."""

    def __init__(self) -> None:
        self.armed = False
        self.t = torch.ones(1000)

    def state_dict(self) -> dict[str, Any]:
        return self._collect()

    def _collect(self) -> dict[str, Any]:
        if self.armed:
            raise LookupError("optimizer slot 'exp_avg' missing for param 3")  # the frame
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = state["t"]


_RAISE_LINE = Faulty._collect.__code__.co_firstlineno + 2


def assert_user_frame(error: BaseException) -> None:
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f.filename == __file__]
    names = [f.name for f in ours]
    assert "state_dict" in names and "_collect" in names, names
    assert frames[-1].name == "_collect" and frames[-1].lineno == _RAISE_LINE, frames[-1]
    assert "raise LookupError" in (frames[-1].line or "")


@pytest.mark.parametrize("front", ["monitor", "caller-loop", "sync"])
def test_state_dict_exception_keeps_its_traceback(tmp_path: Path, front: str) -> None:
    """The user's exception comes back as itself, its own frames on top, while an
    earlier checkpoint in flight still commits."""
    faulty = Faulty()
    cfg = aiockpt.Config(directory=tmp_path / "ckpt", use_monitor=front != "caller-loop")
    if front == "sync":
        with aiockpt.SyncCheckpointer(cfg, faulty=faulty) as ckpt:
            first = ckpt.checkpoint(1)
            faulty.armed = True
            with pytest.raises(LookupError, match="exp_avg") as caught:
                ckpt.checkpoint(2)
            assert first.wait() is not None
    else:

        async def main() -> pytest.ExceptionInfo[LookupError]:
            async with aiockpt.Checkpointer(cfg, faulty=faulty) as ckpt:
                first = await ckpt.checkpoint(1)
                faulty.armed = True
                with pytest.raises(LookupError, match="exp_avg") as caught:
                    await ckpt.checkpoint(2)
                assert await first is not None
                assert ckpt.stats.requested == 1
            return caught

        caught = asyncio.run(main())
    assert_user_frame(caught.value)
    assert [i.step for i in aiockpt.list_checkpoints(cfg.directory)] == [1]
    assert leftovers(cfg.directory) == []


def test_close_cancel_abandons_checkpoints_in_flight(tmp_path: Path, monkeypatch) -> None:
    """close(cancel=True) with writes held mid-flight: nothing becomes visible, the
    previous checkpoint stays, the handle says it was cancelled."""
    import aiockpt.storage.local as local_storage

    release = threading.Event()
    real_write = local_storage.write_pieces

    def held_write(*args: Any, **kwargs: Any) -> Any:
        release.wait(5)  # a disk that stalls until the test lets it go
        return real_write(*args, **kwargs)

    class Holder:
        def __init__(self, value: float) -> None:
            self.state = {"w": torch.full((256, 256), value)}

        def state_dict(self) -> dict[str, Any]:
            return self.state

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.state = state

    config = aiockpt.Config(directory=tmp_path / "ckpt", chunk_size_mb=0.05, keep_last=None)
    holder = Holder(1.0)
    ckpt = aiockpt.SyncCheckpointer(config, holder=holder)
    ckpt.checkpoint(1).wait()
    monkeypatch.setattr(local_storage, "write_pieces", held_write)
    holder.state = {"w": torch.full((256, 256), 2.0)}
    handle = ckpt.checkpoint(2)
    assert not handle.done()
    timer = threading.Timer(0.5, release.set)  # the held writes end after cancel has run
    timer.start()
    ckpt.close(cancel=True)
    timer.join()
    with pytest.raises(aiockpt.CheckpointError, match="cancelled"):
        handle.wait()
    assert [info.step for info in aiockpt.list_checkpoints(config.directory)] == [1]
    state = aiockpt.load(Path(config.directory) / "step-1")
    assert torch.equal(state["holder"]["w"], torch.full((256, 256), 1.0))
    with aiockpt.SyncCheckpointer(config, holder=Holder(0.0)):  # next open clears leftovers
        pass
    assert not [p for p in Path(config.directory).iterdir() if p.name.startswith(".tmp-")]
