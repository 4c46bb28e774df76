"""A full disk, for real: checkpoints into a 2 MiB tmpfs until one does not fit.

The failure must come back as aiockpt.BackgroundError chained to the OSError(ENOSPC) the
kernel returned, at whichever call the user makes next (the handle, wait(), or the next
checkpoint()); the previous checkpoint must stay committed and bitwise intact, the
half-written one must leave no files (so its space comes back), and once the state fits
again checkpoints must succeed. With on_error="warn" the failure is logged instead.

Needs root and a kernel that lets this process mount a tmpfs; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import aiockpt

DISK = "2m"
SMALL = 256 * 1024  # bytes of state that fit (twice over) in DISK
BIG = 4 * 1024 * 1024  # bytes of state that cannot fit in DISK
TEMPORARY = (".tmp-", ".trash-")
PAGE = os.sysconf("SC_PAGE_SIZE")  # tmpfs allocates whole pages


def _mount_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return "tmpfs mounts need Linux"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount command"
    return None


@contextlib.contextmanager
def tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    """Mount a fresh tmpfs with ``options`` at ``mount_point``; skip where that's refused."""
    problem = _mount_problem()
    if problem:
        pytest.skip(problem)
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        done = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True)
        if done.returncode != 0:  # something still holds it open: detach it anyway
            subprocess.run(["umount", "-l", str(mount_point)], check=False)
            pytest.fail(f"umount {mount_point} failed: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A freshly mounted tmpfs of size DISK, unmounted afterwards."""
    with tmpfs(tmp_path / "mnt", f"size={DISK},mode=0755") as mount_point:
        yield mount_point


def expected(step: int, nbytes: int) -> dict[str, torch.Tensor]:
    """Two int32 tensors of ``nbytes`` in all whose values say the step."""
    n = nbytes // 4
    sizes = {"a": n // 2, "b": n - n // 2}
    return {
        name: (torch.arange(size, dtype=torch.int32) * (3 + i) + step * 1_000_003)
        for i, (name, size) in enumerate(sizes.items())
    }


class Blob:
    """A Stateful whose size can change between checkpoints."""

    def __init__(self) -> None:
        self.step = 0
        self.tensors: dict[str, torch.Tensor] = {}

    def set(self, step: int, nbytes: int) -> None:
        self.step = step
        self.tensors = expected(step, nbytes)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tensors": dict(self.tensors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.tensors = dict(state["tensors"])


def config(directory: Path, **overrides: Any) -> aiockpt.Config:
    values: dict[str, Any] = dict(
        directory=directory, chunk_size_mb=0.125, num_threads=4, max_async=2, keep_last=3
    )
    return aiockpt.Config(**{**values, **overrides})


def free_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_bfree * info.f_frsize


def assert_enospc(error: BaseException) -> None:
    assert isinstance(error, aiockpt.BackgroundError), repr(error)
    cause = error.__cause__
    assert isinstance(cause, OSError), f"cause is {cause!r}"
    assert cause.errno == errno.ENOSPC, f"cause is {cause!r}"
    assert "step 2" in str(error), str(error)


def assert_committed(directory: Path, steps_and_sizes: dict[int, int]) -> None:
    """Exactly these steps are committed, each loads (checksums verified) bitwise."""
    committed = aiockpt.list_checkpoints(directory)
    assert [info.step for info in committed] == sorted(steps_and_sizes)
    for info in committed:
        state = aiockpt.load(info.path)["blob"]
        assert state["step"] == info.step
        want = expected(info.step, steps_and_sizes[info.step])
        assert sorted(state["tensors"]) == sorted(want)
        for name, tensor in want.items():
            got = state["tensors"][name]
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), f"{info.path}: {name}"
    leftovers = [name for name in os.listdir(directory) if name.startswith(TEMPORARY)]
    assert leftovers == [], f"temporaries left behind: {leftovers}"


async def _until(predicate: Any, what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("surfaces_at", ["handle", "wait", "next_checkpoint"])
def test_enospc_is_reported_and_recovered(small_disk: Path, surfaces_at: str) -> None:
    directory = small_disk / "ckpt"
    blob = Blob()

    async def main() -> None:
        async with aiockpt.Checkpointer(config(directory), blob=blob) as ckpt:
            blob.set(1, SMALL)
            assert await (await ckpt.checkpoint(1)) is not None
            free_before = free_bytes(small_disk)
            assert free_before < BIG, "the tmpfs is larger than the test assumes"

            blob.set(2, BIG)
            handle = await ckpt.checkpoint(2)  # captured fine: the disk is what fails
            with pytest.raises(aiockpt.BackgroundError) as caught:
                if surfaces_at == "handle":
                    await handle
                elif surfaces_at == "wait":
                    await ckpt.wait()
                else:
                    # Training goes on without looking at the handle; the failure lands
                    # in the background, and the next checkpoint() reports it.
                    await _until(lambda: ckpt.stats.failed == 1, "step 2 to fail")
                    await asyncio.sleep(0.05)
                    blob.set(3, SMALL)
                    await ckpt.checkpoint(3)
            assert_enospc(caught.value)
            assert handle.done()
            assert (ckpt.stats.committed, ckpt.stats.failed) == (1, 1)

            # Step 1 is untouched, step 2 left nothing, and its space came back.
            assert_committed(directory, {1: SMALL})
            assert free_bytes(small_disk) == free_before

            # The failure was reported once; a state that fits again checkpoints fine.
            blob.set(3, SMALL)
            info = await (await ckpt.checkpoint(3))
            assert info is not None and info.step == 3
            await ckpt.wait()
            assert (ckpt.stats.committed, ckpt.stats.failed) == (2, 1)

        assert_committed(directory, {1: SMALL, 3: SMALL})
        # And a new process would resume from step 3.
        fresh = Blob()
        async with aiockpt.Checkpointer(config(directory), blob=fresh) as again:
            assert await again.restore() == 3
        assert fresh.step == 3
        for name, tensor in expected(3, SMALL).items():
            assert torch.equal(fresh.tensors[name], tensor)

    asyncio.run(main())


def test_enospc_sync_checkpointer(small_disk: Path) -> None:
    directory = small_disk / "ckpt"
    blob = Blob()
    with aiockpt.SyncCheckpointer(config(directory), blob=blob) as ckpt:
        blob.set(1, SMALL)
        ckpt.checkpoint(1).wait()
        blob.set(2, BIG)
        handle = ckpt.checkpoint(2)
        with pytest.raises(aiockpt.BackgroundError) as caught:
            handle.wait()
        assert_enospc(caught.value)
        assert_committed(directory, {1: SMALL})
        blob.set(3, SMALL)
        ckpt.checkpoint(3).wait()
        ckpt.wait()
    assert_committed(directory, {1: SMALL, 3: SMALL})


def test_enospc_on_error_warn(small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = small_disk / "ckpt"
    blob = Blob()

    async def main() -> None:
        cfg = config(directory, on_error="warn")
        async with aiockpt.Checkpointer(cfg, blob=blob) as ckpt:
            blob.set(1, SMALL)
            await (await ckpt.checkpoint(1))
            blob.set(2, BIG)
            await ckpt.checkpoint(2)
            await ckpt.wait()  # does not raise: the failure is a warning
            await _until(lambda: ckpt.stats.failed == 1, "step 2 to fail")

            blob.set(3, SMALL)
            handle = await ckpt.checkpoint(3)  # does not raise either
            info = await handle
            assert info is not None and info.step == 3
            await ckpt.wait()
            assert (ckpt.stats.committed, ckpt.stats.failed) == (2, 1)

    with caplog.at_level(logging.WARNING, logger="aiockpt"):
        asyncio.run(main())

    failures = [r for r in caplog.records if r.levelno == logging.WARNING and r.exc_info]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    record = failures[0]
    assert record.name == "aiockpt._engine.failures"
    assert "step 2" in record.getMessage()
    assert record.exc_info is not None
    error = record.exc_info[1]
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC, repr(error)
    assert_committed(directory, {1: SMALL, 3: SMALL})


def pages(nbytes: int) -> int:
    return -(-nbytes // PAGE)


@pytest.mark.parametrize("stage", ["manifest", "latest"])
def test_enospc_at_the_commit(
    small_disk: Path, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The data fits exactly; the manifest, or then the ``latest`` pointer, does not.

    tmpfs counts whole pages, so a filler file can leave exactly the room wanted.
    """
    directory = small_disk / "ckpt"
    blob = Blob()

    async def main() -> None:
        async with aiockpt.Checkpointer(config(directory), blob=blob) as ckpt:
            blob.set(1, SMALL)
            first = await (await ckpt.checkpoint(1))
            assert first is not None
            files = [f for f in first.path.iterdir() if f.name != "manifest.json"]
            data_pages = sum(pages(f.stat().st_size) for f in files)
            manifest_size = (first.path / "manifest.json").stat().st_size
            assert manifest_size < PAGE // 2, "the manifest must fit one page with room"
            room = data_pages + (1 if stage == "latest" else 0)  # for step 2 of the same size
            filler = small_disk / "filler"
            filler.write_bytes(b"\0" * (free_bytes(small_disk) - room * PAGE))
            assert free_bytes(small_disk) == room * PAGE

            blob.set(2, SMALL)
            handle = await ckpt.checkpoint(2)
            if stage == "manifest":
                with pytest.raises(aiockpt.BackgroundError) as caught:
                    await handle
                assert_enospc(caught.value)
                assert_committed(directory, {1: SMALL})
                assert free_bytes(small_disk) == room * PAGE  # every page of step 2 freed
            else:
                # Step 2 is renamed in and durable before `latest` is written: it is
                # committed, and the pointer (a hint) lagging behind is only a warning.
                info = await handle
                assert info is not None and info.step == 2
                assert any("latest" in r.getMessage() for r in caplog.records)
                assert_committed(directory, {1: SMALL, 2: SMALL})
                # Readers trust the step directories, not the stale pointer.
                assert await ckpt.restore() == 2 and blob.step == 2
            assert not (directory / "latest.tmp").exists()
            assert (directory / "latest").read_text().strip() == "step-1"

            filler.unlink()
            blob.set(3, SMALL)
            assert await (await ckpt.checkpoint(3)) is not None
            assert (directory / "latest").read_text().strip() == "step-3"
        steps = {1: SMALL, 3: SMALL} if stage == "manifest" else {1: SMALL, 2: SMALL, 3: SMALL}
        assert_committed(directory, steps)

    with caplog.at_level(logging.WARNING, logger="aiockpt"):
        asyncio.run(main())


def test_inodes_exhausted(tmp_path: Path) -> None:
    """No inode left for the checkpoint's temporary directory: the same clean failure."""
    with tmpfs(tmp_path / "mnt", "size=4m,nr_inodes=64,mode=0755") as disk:
        directory = disk / "ckpt"
        blob = Blob()

        async def main() -> None:
            async with aiockpt.Checkpointer(config(directory), blob=blob) as ckpt:
                blob.set(1, SMALL)
                await (await ckpt.checkpoint(1))
                fillers = disk / "fillers"
                fillers.mkdir()
                made = 0
                with pytest.raises(OSError) as full:
                    while True:
                        (fillers / str(made)).touch()
                        made += 1
                assert full.value.errno == errno.ENOSPC

                blob.set(2, SMALL)
                with pytest.raises(aiockpt.BackgroundError) as caught:
                    await (await ckpt.checkpoint(2))
                assert_enospc(caught.value)
                assert_committed(directory, {1: SMALL})

                shutil.rmtree(fillers)
                blob.set(3, SMALL)
                assert await (await ckpt.checkpoint(3)) is not None
            assert_committed(directory, {1: SMALL, 3: SMALL})

        asyncio.run(main())


def fill(disk: Path) -> Path:
    """Write a file until the kernel says ENOSPC; it is then completely full."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"\xff" * PAGE)
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC
    assert free_bytes(disk) == 0
    return filler


def test_full_disk_restore_and_open(small_disk: Path) -> None:
    """A restarted job on a full disk still restores; a directory it cannot even open
    (no page left for the lock file's pid) fails cleanly and holds no lock afterwards."""
    directory = small_disk / "ckpt"

    async def main() -> None:
        blob = Blob()
        async with aiockpt.Checkpointer(config(directory), blob=blob) as ckpt:
            blob.set(1, SMALL)
            await (await ckpt.checkpoint(1))
        filler = fill(small_disk)

        fresh = Blob()
        async with aiockpt.Checkpointer(config(directory), blob=fresh) as ckpt:
            assert await ckpt.restore() == 1
        assert fresh.step == 1
        for name, tensor in expected(1, SMALL).items():
            assert torch.equal(fresh.tensors[name], tensor)

        other = small_disk / "other"
        with pytest.raises(OSError) as caught:
            aiockpt.Checkpointer(config(other), blob=Blob())
        assert caught.value.errno == errno.ENOSPC

        filler.unlink()
        # Were the failed open's lock still held, this would be DirectoryLockedError.
        async with aiockpt.Checkpointer(config(other), blob=Blob()) as ckpt:
            assert await ckpt.restore() is None

    asyncio.run(main())
