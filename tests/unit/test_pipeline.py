"""The background pipeline: exact snapshots, concurrency, backpressure, lifecycle, errors."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Bag, MixedModel, assert_state_equal, clone_state, make_config, run

import aiockpt

REPO = Path(__file__).resolve().parents[2]


def steps_on_disk(config: aiockpt.Config) -> list[int]:
    return [info.step for info in aiockpt.list_checkpoints(config.directory)]


def fill(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(value)


def float_values(state: dict[str, Any]) -> set[float]:
    return {
        float(v.float().unique().item())
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }


class Wide(torch.nn.Module):
    """About 3 MiB of float32 over several chunks: big enough that a write takes a while."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(512, 512) for _ in range(3))


@pytest.mark.parametrize("use_monitor", [True, False])
def test_snapshot_is_exact_when_training_mutates_right_after(
    tmp_path: Path, use_monitor: bool
) -> None:
    model = Wide()
    extra = Bag({"history": [1, 2], "array": np.arange(4.0), "nested": {"lr": 0.1}})
    expected = {"model": clone_state(model.state_dict()), "extra": clone_state(extra.state)}
    config = make_config(tmp_path, use_monitor=use_monitor, chunk_size_mb=0.25)

    async def go() -> Path:
        async with aiockpt.Checkpointer(config, model=model, extra=extra) as ckpt:
            handle = await ckpt.checkpoint(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            extra.state["history"].append(3)
            extra.state["array"] += 100
            extra.state["nested"]["lr"] = 0.5
            info = await handle
            assert info is not None
            return info.path

    loaded = aiockpt.load(run(go()))
    assert_state_equal(loaded, expected)
    assert not torch.equal(model.layers[0].weight, expected["model"]["layers.0.weight"])


def test_many_checkpoints_in_flight_each_keep_their_step(tmp_path: Path) -> None:
    model = MixedModel()
    config = make_config(tmp_path, max_async=4, keep_last=None, chunk_size_mb=0.01)

    async def go() -> list[aiockpt.CheckpointHandle]:
        async with aiockpt.Checkpointer(config, model=model) as ckpt:
            handles = []
            for step in range(1, 11):
                fill(model, float(step))
                handles.append(await ckpt.checkpoint(step))
            infos = [await h for h in handles]
            assert [i.step for i in infos if i is not None] == list(range(1, 11))
            assert ckpt.stats.committed == 10 and ckpt.stats.skipped == 0
            return handles

    run(go())
    assert steps_on_disk(config) == list(range(1, 11))
    for step in range(1, 11):
        state = aiockpt.load(config.directory / f"step-{step}")["model"]
        assert float_values(state) == {float(step)}, step
    assert (config.directory / "latest").read_text().strip() == "step-10"


@pytest.mark.parametrize("use_monitor", [True, False])
def test_block_backpressure_commits_every_request(tmp_path: Path, use_monitor: bool) -> None:
    model = MixedModel()
    config = make_config(tmp_path, max_async=1, keep_last=None, use_monitor=use_monitor)

    async def go() -> aiockpt.Checkpointer:
        async with aiockpt.Checkpointer(config, model=model) as ckpt:
            handles = []
            for step in range(6):
                fill(model, float(step))
                handles.append(await ckpt.checkpoint(step))
            assert not any(h.skipped for h in handles)
            await ckpt.wait()
            return ckpt

    ckpt = run(go())
    assert (ckpt.stats.requested, ckpt.stats.committed, ckpt.stats.skipped) == (6, 6, 0)
    assert steps_on_disk(config) == list(range(6))
    for step in range(6):
        assert float_values(aiockpt.load(config.directory / f"step-{step}")["model"]) == {step}


def three_chunk_state() -> Bag:
    # 9216 float32 = 36864 bytes = exactly three 12288-byte chunks (chunk_size_mb=0.01).
    return Bag({"w": torch.arange(9216, dtype=torch.float32)})


@pytest.mark.parametrize(
    ("max_async", "pinned_ratio", "admitted"),
    [
        (1, 1.0, 1),  # no free in-flight place
        (2, 0.01, 1),  # a place, but the host pool holds one checkpoint's chunks only
        (4, 2.0, 2),  # the pool holds two checkpoints
    ],
)
def test_skip_backpressure_drops_and_counts(
    tmp_path: Path, max_async: int, pinned_ratio: float, admitted: int
) -> None:
    # On the caller's loop nothing in flight can finish before the next request is admitted
    # (a write needs several executor round trips), so which requests are dropped is exact.
    config = make_config(
        tmp_path,
        use_monitor=False,
        max_async=max_async,
        pinned_ratio=pinned_ratio,
        chunk_size_mb=0.01,
        on_backpressure="skip",
        keep_last=None,
    )

    async def go() -> aiockpt.Checkpointer:
        async with aiockpt.Checkpointer(config, bag=three_chunk_state()) as ckpt:
            handles = [await ckpt.checkpoint(step) for step in range(admitted + 1)]
            *kept, dropped = handles
            assert not any(h.skipped for h in kept)
            assert dropped.skipped and dropped.metrics.skipped and dropped.done()
            assert ckpt.stats.skipped == 1
            assert await dropped is None
            for h in kept:
                assert await h is not None
            # Once the pipeline is idle again, the next request is admitted.
            assert not (await ckpt.checkpoint(100)).skipped
            return ckpt

    ckpt = run(go())
    assert ckpt.stats.skipped == 1 and ckpt.stats.committed == admitted + 1
    assert steps_on_disk(config) == [*range(admitted), 100]


def test_block_false_overrides_block_policy(tmp_path: Path) -> None:
    config = make_config(tmp_path, use_monitor=False, max_async=1, on_backpressure="block")

    async def go() -> None:
        async with aiockpt.Checkpointer(config, bag=three_chunk_state()) as ckpt:
            first = await ckpt.checkpoint(1)
            second = await ckpt.checkpoint(2, block=False)
            assert second.skipped and not first.skipped
            assert await second is None and await first is not None
            assert ckpt.stats.skipped == 1

    run(go())
    assert steps_on_disk(config) == [1]


def test_skip_under_a_burst_on_the_monitor_loop(tmp_path: Path) -> None:
    # 16 MiB with fsync takes far longer to persist than the next capture takes.
    bag = Bag({"w": torch.zeros(4 * 2**20)})
    config = make_config(
        tmp_path, max_async=1, pinned_ratio=0.5, on_backpressure="skip", keep_last=None
    )

    async def go() -> tuple[list[aiockpt.CheckpointHandle], aiockpt.Checkpointer]:
        async with aiockpt.Checkpointer(config, bag=bag) as ckpt:
            handles = []
            for step in range(8):
                bag.state["w"].fill_(step)
                handles.append(await ckpt.checkpoint(step))
            results = [await h for h in handles]
            for h, result in zip(handles, results, strict=True):
                assert (result is None) == h.skipped
            return handles, ckpt

    handles, ckpt = run(go())
    skipped = [h.step for h in handles if h.skipped]
    assert skipped and not handles[0].skipped
    assert ckpt.stats.skipped == len(skipped)
    assert ckpt.stats.committed == 8 - len(skipped)
    committed = [h.step for h in handles if not h.skipped]
    assert steps_on_disk(config) == committed
    for step in committed:
        w = aiockpt.load(config.directory / f"step-{step}")["bag"]["w"]
        assert torch.equal(w, torch.full_like(w, step))


@pytest.mark.parametrize("use_monitor", [True, False])
def test_state_that_changes_shape_between_checkpoints(tmp_path: Path, use_monitor: bool) -> None:
    # Adam has no state before its first step, so the second checkpoint has more tensors:
    # the pipeline must drain the first and plan a new layout without mixing them up.
    model = MixedModel()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    bag = Bag({"w": torch.zeros(100)})
    config = make_config(tmp_path, use_monitor=use_monitor, keep_last=None, chunk_size_mb=0.01)
    expected = []

    async def go() -> None:
        async with aiockpt.Checkpointer(config, model=model, optimizer=opt, bag=bag) as ckpt:
            handles = []
            for step in range(4):
                expected.append(
                    clone_state(
                        {
                            "model": model.state_dict(),
                            "optimizer": opt.state_dict(),
                            "bag": bag.state,
                        }
                    )
                )
                handles.append(await ckpt.checkpoint(step))
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                bag.state["w"] = torch.arange(50 * (step + 2), dtype=torch.float64)
            for h in handles:
                assert await h is not None

    run(go())
    for step, state in enumerate(expected):
        assert_state_equal(aiockpt.load(config.directory / f"step-{step}"), state)


def test_restore_waits_for_checkpoints_in_flight(tmp_path: Path) -> None:
    model = MixedModel()
    expected = clone_state(model.state_dict())
    config = make_config(tmp_path)

    async def go() -> int | None:
        async with aiockpt.Checkpointer(config, model=model) as ckpt:
            await ckpt.checkpoint(1)  # not awaited
            fill(model, 9.0)
            return await ckpt.restore()

    assert run(go()) == 1
    assert_state_equal(model.state_dict(), expected)


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    model = MixedModel()
    config = make_config(tmp_path, keep_last=2, max_async=3)

    async def go() -> None:
        async with aiockpt.Checkpointer(config, model=model) as ckpt:
            for step, kept in ((1, [1]), (2, [1, 2]), (3, [2, 3])):
                await (await ckpt.checkpoint(step))
                assert steps_on_disk(config) == kept
            # Several in flight at once: still only the newest two survive.
            handles = [await ckpt.checkpoint(step) for step in range(4, 9)]
            for h in handles:
                await h

    run(go())
    assert steps_on_disk(config) == [7, 8]
    names = sorted(p.name for p in config.directory.iterdir())
    assert names == [".aiockpt.lock", "latest", "step-7", "step-8"]
    assert (config.directory / "latest").read_text() == "step-8\n"


def test_latest_names_the_newest_and_never_moves_back(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=None)
    latest = config.directory / "latest"

    async def go() -> None:
        async with aiockpt.Checkpointer(config, model=MixedModel()) as ckpt:
            await (await ckpt.checkpoint(3))
            assert latest.read_text().strip() == "step-3"
            await (await ckpt.checkpoint(10))
            assert latest.read_text().strip() == "step-10"
            await (await ckpt.checkpoint(5))  # an older step saved later
            assert latest.read_text().strip() == "step-10"

    run(go())
    assert steps_on_disk(config) == [3, 5, 10]


def test_caller_loop_mode_inside_asyncio_run(tmp_path: Path) -> None:
    model = MixedModel()
    config = make_config(tmp_path, use_monitor=False)

    async def go() -> int | None:
        ckpt = aiockpt.Checkpointer(config, model=model)
        handle = await ckpt.checkpoint(7)
        await ckpt.wait()  # drains without awaiting the handle
        assert handle.done()
        info = await handle
        assert info is not None and info.path.name == "step-7"
        fill(model, -1.0)
        step = await ckpt.restore()
        await ckpt.close()
        return step

    expected = clone_state(model.state_dict())
    assert run(go()) == 7
    assert_state_equal(model.state_dict(), expected)
    assert run(go()) == 7  # a second run on a new loop with a new checkpointer


@pytest.mark.parametrize("use_monitor", [True, False])
def test_sync_checkpointer(tmp_path: Path, use_monitor: bool) -> None:
    model = MixedModel()
    expected = clone_state(model.state_dict())
    config = make_config(tmp_path, use_monitor=use_monitor, keep_last=None)
    with aiockpt.SyncCheckpointer(config, model=model) as sync:
        handle = sync.checkpoint(1)
        if not use_monitor:
            # Direct mode: durable before checkpoint() returns.
            assert handle.done()
            assert steps_on_disk(config) == [1]
        info = handle.wait(timeout=30)
        assert info is not None and info.step == 1 and info.path.is_dir()
        fill(model, 5.0)
        sync.checkpoint(2)
        sync.wait()
        assert steps_on_disk(config) == [1, 2]
        assert sync.restore(step=1) == 1
        assert_state_equal(model.state_dict(), expected)
        assert sync.restore() == 2
        assert float_values(model.state_dict()) == {5.0}
    assert sync.stats.committed == 2
    with pytest.raises(aiockpt.CheckpointError, match="closed"):
        sync.checkpoint(3)
    sync.close()  # closing twice is harmless


def test_same_step_twice_while_in_flight(tmp_path: Path) -> None:
    config = make_config(tmp_path, use_monitor=False, max_async=2)

    async def go() -> None:
        async with aiockpt.Checkpointer(config, model=MixedModel()) as ckpt:
            handle = await ckpt.checkpoint(4)
            with pytest.raises(aiockpt.CheckpointInProgressError, match="step 4"):
                await ckpt.checkpoint(4)
            assert await handle is not None
            await (await ckpt.checkpoint(4))  # fine once the first is committed

    run(go())
    assert steps_on_disk(config) == [4]


def test_checkpoint_after_close_raises(tmp_path: Path) -> None:
    async def go() -> None:
        ckpt = aiockpt.Checkpointer(make_config(tmp_path), model=MixedModel())
        await (await ckpt.checkpoint(1))
        await ckpt.close()
        await ckpt.close()
        with pytest.raises(aiockpt.CheckpointError, match="closed"):
            await ckpt.checkpoint(2)

    run(go())


def test_directory_lock_excludes_a_second_writer(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    code = (
        "import aiockpt, sys\n"
        "try:\n"
        f"    aiockpt.SyncCheckpointer(aiockpt.Config(directory={str(config.directory)!r}),"
        " rng=aiockpt.RNGState())\n"
        "except aiockpt.AiockptError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "    sys.exit(3)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with aiockpt.SyncCheckpointer(config, model=MixedModel()) as sync:
        sync.checkpoint(1).wait()
        child = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert child.returncode == 3, child.stdout + child.stderr
        assert child.stdout.startswith("DirectoryLockedError")
        assert f"pid {os.getpid()}" in child.stdout
        # flock is per open file: a second writer in this very process is refused too.
        with pytest.raises(aiockpt.DirectoryLockedError):
            aiockpt.SyncCheckpointer(config, model=MixedModel())
    # Closing releases the lock.
    with aiockpt.SyncCheckpointer(config, model=MixedModel()) as again:
        assert again.restore() == 1


class Exploding:
    class Boom(Exception):
        pass

    def __init__(self) -> None:
        self.armed = True

    def state_dict(self) -> dict[str, Any]:
        if self.armed:
            raise Exploding.Boom("state_dict failed")
        return {"ok": torch.ones(2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize("use_monitor", [True, False])
def test_state_dict_error_propagates_with_its_type(tmp_path: Path, use_monitor: bool) -> None:
    thing = Exploding()
    config = make_config(tmp_path, use_monitor=use_monitor)

    async def go() -> None:
        async with aiockpt.Checkpointer(config, thing=thing) as ckpt:
            with pytest.raises(Exploding.Boom, match="state_dict failed"):
                await ckpt.checkpoint(1)
            assert ckpt.stats.requested == 0
            thing.armed = False
            assert await (await ckpt.checkpoint(1)) is not None

    run(go())
    assert steps_on_disk(config) == [1]


@pytest.mark.parametrize("use_monitor", [True, False])
def test_background_failure_reraises_the_original(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, use_monitor: bool
) -> None:
    # A real failure: the checkpoint directory disappears under a running checkpointer,
    # so the background stage cannot create the checkpoint's temporary directory.
    config = make_config(tmp_path, use_monitor=use_monitor, keep_last=None)
    root = config.directory

    async def go() -> aiockpt.Checkpointer:
        async with aiockpt.Checkpointer(config, model=MixedModel()) as ckpt:
            await (await ckpt.checkpoint(1))

            shutil.rmtree(root)
            handle = await ckpt.checkpoint(2)  # capture still succeeds
            with pytest.raises(aiockpt.BackgroundError, match="step 2") as info:
                await handle
            assert isinstance(info.value.__cause__, FileNotFoundError)
            await ckpt.wait()  # already reported through the handle: not raised twice

            # Not awaited: the failure comes back from wait() ...
            await ckpt.checkpoint(3)
            with pytest.raises(aiockpt.BackgroundError, match="step 3") as info:
                await ckpt.wait()
            assert isinstance(info.value.__cause__, FileNotFoundError)

            # ... or from the next checkpoint().
            handle = await ckpt.checkpoint(4)
            while not handle.done():
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # let done-callbacks record it
            root.mkdir()
            with pytest.raises(aiockpt.BackgroundError, match="step 4") as info:
                await ckpt.checkpoint(5)
            assert isinstance(info.value.__cause__, FileNotFoundError)

            # The cause is gone: checkpoints work again.
            assert await (await ckpt.checkpoint(5)) is not None
            return ckpt

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        ckpt = run(go())
        gc.collect()
    assert ckpt.stats.failed == 3 and ckpt.stats.committed == 2
    assert steps_on_disk(config) == [5]
    # A failure the caller has seen must not come back as asyncio's "never retrieved" noise.
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_on_error_warn_logs_and_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path, use_monitor=False, on_error="warn")

    async def go() -> aiockpt.Checkpointer:
        async with aiockpt.Checkpointer(config, model=MixedModel()) as ckpt:
            shutil.rmtree(config.directory)
            handle = await ckpt.checkpoint(1)
            await ckpt.wait()  # logged, not raised
            with pytest.raises(aiockpt.BackgroundError):
                await handle  # the handle itself still tells the truth
            config.directory.mkdir()
            assert await (await ckpt.checkpoint(2)) is not None
            return ckpt

    with caplog.at_level(logging.WARNING, logger="aiockpt"):
        ckpt = run(go())
    assert (ckpt.stats.failed, ckpt.stats.committed) == (1, 1)
    assert any("step 1 failed" in r.getMessage() for r in caplog.records)
    assert steps_on_disk(config) == [2]


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, use_monitor=False)
    with pytest.raises(TypeError, match="at least one"):
        aiockpt.Checkpointer(config)
    with pytest.raises(TypeError, match="thing=int"):
        aiockpt.Checkpointer(config, thing=3)

    async def go() -> None:
        async with aiockpt.Checkpointer(config, model=MixedModel()) as ckpt:
            for step in (-1, True, 1.0, "3"):
                with pytest.raises(ValueError, match="non-negative int"):
                    await ckpt.checkpoint(step)  # type: ignore[arg-type]

    run(go())
    assert steps_on_disk(config) == []


def test_handle_metrics_are_filled_in(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiockpt")
    model = Wide()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    config = make_config(tmp_path, chunk_size_mb=1, verbose=True)

    async def go() -> aiockpt.CheckpointHandle:
        async with aiockpt.Checkpointer(config, model=model) as ckpt:
            handle = await ckpt.checkpoint(1)
            m = handle.metrics
            assert m.step == 1 and m.nbytes == nbytes and m.capture_ms > 0
            assert m.chunks >= 2 and not m.skipped
            info = await handle
            assert info is not None and info.nbytes == nbytes
            return handle

    m = run(go()).metrics
    assert m.persist_seconds > 0 and m.write_seconds > 0 and m.commit_ms > 0
    assert m.persist_seconds >= m.capture_ms / 1e3
    assert m.queue_wait_ms >= 0 and m.persist_gbps > 0
    assert len(list((config.directory / "step-1").glob("data-*.bin"))) == m.chunks
    assert any("step 1:" in r.getMessage() for r in caplog.records)  # verbose = true
    record = m.to_dict()
    assert record["nbytes"] == nbytes and record["chunks"] == m.chunks
    assert "step 1" in m.summary()


def test_interpreter_exit_finishes_checkpoints_in_flight(tmp_path):
    """A script that checkpoints and exits without close() still commits the checkpoint."""
    import subprocess
    import sys
    import textwrap

    directory = tmp_path / "ckpt"
    script = textwrap.dedent(
        f"""
        import torch, aiockpt
        class Big:
            def __init__(self): self.t = {{"w": torch.arange(4_000_000, dtype=torch.float64)}}
            def state_dict(self): return self.t
            def load_state_dict(self, s): self.t = s
        ckpt = aiockpt.SyncCheckpointer(aiockpt.Config(directory={str(directory)!r},
                                        chunk_size_mb=1), big=Big())
        handle = ckpt.checkpoint(7)
        print("in flight" if not handle.done() else "already done", flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert [info.step for info in aiockpt.list_checkpoints(directory)] == [7]
    state = aiockpt.load(directory / "step-7")
    assert torch.equal(state["big"]["w"], torch.arange(4_000_000, dtype=torch.float64))
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]
