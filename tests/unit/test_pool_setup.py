"""The host pool: sized to the state, set up in the background, never a deadlock when small.

On CPU the pool is mapped and filled in (not pinned) by the same background thread the GPU
path pins with, so the waiting, the sizing and the capture in pieces are exercised here;
tests/gpu/test_pool_gpu.py covers the pinning itself.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch
from conftest import Bag, assert_state_equal, clone_state, make_config, run

import aiockpt
from aiockpt._engine import hostpool
from aiockpt._engine.layout import plan_layout
from aiockpt._engine.memory import MAP_NOW_BYTES, StagingMemory, covers, pool_sizes
from aiockpt._engine.presize import estimate_chunk_sizes, estimate_device_bytes
from aiockpt._engine.staging import Capturer

MIB = 2**20


def uneven_state(count: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of many sizes, none a multiple of the chunk size."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"t{i}": torch.randn(int(torch.randint(1_000, 90_000, (1,), generator=generator)))
        for i in range(count)
    }


# -- sizing -----------------------------------------------------------------------------


def test_chunks_are_full_so_a_ratio_of_one_pins_the_state_and_no_more() -> None:
    state = uneven_state()
    tensors, names = list(state.values()), list(state)
    layout = plan_layout(tensors, names, chunk_bytes=256 * 1024)
    sizes = [c.nbytes for c in layout.chunks]
    assert all(size == 256 * 1024 for size in sizes[:-1])
    pool = sum(hostpool.page_rounded(s) for s in pool_sizes(sizes, 1.0))
    assert layout.nbytes <= pool <= 1.02 * layout.nbytes
    # Cut at tensor boundaries and sized to the largest chunk, the same state needed more.
    assert len(sizes) * max(sizes) < pool + 256 * 1024


def test_pool_sizes_follow_the_ratio_in_whole_sets_and_largest_chunks() -> None:
    chunks = [100, 100, 100, 40]
    assert pool_sizes(chunks, 1.0) == chunks
    assert sorted(pool_sizes(chunks, 2.0)) == sorted(chunks * 2)
    assert pool_sizes(chunks, 0.25) == [100]
    assert pool_sizes(chunks, 0.01) == [100]  # never empty: one buffer fits any chunk
    assert sorted(pool_sizes(chunks, 1.5)) == sorted([*chunks, 100, 100])
    assert pool_sizes([], 1.0) == []
    # A fraction of the chunks' count is rounded down: the pool stays within the ratio
    # (17 chunks at 0.25 get 4 buffers, not 5).
    seventeen = [64] * 16 + [8]
    assert pool_sizes(seventeen, 0.25) == [64] * 4
    assert sum(pool_sizes(seventeen, 0.25)) <= 0.25 * sum(seventeen) + 64
    assert covers([100, 40], [40, 100]) and not covers([100, 40], [100, 100])
    assert not covers([100], [10, 10])


def test_the_guess_at_construction_matches_the_state_after_the_first_step() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guessed = estimate_device_bytes({"model": model, "optimizer": optimizer})
    model(torch.randn(4, 300)).sum().backward()
    optimizer.step()
    found = estimate_device_bytes({"model": model, "optimizer": optimizer})
    assert guessed == found
    chunks = estimate_chunk_sizes({"model": model, "optimizer": optimizer}, lambda _: 65536)
    assert sum(chunks["cpu"]) == found["cpu"] and max(chunks["cpu"]) == 65536


def test_other_objects_are_not_asked_for_their_state_at_construction() -> None:
    class Loud:
        def state_dict(self) -> dict[str, object]:
            raise AssertionError("state_dict() called at construction")

        def load_state_dict(self, state: dict[str, object]) -> None:
            pass

    assert estimate_device_bytes({"loud": Loud()}) == {}


# -- the background filler ----------------------------------------------------------------


def test_a_large_pool_is_mapped_off_the_calling_thread_and_waited_for() -> None:
    async def scenario() -> None:
        memory = StagingMemory(max_async=1)
        size = MAP_NOW_BYTES  # two of them: over the size mapped on the calling thread
        memory.plan_host([size, size], pin=False)
        assert memory.host_nbytes == 2 * size
        first = await memory.take_host_buffer(size)
        second = await memory.take_host_buffer(size)
        assert first is not second and first.capacity == second.capacity == size
        assert memory.host_ready_nbytes == 2 * size
        first.data[-1] = 7  # mapped, faulted in and writable
        await memory.give_back([first, second])
        memory.release()

    run(scenario())


def test_a_new_plan_keeps_the_buffers_that_fit_and_drops_the_rest() -> None:
    memory = StagingMemory(max_async=1)
    memory.plan_host([8192, 8192, 4096], pin=False)
    before = {id(b) for b in memory._buffers}
    memory.plan_host([8192, 8192, 12288], pin=False)
    after = memory._buffers
    kept = [b for b in after if id(b) in before]
    assert sorted(b.capacity for b in kept) == [8192, 8192]
    assert sorted(b.capacity for b in after) == [8192, 8192, 12288]
    assert memory.host_nbytes == 8192 * 2 + 12288
    memory.release()


def test_a_pool_the_kernel_refuses_fails_the_checkpoint_with_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(nbytes: int, *, pin: bool) -> hostpool.MappedMemory:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr("aiockpt._engine.memory.map_host_memory", refuse)
    monkeypatch.setattr("aiockpt._engine.hostpool.map_host_memory", refuse)
    config = make_config(tmp_path)
    with aiockpt.SyncCheckpointer(config, bag=Bag({"w": torch.ones(8)})) as ckpt:
        with pytest.raises(aiockpt.CheckpointError, match="pinned_ratio") as caught:
            ckpt.checkpoint(1)
        assert isinstance(caught.value.__cause__, OSError)
    assert aiockpt.list_checkpoints(config.directory) == []


def test_a_module_given_to_the_constructor_starts_the_pool_before_any_checkpoint(
    tmp_path: Path,
) -> None:
    model = torch.nn.Linear(4096, 4096)  # 64 MiB of weights: mapped in the background
    optimizer = torch.optim.Adam(model.parameters())
    config = make_config(tmp_path, chunk_size_mb=16)
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        early = ckpt.staging  # set up before any checkpoint, from the guess
        assert early is not None and ckpt.layout is None and early.modes == {}
        planned = early.host_pool_bytes
        assert planned >= 3 * 64 * MIB  # weights and Adam's two moments, guessed
        model(torch.randn(2, 4096)).sum().backward()
        optimizer.step()
        ckpt.checkpoint(1).wait()
        staging = ckpt.staging
        layout = ckpt.layout
        assert staging is not None and layout is not None
        assert staging.host_pool_bytes == planned  # the guess was the state: nothing redone
        assert staging.host_pool_ready_bytes == staging.host_pool_bytes
        assert staging.host_pool_bytes <= 1.02 * layout.nbytes
        expected = clone_state(model.state_dict())
    assert_state_equal(aiockpt.load(config.directory / "step-1")["model"], expected)


# -- a pool smaller than the state ---------------------------------------------------------


@pytest.mark.parametrize(
    ("use_monitor", "ratio"), [(True, 0.1), (False, 0.1), (True, 0.01), (False, 0.01)]
)
def test_a_small_pool_captures_cpu_state_in_pieces_without_deadlock(
    tmp_path: Path, use_monitor: bool, ratio: float, caplog: pytest.LogCaptureFixture
) -> None:
    state = uneven_state(count=30, seed=1)
    config = make_config(
        tmp_path,
        chunk_size_mb=0.25,
        pinned_ratio=ratio,  # 0.01: a single buffer for every chunk of two checkpoints
        max_async=2,
        keep_last=5,
        use_monitor=use_monitor,
    )
    bag = Bag(state)
    saved: dict[int, object] = {}
    with (
        caplog.at_level(logging.WARNING, logger="aiockpt"),
        aiockpt.SyncCheckpointer(config, bag=bag) as ckpt,
    ):
        handles = []
        for step in range(1, 4):
            for tensor in state.values():
                tensor.add_(1.0)
            handles.append(ckpt.checkpoint(step))
            saved[step] = clone_state(state)
        for handle in handles:
            handle.wait()
        layout, staging = ckpt.layout, ckpt.staging
        assert layout is not None and staging is not None
        assert layout.chunks > 4 * staging.host_buffers
        assert all(h.metrics.captured_in_pieces > 0 for h in handles)
        assert staging.in_flight == 0 and staging.host_buffers_free == staging.host_buffers
    said = [r for r in caplog.records if "captured to host memory" in r.getMessage()]
    assert len(said) == 1 and "pinned_ratio" in said[0].getMessage()
    for step in range(1, 4):
        loaded = aiockpt.load(config.directory / f"step-{step}")["bag"]
        assert_state_equal(loaded, saved[step])


def test_a_capture_in_pieces_that_fails_leaves_nothing_and_frees_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Capturer.capture_piece
    calls = {"n": 0}

    def capture_piece(self: Capturer, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("copy into the pool failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Capturer, "capture_piece", capture_piece)
    state = uneven_state(count=20, seed=2)
    config = make_config(tmp_path, chunk_size_mb=0.25, pinned_ratio=0.2, max_async=1)
    with aiockpt.SyncCheckpointer(config, bag=Bag(state)) as ckpt:
        with pytest.raises(RuntimeError, match="copy into the pool failed"):
            ckpt.checkpoint(1)
        assert ckpt.checkpoint(2).wait() is not None
        ckpt.wait()  # the failed one is not reported again
        staging = ckpt.staging
        assert staging is not None and staging.host_buffers_free == staging.host_buffers
    assert [i.step for i in aiockpt.list_checkpoints(config.directory)] == [2]
    assert not [p for p in config.directory.iterdir() if "step-1" in p.name]


def test_copy_tasks_take_buffers_in_the_order_they_asked() -> None:
    async def scenario() -> list[int]:
        memory = StagingMemory(max_async=1)
        memory.resize_host(4096, 1, pin=False)
        held = await memory.take_host_buffer()
        order: list[int] = []

        async def copy(number: int) -> None:
            buffer = await memory.take_host_buffer()
            order.append(number)
            await asyncio.sleep(0)
            await memory.give_back([buffer])

        waiting = [asyncio.ensure_future(copy(n)) for n in range(5)]
        await asyncio.sleep(0)
        await memory.give_back([held])
        await asyncio.gather(*waiting)
        return order

    assert run(scenario()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("use_monitor", [True, False])
def test_a_checkpoint_right_after_construction_waits_for_its_buffers_and_is_exact(
    tmp_path: Path, use_monitor: bool
) -> None:
    torch.manual_seed(3)
    model = torch.nn.Linear(2048, 4096)  # 32 MiB: mapped on the filler thread
    expected = clone_state(model.state_dict())
    config = make_config(tmp_path, chunk_size_mb=4, use_monitor=use_monitor)
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        handle = ckpt.checkpoint(1)  # CPU state: the capture copies into the pool
        with torch.no_grad():
            model.weight.add_(1.0)  # after the capture: not in the checkpoint
        assert handle.wait() is not None
        staging = ckpt.staging
        assert staging is not None and staging.host_pool_ready_bytes == staging.host_pool_bytes
    assert_state_equal(aiockpt.load(config.directory / "step-1")["model"], expected)
