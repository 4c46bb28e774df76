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
from conftest import MixedModel, assert_state_equal, clone_state, make_config, run

import aiockpt


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
