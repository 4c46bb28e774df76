"""Restore: exact resume, step selection, corruption fallback, directory recovery."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    Bag,
    MixedModel,
    assert_state_equal,
    clone_state,
    make_config,
    run,
    tensor_bytes,
)

import aiockpt
from aiockpt._engine.restore import Restorer, RestoreRequest


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    """A few real steps that draw from every RNG (data, dropout, python, numpy)."""
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 8) * (1 + random.random()) + float(np.random.rand())
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def draws() -> tuple[torch.Tensor, float, np.ndarray]:
    return torch.rand(5), random.random(), np.random.rand(3)


def setup(seed: int = 0) -> tuple[MixedModel, torch.optim.Optimizer]:
    model = MixedModel(seed)
    model.scale16.requires_grad_(False)  # Adam on fp16 is not the point here
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


async def save_steps(config: aiockpt.Config, steps: list[int], **objects: Any) -> None:
    async with aiockpt.Checkpointer(config, **objects) as ckpt:
        for step in steps:
            for obj in objects.values():
                if isinstance(obj, torch.nn.Module):
                    with torch.no_grad():
                        for p in obj.parameters():
                            p.fill_(float(step))
            await (await ckpt.checkpoint(step))


def restore(
    config: aiockpt.Config, step: int | None = None, *, sync: bool = False, **objects: Any
) -> int | None:
    if sync:
        with aiockpt.SyncCheckpointer(config, **objects) as checkpointer:
            return checkpointer.restore(step=step)

    async def go() -> int | None:
        async with aiockpt.Checkpointer(config, **objects) as ckpt:
            return await ckpt.restore(step=step)

    return run(go())


def weight(model: torch.nn.Module) -> float:
    return float(model.fc1.weight[0, 0].detach())


@pytest.mark.parametrize("use_monitor", [True, False])
def test_restore_resumes_exactly(tmp_path: Path, use_monitor: bool) -> None:
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    model, opt = setup()
    config = make_config(tmp_path, use_monitor=use_monitor)

    async def go() -> None:
        async with aiockpt.Checkpointer(
            config, model=model, optimizer=opt, rng=aiockpt.RNGState()
        ) as ckpt:
            train(model, opt, 3)
            await (await ckpt.checkpoint(3))
            saved = {"model": clone_state(model.state_dict()), "opt": clone_state(opt.state_dict())}
            after = draws()
            train(model, opt, 4)
            reference = clone_state(model.state_dict())

            # Training went on (and drew random numbers); now go back to step 3.
            assert await ckpt.restore() == 3
            assert_state_equal(model.state_dict(), saved["model"])
            assert_state_equal(opt.state_dict(), saved["opt"])
            again = draws()
            assert torch.equal(again[0], after[0])
            assert again[1] == after[1]
            assert np.array_equal(again[2], after[2])
            # The same four steps from the restored state land on the same bits.
            train(model, opt, 4)
            assert_state_equal(model.state_dict(), reference)

    run(go())


def test_restore_into_fresh_objects(tmp_path: Path) -> None:
    model, opt = setup()
    train(model, opt, 2)
    config = make_config(tmp_path)
    expected_opt = clone_state(opt.state_dict())
    expected_model = clone_state(model.state_dict())

    async def save() -> None:
        async with aiockpt.Checkpointer(config, model=model, optimizer=opt) as ckpt:
            await (await ckpt.checkpoint(2))

    run(save())
    fresh_model, fresh_opt = setup(seed=5)
    assert restore(config, model=fresh_model, optimizer=fresh_opt) == 2
    assert_state_equal(fresh_model.state_dict(), expected_model)
    assert_state_equal(fresh_opt.state_dict(), expected_opt)


def test_restore_a_given_older_step(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=None)
    model = MixedModel()
    run(save_steps(config, [10, 20, 30], model=model))
    assert restore(config, step=20, model=model) == 20
    assert weight(model) == 20.0
    assert restore(config, model=model) == 30
    assert weight(model) == 30.0


def test_restore_with_nothing_saved_returns_none(tmp_path: Path) -> None:
    model = MixedModel()
    before = clone_state(model.state_dict())
    assert restore(make_config(tmp_path), model=model) is None
    assert_state_equal(model.state_dict(), before)


def test_restore_of_a_missing_step_raises(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    model = MixedModel()
    run(save_steps(config, [1, 2], model=model))
    with pytest.raises(aiockpt.NoCheckpointError, match=r"step 7.*\[1, 2\]"):
        restore(config, step=7, model=model)


def test_restore_names_objects_missing_from_the_checkpoint(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    run(save_steps(config, [1], model=MixedModel()))
    with pytest.raises(aiockpt.RestoreError, match="other"):
        restore(config, model=MixedModel(), other=MixedModel())


def data_file_and_tensor_offset(step_dir: Path) -> tuple[Path, int]:
    """A data file and an offset inside a tensor's bytes (not chunk padding)."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    piece = manifest["tensors"][0]["pieces"][0]
    assert piece["length"] > 0
    return step_dir / piece["file"], piece["offset"] + piece["length"] // 2


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def truncate(path: Path, offset: int) -> None:
    os.truncate(path, path.stat().st_size - 1)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped", "truncated"])
def test_corrupt_newest_falls_back_to_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any, sync: bool
) -> None:
    config = make_config(tmp_path, keep_last=None)
    model = MixedModel()
    run(save_steps(config, [1, 2], model=model))
    data_file, offset = data_file_and_tensor_offset(config.directory / "step-2")
    damage(data_file, offset)

    with pytest.raises(aiockpt.CorruptCheckpointError, match=data_file.name) as info:
        aiockpt.load(config.directory / "step-2")
    assert str(data_file) in str(info.value)

    fresh = MixedModel(seed=3)
    with caplog.at_level(logging.WARNING, logger="aiockpt"):
        assert restore(config, sync=sync, model=fresh) == 1
    assert weight(fresh) == 1.0
    assert any(data_file.name in r.getMessage() for r in caplog.records)
    # Asking for the corrupt step itself is an error, not a silent fallback.
    with pytest.raises(aiockpt.CorruptCheckpointError, match=data_file.name):
        restore(config, step=2, sync=sync, model=fresh)
    # load(verify=False) skips checksums but still refuses a file of the wrong size.
    if damage is truncate:
        with pytest.raises(aiockpt.CorruptCheckpointError, match="truncated"):
            aiockpt.load(config.directory / "step-2", verify=False)


def test_every_checkpoint_corrupt_raises(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=None)
    run(save_steps(config, [1, 2], model=MixedModel()))
    for step in (1, 2):
        flip_byte(*data_file_and_tensor_offset(config.directory / f"step-{step}"))
    with pytest.raises(aiockpt.CorruptCheckpointError, match="failed verification") as info:
        restore(config, sync=True, model=MixedModel())
    with pytest.raises(aiockpt.CorruptCheckpointError, match="failed verification") as info:
        restore(config, model=MixedModel())
    assert "step 1:" in str(info.value) and "step 2:" in str(info.value)


def test_missing_manifest_means_not_committed(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=None)
    run(save_steps(config, [1, 2], model=MixedModel()))
    (config.directory / "step-2" / "manifest.json").unlink()
    assert [i.step for i in aiockpt.list_checkpoints(config.directory)] == [1]
    assert restore(config, model=MixedModel()) == 1


def test_list_checkpoints(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=None)
    assert aiockpt.list_checkpoints(config.directory) == []
    run(save_steps(config, [5, 100, 20], model=MixedModel()))
    infos = aiockpt.list_checkpoints(config.directory)
    assert [i.step for i in infos] == [5, 20, 100]
    for info in infos:
        assert info.path == config.directory / f"step-{info.step}"
        on_disk = sum(f.stat().st_size for f in info.path.iterdir())
        assert info.nbytes == on_disk > 0


def test_open_removes_stale_temporaries(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    run(save_steps(config, [1], model=MixedModel()))
    root = config.directory
    for name in (".tmp-step-2-deadbeef", ".trash-step-0-cafebabe"):
        (root / name).mkdir()
        (root / name / "data-r00000-c00000.bin").write_bytes(b"partial")
    (root / "latest.tmp").write_text("step-2\n")

    with aiockpt.SyncCheckpointer(config, model=MixedModel()):
        assert sorted(p.name for p in root.iterdir()) == [".aiockpt.lock", "latest", "step-1"]


def test_interrupted_replace_is_undone_on_open(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=None)
    run(save_steps(config, [5], model=MixedModel()))
    root = config.directory
    os.rename(root / "step-5", root / ".trash-replace-step-5-0a1b2c3d")
    assert aiockpt.list_checkpoints(root) == []

    model = MixedModel(seed=2)
    assert restore(config, model=model) == 5
    assert weight(model) == 5.0
    assert sorted(p.name for p in root.iterdir()) == [".aiockpt.lock", "latest", "step-5"]


def test_replace_leftover_is_dropped_when_the_new_one_landed(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=None)
    run(save_steps(config, [5], model=MixedModel()))
    root = config.directory
    (root / ".trash-replace-step-5-0a1b2c3d").mkdir()
    model = MixedModel(seed=2)
    assert restore(config, model=model) == 5
    assert weight(model) == 5.0
    assert not (root / ".trash-replace-step-5-0a1b2c3d").exists()


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=None)
    model = MixedModel()

    async def go() -> None:
        async with aiockpt.Checkpointer(config, model=model) as ckpt:
            for value in (1.0, 2.0):
                with torch.no_grad():
                    model.fc1.weight.fill_(value)
                await (await ckpt.checkpoint(7))

    run(go())
    assert [i.step for i in aiockpt.list_checkpoints(config.directory)] == [7]
    state = aiockpt.load(config.directory / "step-7")["model"]
    assert torch.equal(state["fc1.weight"], torch.full((16, 8), 2.0))
    assert sorted(p.name for p in config.directory.iterdir()) == [
        ".aiockpt.lock",
        "latest",
        "step-7",
    ]


# -- the read path: planned sequential reads, a pinned ring for device copies ----------------


def save_many(tmp_path: Path, count: int = 300, chunk_mb: float = 1.0) -> tuple[Path, dict]:
    """A checkpoint of ``count`` tensors of assorted sizes and dtypes in a few data files."""
    generator = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(count):
        size = [3, 17, 1000, 4096, 33_333][i % 5]
        value = torch.randn(size, generator=generator)
        tensors[f"t{i:04d}"] = value.to([torch.float32, torch.bfloat16, torch.float64][i % 3])
    tensors["empty"] = torch.empty(0, 4)
    tensors["big"] = torch.randn(600_000, generator=generator)  # larger than a chunk: split
    config = make_config(tmp_path, chunk_size_mb=chunk_mb)
    with aiockpt.SyncCheckpointer(config, bag=Bag(tensors)) as ckpt:
        ckpt.checkpoint(1).wait()
    return config.directory / "step-1", tensors


def test_plan_segments_reads_whole_runs_and_only_wanted_ranges(tmp_path: Path) -> None:
    from aiockpt._engine.reader import read_manifest, tensor_filter
    from aiockpt._engine.restore_io import MAX_GAP, plan_segments

    step_dir, _ = save_many(tmp_path)
    manifest = read_manifest(step_dir)
    records = list(enumerate(manifest.tensors))
    everything = plan_segments(records, limit=1 << 30)
    # A whole checkpoint: each data file's pieces form one run, read in one segment.
    assert len(everything) == len({p.file for _, r in records for p in r.pieces})
    assert sum(len(s.spans) for s in everything) == sum(len(r.pieces) for _, r in records)

    small = plan_segments(records, limit=64 << 10)
    assert len(small) > len(everything)
    for segment in small:
        assert segment.length <= 64 << 10 or len(segment.spans) == 1

    # Every fifth tensor only: the segments cover those pieces and at most small gaps.
    pick = tensor_filter(layers=None, keys=["bag"])
    assert pick is not None
    wanted = [(i, r) for i, r in records if i % 5 == 4 and pick(r)]
    partial = plan_segments(wanted)
    wanted_bytes = sum(r.nbytes for _, r in wanted)
    assert wanted_bytes <= sum(s.length for s in partial) < wanted_bytes + len(partial) * MAX_GAP
    for segment in partial:
        covered = sum(s.length for s in segment.spans)
        assert segment.length - covered <= MAX_GAP * len(segment.spans)


def test_whole_checkpoint_is_read_in_few_large_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiockpt._engine.reader import read_checkpoint

    step_dir, tensors = save_many(tmp_path)
    calls: list[int] = []
    preadv = os.preadv

    def counting(fd: int, buffers: list, offset: int) -> int:
        calls.append(len(buffers))
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    loaded = read_checkpoint(step_dir, threads=2)
    state = loaded.state()["bag"]
    assert_state_equal(state, tensors)
    assert loaded.bytes_read == sum(t.numel() * t.element_size() for t in tensors.values())
    # 302 tensors (one split over several files) in a few calls; the manifest is one more.
    assert len(calls) * 10 < len(tensors)
    assert max(calls) >= 20  # one call scatters into many tensors (and padding between them)


def test_scattered_read_survives_short_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiockpt.storage.fileio import read_scatter

    data = bytes(random.Random(3).randbytes(50_000))
    path = tmp_path / "blob"
    path.write_bytes(data)
    preadv = os.preadv

    def stingy(fd: int, buffers: list, offset: int) -> int:
        # At most 1000 bytes and two buffers per call: reads stop inside buffers.
        room = 1000
        trimmed = []
        for buffer in buffers[:2]:
            trimmed.append(buffer[: min(len(buffer), room)])
            room -= len(trimmed[-1])
            if not room:
                break
        return preadv(fd, trimmed, offset)

    monkeypatch.setattr(os, "preadv", stingy)
    sizes = [1, 0, 700, 2500, 3, 1200 * 3, 17_000]
    buffers = [bytearray(n) for n in sizes]
    fd = os.open(path, os.O_RDONLY)
    try:
        read_scatter(fd, [memoryview(b) for b in buffers], 123)
        assert b"".join(buffers) == data[123 : 123 + sum(sizes)]
        with pytest.raises(EOFError, match="early"):
            read_scatter(fd, [memoryview(bytearray(10))], len(data) - 4)
    finally:
        os.close(fd)


def flip_in_middle_of_a_file(step_dir: Path) -> str:
    """Flip a byte of a tensor in the middle of the largest data file; the tensor's name."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    largest = max(manifest["files"], key=lambda f: f["nbytes"])["name"]
    inside = [
        (p["offset"], t["name"], p)
        for t in manifest["tensors"]
        for p in t["pieces"]
        if p["file"] == largest and p["length"] > 0
    ]
    inside.sort(key=lambda x: x[0])
    _, name, piece = inside[len(inside) // 2]
    flip_byte(step_dir / largest, piece["offset"] + piece["length"] - 1)
    return name.split("/", 1)[1]


def test_corruption_in_the_middle_of_a_sequential_read_is_caught(tmp_path: Path) -> None:
    from aiockpt._engine.reader import read_checkpoint

    step_dir, _ = save_many(tmp_path)
    name = flip_in_middle_of_a_file(step_dir)
    with pytest.raises(aiockpt.CorruptCheckpointError, match=f"tensor 'bag/{name}'.*crc32c"):
        read_checkpoint(step_dir, threads=2)
    read_checkpoint(step_dir, verify=False)  # the sizes are right: only checksums catch it


class DeferredCopies:
    """A transfer whose copies land only when their fence is waited on, like a DMA that
    is still running: a ring that refills a buffer too early delivers the wrong bytes."""

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fences = 0
        self.lock = __import__("threading").Lock()

    def copy(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        with self.lock:
            self.pending.append((destination, source))

    def fence(self) -> Any:
        with self.lock:
            batch, self.pending = self.pending, []
            self.fences += 1

        class Fence:
            def synchronize(self) -> None:
                for destination, source in batch:
                    destination.copy_(source)

        return Fence()

    def finish(self) -> None:
        assert not self.pending


@pytest.mark.parametrize("threads", [1, 3])
def test_pinned_ring_reuses_a_buffer_only_after_its_copy(tmp_path: Path, threads: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from aiockpt._engine.reader import open_data_file, read_manifest
    from aiockpt._engine.restore_io import PinnedRing, SegmentReader, plan_segments

    step_dir, tensors = save_many(tmp_path, count=120)
    manifest = read_manifest(step_dir)
    files = {f.name: open_data_file(step_dir, f) for f in manifest.files}
    try:
        destinations = {
            i: torch.full((r.nbytes,), 0xAB, dtype=torch.uint8)
            for i, r in enumerate(manifest.tensors)
        }
        reader = SegmentReader(step_dir, manifest.tensors, files, destinations)
        # Slots far smaller than the segments: every segment streams through many windows,
        # and the big tensor's pieces cross window boundaries.
        ring = PinnedRing(PinnedRing.carve([torch.empty(3 * 5000, dtype=torch.uint8)], 3, 5000))
        transfer = DeferredCopies()
        segments = plan_segments(enumerate(manifest.tensors), limit=40_000)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda s: reader.staged(s, ring, transfer), segments))
        ring.settle()
        transfer.finish()
    finally:
        for file in files.values():
            file.close()
    assert len(ring) == 3 and transfer.fences > 3 * len(segments)
    for i, record in enumerate(manifest.tensors):
        value = destinations[i].view(record.dtype).view(record.shape)
        assert torch.equal(tensor_bytes(value), tensor_bytes(tensors[record.name.split("/")[1]]))


def test_staged_read_verifies_pieces_split_across_windows(tmp_path: Path) -> None:
    from aiockpt._engine.reader import open_data_file, read_manifest
    from aiockpt._engine.restore_io import HostTransfer, PinnedRing, SegmentReader, plan_segments

    step_dir, _ = save_many(tmp_path, count=20)
    manifest = read_manifest(step_dir)
    big = next(i for i, r in enumerate(manifest.tensors) if r.name == "bag/big")
    piece = manifest.tensors[big].pieces[0]
    flip_byte(step_dir / piece.file, piece.offset + piece.length // 2)
    files = {f.name: open_data_file(step_dir, f) for f in manifest.files}
    try:
        record = manifest.tensors[big]
        destinations = {big: torch.empty(record.nbytes, dtype=torch.uint8)}
        reader = SegmentReader(step_dir, manifest.tensors, files, destinations)
        ring = PinnedRing(PinnedRing.carve([torch.empty(8192, dtype=torch.uint8)], 2, 4096))
        (segment, *rest) = plan_segments([(big, record)])
        assert segment.length > 10 * 4096
        with pytest.raises(aiockpt.CorruptCheckpointError, match=r"'bag/big'.*crc32c"):
            reader.staged(segment, ring, HostTransfer())
        assert reader.failed.is_set()
        for other in rest:  # after a failure the remaining segments are skipped
            reader.staged(other, ring, HostTransfer())
    finally:
        for file in files.values():
            file.close()


def test_restore_without_a_cuda_placement_reads_to_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    placements: list[object] = []
    plan = Restorer.placement

    def spy(self: Restorer, request: RestoreRequest) -> object:
        placement = plan(self, request)
        placements.append(placement)
        return placement

    monkeypatch.setattr(Restorer, "placement", spy)
    model, opt = setup()
    train(model, opt, 1)
    config = make_config(tmp_path)
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=opt) as ckpt:
        ckpt.checkpoint(1).wait()
        assert ckpt.restore() == 1
    assert len(placements) == 1
    if not torch.cuda.is_available():
        assert placements == [None]
