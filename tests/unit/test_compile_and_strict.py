"""Compiled modules checkpoint under their eager names; ``strict=False`` restores load what
matches and report the rest; a Trainer resumes only some objects when asked."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import make_config, run
from torch import nn

import aiockpt
from aiockpt._engine.reader import read_manifest
from aiockpt.errors import MissingStateError, StateMismatchError


def _net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


class _Holder(nn.Module):
    """A model that keeps one of its blocks compiled."""

    def __init__(self, seed: int, compiled: bool) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(3, 4)
        block = nn.Linear(4, 4)
        self.block = torch.compile(block, backend="eager") if compiled else block


def _compiled(module: nn.Module) -> nn.Module:
    compiled = torch.compile(module, backend="eager")
    assert isinstance(compiled, nn.Module)
    return compiled


def _save(tmp_path: Path, **objects: object) -> aiockpt.Config:
    config = make_config(tmp_path)
    with aiockpt.SyncCheckpointer(config, **objects) as ckpt:
        ckpt.checkpoint(1).wait()
    return config


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _saved_names(config: aiockpt.Config) -> set[str]:
    return {record.name for record in read_manifest(config.directory / "step-1").tensors}


# -- torch.compile -----------------------------------------------------------------------


def test_compiled_module_is_saved_under_eager_names(tmp_path: Path) -> None:
    model = _compiled(_net(0))
    model(torch.randn(5, 4))  # really compiled and run, running stats moved
    config = _save(tmp_path, model=model)
    names = _saved_names(config)
    assert "model/0.weight" in names and "model/1.running_mean" in names
    assert not any("_orig_mod" in name for name in names)
    state = aiockpt.load(config.directory / "step-1")
    assert torch.equal(state["model"]["0.weight"], model.state_dict()["_orig_mod.0.weight"])


def test_compiled_checkpoint_restores_into_eager_model(tmp_path: Path) -> None:
    source = _compiled(_net(0))
    source(torch.randn(5, 4))
    config = _save(tmp_path, model=source)
    eager = _net(1)
    assert not _same(eager, source._orig_mod)
    with aiockpt.SyncCheckpointer(config, model=eager) as ckpt:
        assert ckpt.restore() == 1
    assert _same(eager, source._orig_mod)


def test_eager_checkpoint_restores_into_compiled_model(tmp_path: Path) -> None:
    source = _net(0)
    config = _save(tmp_path, model=source)
    target = _compiled(_net(1))
    with aiockpt.SyncCheckpointer(config, model=target) as ckpt:
        assert ckpt.restore() == 1
    assert _same(target._orig_mod, source)
    # The compiled wrapper still runs with the restored values.
    x = torch.randn(3, 4)
    source.eval(), target.eval()
    assert torch.equal(target(x), source(x))


def test_nested_compiled_submodule_round_trips_both_ways(tmp_path: Path) -> None:
    compiled_source = _Holder(0, compiled=True)
    assert "block._orig_mod.weight" in compiled_source.state_dict()
    config = _save(tmp_path / "a", model=compiled_source)
    assert "model/block.weight" in _saved_names(config)
    eager = _Holder(1, compiled=False)
    with aiockpt.SyncCheckpointer(config, model=eager) as ckpt:
        ckpt.restore()
    assert torch.equal(eager.block.weight, compiled_source.block.weight)
    assert torch.equal(eager.head.bias, compiled_source.head.bias)

    eager_source = _Holder(2, compiled=False)
    config = _save(tmp_path / "b", model=eager_source)
    compiled = _Holder(3, compiled=True)
    with aiockpt.SyncCheckpointer(config, model=compiled) as ckpt:
        ckpt.restore()
    assert torch.equal(compiled.block.weight, eager_source.block.weight)


def test_compiled_model_with_optimizer_resumes_exactly(tmp_path: Path) -> None:
    model = _compiled(_net(0))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    config = _save(tmp_path, model=model, optimizer=optimizer)
    fresh = _net(1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    with aiockpt.SyncCheckpointer(config, model=fresh, optimizer=fresh_optimizer) as ckpt:
        ckpt.restore()
    assert _same(fresh, model._orig_mod)
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)


def test_layers_select_compiled_modules_by_eager_names(tmp_path: Path) -> None:
    source = _compiled(_net(0))
    config = _save(tmp_path, model=source)
    target = _compiled(_net(1))
    before = target.state_dict()["_orig_mod.2.weight"].clone()
    with aiockpt.SyncCheckpointer(config, model=target) as ckpt:
        ckpt.restore(layers=r"model/0")
    assert torch.equal(
        target.state_dict()["_orig_mod.0.weight"], source.state_dict()["_orig_mod.0.weight"]
    )
    assert torch.equal(target.state_dict()["_orig_mod.2.weight"], before)


# -- strict=False ------------------------------------------------------------------------


class _Grown(nn.Module):
    """The saved model with one layer added and one renamed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.first = nn.Linear(4, 8)
        self.extra = nn.Linear(8, 8)


class _Original(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.first = nn.Linear(4, 8)
        self.gone = nn.Linear(8, 2)


def test_strict_false_loads_matching_keys_and_reports_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = _Original()
    config = _save(tmp_path, model=source)
    target = _Grown()
    extra_before = target.extra.weight.clone()
    with aiockpt.SyncCheckpointer(config, model=target) as ckpt:
        with pytest.raises(StateMismatchError, match=r"extra\.weight") as refused:
            ckpt.restore()  # strict by default, as load_state_dict
        assert isinstance(refused.value, RuntimeError)  # what load_state_dict raises
        assert "gone.weight" in str(refused.value) and "strict=False" in str(refused.value)
        with caplog.at_level(logging.WARNING, logger="aiockpt"):
            assert ckpt.restore(strict=False) == 1
        stats = ckpt.stats
    assert torch.equal(target.first.weight, source.first.weight)
    assert torch.equal(target.extra.weight, extra_before)  # missing: kept its value
    assert stats.last_restore_missing == {"model": ["extra.weight", "extra.bias"]}
    assert stats.last_restore_unexpected == {"model": ["gone.weight", "gone.bias"]}
    assert stats.last_restore_skipped == []
    assert "extra.weight" in caplog.text and "gone.weight" in caplog.text


def test_strict_mismatch_of_a_later_object_loads_nothing(tmp_path: Path) -> None:
    # The model matches, the optimizer does not (another parameter grouping): torch's
    # load_state_dict would refuse the optimizer after the model had been loaded.
    source = _net(0)
    saved_optimizer = torch.optim.SGD(source.parameters(), lr=0.1)
    config = _save(tmp_path, model=source, optimizer=saved_optimizer)
    model = _net(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    with (
        aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt,
        pytest.raises(StateMismatchError, match="parameter groups") as refused,
    ):
        ckpt.restore()
    assert "nothing was loaded" in str(refused.value)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_strict_false_skips_objects_the_checkpoint_lacks(tmp_path: Path) -> None:
    source = _net(0)
    config = _save(tmp_path, model=source)
    model = _net(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"].clone()
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        with pytest.raises(MissingStateError, match="optimizer"):
            ckpt.restore()
        assert ckpt.restore(strict=False) == 1
        assert ckpt.stats.last_restore_skipped == ["optimizer"]
        assert ckpt.stats.last_restore_missing == {}
        # The report is of the last restore alone.
        assert ckpt.restore(strict=False, only=["model"]) == 1
        assert ckpt.stats.last_restore_skipped == []
    assert _same(model, source)
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], momentum)


def test_async_checkpointer_takes_strict(tmp_path: Path) -> None:
    config = _save(tmp_path, model=_Original())
    target = _Grown()

    async def main() -> None:
        async with aiockpt.Checkpointer(config, model=target) as ckpt:
            assert await ckpt.restore(strict=False) == 1
            assert ckpt.stats.last_restore_missing == {"model": ["extra.weight", "extra.bias"]}

    run(main())


# -- Trainer.resume ----------------------------------------------------------------------


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


def _trainer(config: aiockpt.Config, seed: int, **extra: object) -> aiockpt.SyncTrainer:
    model = _net(seed)
    return aiockpt.SyncTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        _loss,
        config=config,
        **extra,
    )


def test_trainer_resume_only_restores_the_named_objects(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with _trainer(config, 0) as trainer:
        for _ in range(3):
            trainer.train_step(torch.randn(5, 4))
        trainer.checkpoint()
        saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with _trainer(config, 1) as trainer:
        momentum_before = trainer.optimizer.state_dict()["state"]
        assert trainer.resume(only=["model"]) == 0  # the step counter was not restored
        assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in saved.items())
        assert trainer.optimizer.state_dict()["state"] == momentum_before == {}
        with pytest.raises(ValueError, match="nothing"):
            trainer.resume(only=["nothing"])
        assert trainer.resume(only=["model", "trainer"]) == 3


def test_async_trainer_resume_takes_only_and_strict(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with _trainer(config, 0) as trainer:
        trainer.train_step(torch.randn(5, 4))
        trainer.checkpoint()
    model = _net(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    marker = nn.Linear(2, 2)  # a new object the checkpoint never held
    marker_before = marker.weight.clone()

    async def main() -> None:
        async with aiockpt.Trainer(
            model, optimizer, _loss, config=config, marker=marker
        ) as trainer:
            with pytest.raises(MissingStateError, match="marker"):
                await trainer.resume()
            assert await trainer.resume(strict=False) == 1
            assert trainer.checkpointer.stats.last_restore_skipped == ["marker"]
            assert await trainer.resume(only=["trainer"]) == 1

    run(main())
    assert torch.equal(marker.weight, marker_before)


class _AsCompiledSaved:
    """A Stateful giving a compiled module's state with its ``_orig_mod.`` keys, as
    checkpoints of compiled modules held them before they were saved under eager names."""

    def __init__(self, compiled: nn.Module) -> None:
        self.compiled = compiled

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.compiled.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise AssertionError("only saved from")


def test_checkpoint_holding_compiled_names_restores_into_eager_and_compiled(
    tmp_path: Path,
) -> None:
    source = _compiled(_net(0))
    config = _save(tmp_path, model=_AsCompiledSaved(source))
    assert "model/_orig_mod.0.weight" in _saved_names(config)
    for target in (_net(1), _compiled(_net(2))):
        with aiockpt.SyncCheckpointer(config, model=target) as ckpt:
            assert ckpt.restore() == 1
        assert _same(getattr(target, "_orig_mod", target), source._orig_mod)
