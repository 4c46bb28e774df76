"""Admission: on the caller's thread when there is room, on the loop when it must wait.

The rules kept from the loop-only design: at most max_async checkpoints in flight, a
staging buffer is never handed out twice, a waiting admission is not overtaken, and
commits happen in admission order.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from conftest import Bag, make_config, run

import aiockpt
from aiockpt._engine.memory import Admission, StagingMemory
from aiockpt._engine.pipeline import Pipeline
from aiockpt._engine.staging import Capturer


def pool(max_async: int, buffers: int) -> StagingMemory:
    memory = StagingMemory(max_async=max_async)
    memory.resize_host(4096, buffers, pin=False)
    return memory


def test_admit_now_takes_what_is_free_and_nothing_more() -> None:
    memory = pool(max_async=2, buffers=3)
    first = memory.admit_now(set(), [0, 1])
    assert first is not None and sorted(first.host) == [0, 1]
    assert memory.admit_now(set(), [0, 1]) is None  # one buffer left
    second = memory.admit_now(set(), [0])
    assert second is not None and memory.in_flight == 2
    assert memory.admit_now(set(), []) is None  # no in-flight place left
    taken = {id(b) for a in (first, second) for b in a.host.values()}
    assert len(taken) == 3


def test_a_queued_admission_is_not_overtaken() -> None:
    async def scenario() -> None:
        memory = pool(max_async=1, buffers=2)
        held = memory.admit_now(set(), [0])
        assert held is not None
        queued = asyncio.ensure_future(memory.admit(set(), [0], block=True))
        await asyncio.sleep(0)
        assert not queued.done()
        await memory.give_back(held.host.values(), finished=True)
        # Everything is free again, but the queued admission was first.
        assert memory.admit_now(set(), [0]) is None
        assert not memory.would_admit(set(), 1)
        assert await memory.admit(set(), [0], block=False) is None
        admitted = await queued
        assert isinstance(admitted, Admission) and memory.in_flight == 1
        await memory.give_back(admitted.host.values(), finished=True)
        assert memory.admit_now(set(), [0]) is not None

    run(scenario())


def test_queued_admissions_are_served_in_order() -> None:
    async def scenario() -> None:
        memory = pool(max_async=1, buffers=1)
        assert memory.admit_now(set(), []) is not None
        order: list[str] = []

        async def wait(name: str) -> None:
            await memory.admit(set(), [], block=True)
            order.append(name)

        first = asyncio.ensure_future(wait("first"))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(wait("second"))
        await asyncio.sleep(0)
        await memory.give_back(finished=True)
        await first
        await asyncio.sleep(0.01)
        assert order == ["first"] and not second.done()
        await memory.give_back(finished=True)
        await second
        assert order == ["first", "second"]

    run(scenario())


def test_a_queued_admission_that_gives_up_lets_the_next_one_in() -> None:
    async def scenario() -> None:
        memory = pool(max_async=2, buffers=1)
        held = memory.admit_now(set(), [0])
        assert held is not None
        first = asyncio.ensure_future(memory.admit(set(), [0], block=True))  # needs the buffer
        await asyncio.sleep(0)
        second = asyncio.ensure_future(memory.admit(set(), [], block=True))  # fits, but queues
        await asyncio.sleep(0)
        assert not second.done()
        first.cancel()
        admitted = await asyncio.wait_for(second, timeout=5)
        assert admitted is not None and memory.in_flight == 2

    run(scenario())


def test_host_buffers_go_to_a_waiting_copy_before_a_new_admission() -> None:
    async def scenario() -> None:
        memory = pool(max_async=3, buffers=1)
        held = memory.admit_now(set(), [0])
        assert held is not None
        copy_task = asyncio.ensure_future(memory.take_host_buffer())
        await asyncio.sleep(0)
        await memory.give_back(held.host.values(), finished=True)
        assert memory.admit_now(set(), [0]) is None  # the copy task waits for that buffer
        assert memory.admit_now(set(), []) is not None  # a GPU-staged admission needs none
        await copy_task

    run(scenario())


def test_admissions_from_another_thread_never_oversubscribe() -> None:
    memory = pool(max_async=3, buffers=4)
    loop = asyncio.new_event_loop()
    errors: list[str] = []
    admitted = 0

    def caller() -> None:
        nonlocal admitted
        for _ in range(3000):
            admission = memory.admit_now(set(), [0, 1])
            if admission is None:
                continue
            admitted += 1
            if memory.in_flight > 3:
                errors.append(f"{memory.in_flight} in flight")
            coro = memory.give_back(admission.host.values(), finished=True)
            asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def copies() -> None:
        # Copy tasks take and give back buffers on the loop meanwhile.
        for _ in range(3000):
            buffer = await memory.take_host_buffer()
            await asyncio.sleep(0)
            await memory.give_back([buffer])

    thread = threading.Thread(target=caller)
    loop_thread = threading.Thread(target=loop.run_forever)
    loop_thread.start()
    thread.start()
    asyncio.run_coroutine_threadsafe(copies(), loop).result()
    thread.join()
    loop.call_soon_threadsafe(loop.stop)
    loop_thread.join()
    loop.close()
    assert not errors
    assert admitted > 0
    assert memory.in_flight == 0 and memory.would_admit(set(), 4)


class Counting:
    """Counts how often admission had to go to the event loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = Pipeline.admit

        async def admit(pipeline: Pipeline, capturer: Capturer, *, block: bool):  # type: ignore[no-untyped-def]
            self.calls += 1
            return await original(pipeline, capturer, block=block)

        monkeypatch.setattr(Pipeline, "admit", admit)


@pytest.mark.parametrize("use_monitor", [True, False])
def test_a_free_pipeline_admits_without_the_loop(
    tmp_path: Path, use_monitor: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(monkeypatch)
    config = make_config(tmp_path, use_monitor=use_monitor)
    with aiockpt.SyncCheckpointer(config, bag=Bag({"w": torch.ones(64)})) as ckpt:
        for step in range(4):
            handle = ckpt.checkpoint(step)
            assert handle.metrics.queue_wait_ms >= 0
            handle.wait()
    assert counting.calls == 0
    assert [i.step for i in aiockpt.list_checkpoints(config.directory)] == [1, 2, 3]


def test_a_full_pipeline_waits_on_the_loop_and_commits_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = Counting(monkeypatch)
    config = make_config(tmp_path, max_async=1, keep_last=10)
    bag = Bag({"w": torch.zeros(1 << 16)})

    async def scenario() -> list[int]:
        async with aiockpt.Checkpointer(config, bag=bag) as ckpt:
            handles = []
            for step in range(5):
                bag.state["w"].fill_(step)
                handles.append(await ckpt.checkpoint(step))
            infos = [await h for h in handles]
            return [info.step for info in infos if info is not None]

    assert run(scenario()) == [0, 1, 2, 3, 4]
    assert counting.calls >= 1  # at least one request found the only place taken
    steps = [info.step for info in aiockpt.list_checkpoints(config.directory)]
    assert steps == [0, 1, 2, 3, 4]
    latest = aiockpt.load(config.directory / "step-4")["bag"]["w"]
    assert torch.equal(latest, torch.full((1 << 16,), 4.0))


@pytest.mark.parametrize("use_monitor", [True, False])
def test_a_failed_capture_gives_its_admission_back(
    tmp_path: Path, use_monitor: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Capturer.capture
    failures = iter([True])

    def capture(self: Capturer, *args, **kwargs):  # type: ignore[no-untyped-def]
        if next(failures, False):
            raise RuntimeError("staging copy failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Capturer, "capture", capture)
    config = make_config(tmp_path, use_monitor=use_monitor, max_async=1)
    with aiockpt.SyncCheckpointer(config, bag=Bag({"w": torch.ones(8)})) as ckpt:
        with pytest.raises(RuntimeError, match="staging copy failed"):
            ckpt.checkpoint(1)
        # The only in-flight place came back, and the commit chain does not wait for step 1.
        assert ckpt.checkpoint(2).wait() is not None
        staging = ckpt.staging
        assert staging is not None and staging.in_flight == 0
    assert [i.step for i in aiockpt.list_checkpoints(config.directory)] == [2]
