"""The host pool on a GPU: pinned by registration in the background, bounded, exact.

Run on a CUDA machine: ``pytest -m gpu tests/gpu/test_pool_gpu.py``. No timing is
asserted: what the first checkpoint and the pinning cost is measured by ``aiockpt bench``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import torch

import aiockpt
from aiockpt._engine.hostpool import map_host_memory

pytestmark = pytest.mark.gpu

MIB = 2**20


def _model(width: int = 2048, layers: int = 4) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers))).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    width = model[0].in_features
    for _ in range(steps):
        model(torch.randn(32, width, device="cuda")).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _host_copy(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": {
            i: {k: v.detach().cpu().clone() for k, v in s.items()}
            for i, s in optimizer.state_dict()["state"].items()
        },
    }


def _assert_saved(path: Path, expected: dict) -> None:
    loaded = aiockpt.load(path)
    for name, value in expected["model"].items():
        assert torch.equal(loaded["model"][name], value), name
    for index, state in expected["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(loaded["optimizer"]["state"][index][key], value), (index, key)


def _wait_until_ready(ckpt: aiockpt.SyncCheckpointer, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        staging = ckpt.staging
        if staging is not None and staging.host_pool_ready_bytes == staging.host_pool_bytes:
            return
        time.sleep(0.05)
    raise AssertionError("the host pool was not ready in time")


def test_registered_memory_is_page_locked_and_copies_exactly() -> None:
    mapped = map_host_memory(64 * MIB + 123, pin=True)
    try:
        assert mapped.pinned and mapped.data.is_pinned()
        assert mapped.data.numel() % 4096 == 0 and mapped.data.numel() >= 64 * MIB + 123
        source = torch.randint(0, 255, (64 * MIB,), dtype=torch.uint8, device="cuda")
        view = mapped.data[: 64 * MIB]
        view.copy_(source, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(view, source.cpu())
    finally:
        mapped.release()
    assert not mapped.pinned and not mapped.data.is_pinned()  # unregistered, still mapped


def test_the_pool_is_pinned_from_construction_and_the_first_checkpoint_keeps_it(
    tmp_path: Path,
) -> None:
    model, optimizer = _model()  # ~64 MiB of weights, Adam's moments not created yet
    config = aiockpt.Config(directory=tmp_path, chunk_size_mb=16, staging="gpu")
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        early = ckpt.staging
        assert early is not None and early.pinned
        _wait_until_ready(ckpt)
        planned = early.host_pool_bytes
        _train(model, optimizer, 2)
        torch.cuda.synchronize()
        expected = _host_copy(model, optimizer)
        handle = ckpt.checkpoint(1)
        _train(model, optimizer, 3)  # the snapshot must not see these
        handle.wait()
        staging, layout = ckpt.staging, ckpt.layout
        assert staging is not None and layout is not None
        # The guess (weights + two moments per parameter) was the state: nothing re-pinned.
        assert staging.host_pool_bytes == planned
        assert staging.host_pool_bytes <= 1.02 * layout.nbytes
        assert staging.modes == {"cuda:0": "gpu", "cpu": "cpu"} or staging.modes == {
            "cuda:0": "gpu"
        }
    _assert_saved(tmp_path / "step-1", expected)


def test_a_checkpoint_before_the_pool_is_ready_is_exact(tmp_path: Path) -> None:
    model, optimizer = _model(width=4096, layers=4)  # ~256 MiB x 3: seconds of pinning
    _train(model, optimizer, 1)
    config = aiockpt.Config(directory=tmp_path, chunk_size_mb=32, staging="gpu", max_async=2)

    async def scenario() -> dict:
        async with aiockpt.Checkpointer(config, model=model, optimizer=optimizer) as ckpt:
            torch.cuda.synchronize()
            expected = _host_copy(model, optimizer)
            handle = await ckpt.checkpoint(1)  # the pool is still being pinned
            _train(model, optimizer, 3)
            await handle
            return expected

    _assert_saved(tmp_path / "step-1", asyncio.run(scenario()))


@pytest.mark.parametrize("staging", ["gpu", "host"])
def test_a_quarter_pool_streams_every_checkpoint_exactly(
    tmp_path: Path, staging: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, optimizer = _model()
    _train(model, optimizer, 1)
    config = aiockpt.Config(
        directory=tmp_path,
        chunk_size_mb=8,
        staging=staging,
        pinned_ratio=0.25,
        max_async=2,
        keep_last=5,
    )
    snapshots = {}
    with (
        caplog.at_level(logging.WARNING, logger="aiockpt"),
        aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt,
    ):
        handles = []
        for step in range(1, 4):
            torch.cuda.synchronize()
            snapshots[step] = _host_copy(model, optimizer)
            handles.append(ckpt.checkpoint(step))
            _train(model, optimizer, 2)
        for handle in handles:
            handle.wait()
        staging_summary, layout = ckpt.staging, ckpt.layout
        assert staging_summary is not None and layout is not None
        assert staging_summary.host_pool_bytes <= 0.3 * layout.nbytes + 16 * MIB
        in_pieces = [h.metrics.captured_in_pieces for h in handles]
    said = [r for r in caplog.records if "captured to host memory" in r.getMessage()]
    if staging == "gpu":
        # The GPU staging buffer holds the snapshot: chunks stream through the ring.
        assert in_pieces == [0, 0, 0] and not said
    else:
        # Host staging must copy everything before returning: it does so in pieces.
        assert all(n > 0 for n in in_pieces) and len(said) == 1
    for step, expected in snapshots.items():
        _assert_saved(tmp_path / f"step-{step}", expected)
