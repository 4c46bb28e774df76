"""GPU behaviour: exact snapshots under mutation with both staging modes, restore onto the GPU."""

from __future__ import annotations

import asyncio

import pytest
import torch

import aiockpt

pytestmark = pytest.mark.gpu


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.BatchNorm1d(1024), torch.nn.Linear(1024, 256)
    ).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer, 2)
    return model, optimizer


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(64, 512, device="cuda")).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    return {
        "model": {k: v.detach().cpu().clone() for k, v in state["model"].items()},
        "optimizer": {
            i: {k: v.detach().cpu().clone() for k, v in s.items()}
            for i, s in state["optimizer"]["state"].items()
        },
    }


@pytest.mark.parametrize("staging", ["gpu", "host"])
def test_snapshot_is_exact_while_training_continues(tmp_path, staging):
    model, optimizer = _model()
    config = aiockpt.Config(directory=tmp_path, staging=staging, chunk_size_mb=1, max_async=2)

    async def scenario() -> dict:
        async with aiockpt.Checkpointer(config, model=model, optimizer=optimizer) as ckpt:
            torch.cuda.synchronize()
            expected = _snapshot(model, optimizer)
            handle = await ckpt.checkpoint(7)
            _train(model, optimizer, 5)  # no sync: mutations race the background copies
            await handle
            return expected

    expected = asyncio.run(scenario())
    loaded = aiockpt.load(tmp_path / "step-7")
    for name, value in expected["model"].items():
        assert torch.equal(loaded["model"][name], value), name
    for index, state in expected["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(loaded["optimizer"]["state"][index][key], value), (index, key)
    assert not torch.equal(model[0].weight.detach().cpu(), expected["model"]["0.weight"])


@pytest.mark.parametrize("staging", ["gpu", "host"])
def test_consecutive_checkpoints_are_each_exact(tmp_path, staging):
    # From the second checkpoint on, the flattening is replayed and the staging copies
    # reuse the views prepared for the layout; every snapshot must still be its own step's.
    model, optimizer = _model()
    config = aiockpt.Config(
        directory=tmp_path, staging=staging, chunk_size_mb=1, max_async=2, keep_last=10
    )

    async def scenario() -> dict:
        expected = {}
        async with aiockpt.Checkpointer(config, model=model, optimizer=optimizer) as ckpt:
            handles = []
            for step in range(6):
                torch.cuda.synchronize()
                expected[step] = _snapshot(model, optimizer)
                handles.append(await ckpt.checkpoint(step))
                _train(model, optimizer, 1)
            for handle in handles:
                await handle
            assert ckpt.stats.replayed == 5
        return expected

    expected = asyncio.run(scenario())
    for step, snapshot in expected.items():
        loaded = aiockpt.load(tmp_path / f"step-{step}")
        for name, value in snapshot["model"].items():
            assert torch.equal(loaded["model"][name], value), (step, name)
        for index, state in snapshot["optimizer"].items():
            for key, value in state.items():
                got = loaded["optimizer"]["state"][index][key]
                assert torch.equal(got, value), (step, index, key)


def test_restore_onto_gpu(tmp_path):
    model, optimizer = _model()
    config = aiockpt.Config(directory=tmp_path, chunk_size_mb=1)
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        ckpt.checkpoint(3).wait()
        expected = _snapshot(model, optimizer)
    fresh, fresh_optimizer = _model()
    _train(fresh, fresh_optimizer, 3)
    with aiockpt.SyncCheckpointer(config, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.restore() == 3
    assert all(p.is_cuda for p in fresh.parameters())
    restored = _snapshot(fresh, fresh_optimizer)
    for name, value in expected["model"].items():
        assert torch.equal(restored["model"][name], value), name
    for index, state in expected["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(restored["optimizer"][index][key], value), (index, key)


@pytest.mark.parametrize("staging", ["gpu", "host"])
def test_gpu_dtypes_round_trip(tmp_path, staging):
    class Holder:
        def __init__(self) -> None:
            base = torch.randn(257, 33, device="cuda")
            self.tensors = {
                "bf16": base.bfloat16(),
                "fp16": base.half(),
                "fp8": base.to(torch.float8_e4m3fn),
                "int64": torch.arange(1000, device="cuda"),
                "bool": base > 0,
                "transposed": base.t(),
                "scalar": torch.tensor(3.5, device="cuda"),
                "empty": torch.empty(0, 4, device="cuda"),
            }

        def state_dict(self) -> dict:
            return self.tensors

        def load_state_dict(self, state: dict) -> None:
            self.tensors = state

    holder = Holder()
    config = aiockpt.Config(directory=tmp_path, staging=staging, chunk_size_mb=0.05)
    with aiockpt.SyncCheckpointer(config, holder=holder) as ckpt:
        ckpt.checkpoint(1).wait()
    loaded = aiockpt.load(tmp_path / "step-1", map_location="cuda")["holder"]
    for name, value in holder.tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].is_cuda
        assert torch.equal(
            loaded[name].view(torch.uint8) if value.dim() else loaded[name],
            value.contiguous().view(torch.uint8) if value.dim() else value,
        ), name


def _adamw() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.BatchNorm1d(1024), torch.nn.Linear(1024, 256)
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def _full_snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    torch.cuda.synchronize()
    return {
        "model": {k: (v.device, v.detach().cpu().clone()) for k, v in model.state_dict().items()},
        "optimizer": {
            (i, k): (v.device, v.detach().cpu().clone())
            for i, s in optimizer.state_dict()["state"].items()
            for k, v in s.items()
        },
    }


def _assert_same(restored: dict, expected: dict) -> None:
    for part in ("model", "optimizer"):
        assert restored[part].keys() == expected[part].keys(), part
        for key, (device, value) in expected[part].items():
            got_device, got = restored[part][key]
            assert got_device == device, (part, key, got_device, device)
            assert got.dtype == value.dtype and torch.equal(got.view(-1), value.view(-1)), key


def _spy_staged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from aiockpt._engine.restore_io import SegmentReader

    calls: list[str] = []
    staged = SegmentReader.staged

    def spy(self, segment, ring, transfer):  # type: ignore[no-untyped-def]
        calls.append(type(transfer).__name__)
        return staged(self, segment, ring, transfer)

    monkeypatch.setattr(SegmentReader, "staged", spy)
    return calls


def test_restore_to_gpu_through_the_pinned_ring_is_exact_and_lean(tmp_path, monkeypatch):
    model, optimizer = _adamw()
    _train(model, optimizer, 2)
    config = aiockpt.Config(directory=tmp_path, chunk_size_mb=1)
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        ckpt.checkpoint(3).wait()
    expected = _full_snapshot(model, optimizer)
    del model, optimizer
    fresh, fresh_optimizer = _adamw()
    _train(fresh, fresh_optimizer, 3)  # state of the same shapes, other values
    staged = _spy_staged(monkeypatch)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with aiockpt.SyncCheckpointer(config, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.restore() == 3
        nbytes = ckpt.stats.last_restore_bytes
    torch.cuda.synchronize()
    assert staged and set(staged) == {"CudaTransfer"}
    _assert_same(_full_snapshot(fresh, fresh_optimizer), expected)
    # One temporary copy of the state at most (each tensor rounded up by the allocator),
    # and none left behind: the optimizer keeps the temporaries as its state instead of
    # the tensors it had.
    tensors = len(expected["model"]) + len(expected["optimizer"])
    assert torch.cuda.max_memory_allocated() - before <= nbytes + 512 * tensors + (1 << 20)
    assert torch.cuda.memory_allocated() - before <= 1 << 20
    _train(fresh, fresh_optimizer, 1)  # the restored state trains


def test_restore_to_gpu_into_a_fresh_optimizer(tmp_path):
    model, optimizer = _adamw()
    _train(model, optimizer, 2)
    config = aiockpt.Config(directory=tmp_path, chunk_size_mb=1)
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        ckpt.checkpoint(2).wait()
    expected = _full_snapshot(model, optimizer)
    fresh, fresh_optimizer = _adamw()  # no optimizer state yet: it follows the parameters
    with aiockpt.SyncCheckpointer(config, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.restore() == 2
    _assert_same(_full_snapshot(fresh, fresh_optimizer), expected)


def test_restore_borrows_the_staging_pool_and_gives_it_back(tmp_path, monkeypatch):
    from aiockpt._engine.memory import StagingMemory

    model, optimizer = _adamw()
    _train(model, optimizer, 2)
    lent: list[int] = []
    lend = StagingMemory.lend_pinned

    def spy(self):  # type: ignore[no-untyped-def]
        buffers = lend(self)
        lent.append(len(buffers))
        return buffers

    monkeypatch.setattr(StagingMemory, "lend_pinned", spy)
    config = aiockpt.Config(directory=tmp_path, chunk_size_mb=1, max_async=1)
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        ckpt.checkpoint(1).wait()
        expected = _full_snapshot(model, optimizer)
        _train(model, optimizer, 2)
        assert ckpt.restore() == 1
        staging = ckpt.staging
        assert staging is not None
        assert staging.pinned and lent and lent[-1] == staging.host_buffers > 0
        assert staging.host_buffers_free == staging.host_buffers
        _assert_same(_full_snapshot(model, optimizer), expected)
        _train(model, optimizer, 1)
        ckpt.checkpoint(2).wait()  # the pool serves checkpoints again
        expected = _full_snapshot(model, optimizer)
        assert ckpt.restore() == 2
        _assert_same(_full_snapshot(model, optimizer), expected)


def test_restore_reads_to_host_when_the_gpu_is_full(tmp_path, monkeypatch):
    model, optimizer = _adamw()
    _train(model, optimizer, 2)
    config = aiockpt.Config(directory=tmp_path, chunk_size_mb=1)
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        ckpt.checkpoint(1).wait()
    expected = _full_snapshot(model, optimizer)
    fresh, fresh_optimizer = _adamw()
    _train(fresh, fresh_optimizer, 1)
    staged = _spy_staged(monkeypatch)
    monkeypatch.setattr("aiockpt._engine.reader.gpu_room", lambda device: 0)
    with aiockpt.SyncCheckpointer(config, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.restore() == 1
    assert not staged
    _assert_same(_full_snapshot(fresh, fresh_optimizer), expected)


def test_corrupt_checkpoint_read_to_gpu_falls_back_untouched(tmp_path):
    import json

    model, optimizer = _adamw()
    _train(model, optimizer, 1)
    config = aiockpt.Config(directory=tmp_path, chunk_size_mb=1, keep_last=None)
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        ckpt.checkpoint(1).wait()
        expected = _full_snapshot(model, optimizer)
        _train(model, optimizer, 1)
        ckpt.checkpoint(2).wait()
    manifest = json.loads((tmp_path / "step-2" / "manifest.json").read_text())
    piece = manifest["tensors"][0]["pieces"][0]
    with (tmp_path / "step-2" / piece["file"]).open("r+b") as fh:
        fh.seek(piece["offset"] + piece["length"] // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 1]))
    fresh, fresh_optimizer = _adamw()
    _train(fresh, fresh_optimizer, 1)
    untouched = _full_snapshot(fresh, fresh_optimizer)
    with aiockpt.SyncCheckpointer(config, model=fresh, optimizer=fresh_optimizer) as ckpt:
        with pytest.raises(aiockpt.CorruptCheckpointError, match=piece["file"]):
            ckpt.restore(step=2)
        # Verified on the host before anything is loaded: the objects are as they were.
        _assert_same(_full_snapshot(fresh, fresh_optimizer), untouched)
        assert ckpt.restore() == 1
    _assert_same(_full_snapshot(fresh, fresh_optimizer), expected)


class _Holder:
    """A Stateful over a plain dict, for custom state that holds CUDA values."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


@pytest.mark.parametrize("staging", ["gpu", "host"])
def test_cuda_views_and_exact_types_round_trip(tmp_path, staging):
    """Conjugate and negative views spanning chunks are stored as their values, and a
    Parameter, a grad-requiring tensor and a sparse tensor on the GPU keep their types, with
    both staging modes (gpu staging copies with one batched call per dtype)."""
    torch.manual_seed(3)
    z = torch.randn(300_000, dtype=torch.complex64, device="cuda")  # 2.4 MB: spans 1 MB chunks
    real = torch.randn(600_000, device="cuda")
    dense = torch.zeros(64, 64, device="cuda")
    dense[3, 5], dense[40, 7] = 1.5, -2.0
    state = {
        "conj": z.conj(),
        "neg": torch._neg_view(real),
        "param": torch.nn.Parameter(torch.randn(33, 17, device="cuda")),
        "grad": torch.randn(9, device="cuda", requires_grad=True),
        "coo": dense.to_sparse(),
        "csr": dense.to_sparse_csr(),
        "bf16": torch.randn(1000, device="cuda").to(torch.bfloat16),
    }
    expected = {
        "conj": z.conj().resolve_conj().cpu(),
        "neg": (-real).cpu(),
        "param": state["param"].detach().cpu(),
        "grad": state["grad"].detach().cpu(),
        "coo": dense.to_sparse().cpu(),
        "csr": dense.to_sparse_csr().cpu(),
        "bf16": state["bf16"].cpu(),
    }
    config = aiockpt.Config(directory=tmp_path, staging=staging, chunk_size_mb=1)
    holder = _Holder(state)
    with aiockpt.SyncCheckpointer(config, bag=holder) as ckpt:
        ckpt.checkpoint(1).wait()
        ckpt.checkpoint(2).wait()  # the replayed structure gives the same result
    for step in (1, 2):
        loaded = aiockpt.load(tmp_path / f"step-{step}")["bag"]
        assert torch.equal(loaded["conj"], expected["conj"])
        assert not loaded["conj"].is_conj()
        assert torch.equal(loaded["neg"], expected["neg"])
        assert type(loaded["param"]) is torch.nn.Parameter
        assert torch.equal(loaded["param"].detach(), expected["param"])
        assert loaded["grad"].requires_grad
        assert torch.equal(loaded["grad"].detach(), expected["grad"])
        assert loaded["coo"].layout == torch.sparse_coo
        assert torch.equal(loaded["coo"].to_dense(), expected["coo"].to_dense())
        assert loaded["csr"].layout == torch.sparse_csr
        assert torch.equal(loaded["csr"].to_dense(), expected["csr"].to_dense())
        assert loaded["bf16"].dtype == torch.bfloat16
        assert torch.equal(loaded["bf16"], expected["bf16"])
