"""Layer-wise chunks and partial restores: the manifest knows each tensor's layer, and a
partial restore reads only the bytes it needs."""

from __future__ import annotations

import itertools

import torch
from conftest import make_config

import aiockpt
from aiockpt._engine.reader import read_manifest


def _trained() -> tuple[torch.nn.Sequential, torch.optim.Adam]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 64)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(tmp_path, model, optimizer) -> aiockpt.Config:
    config = make_config(tmp_path, chunk_size_mb=0.02)
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        ckpt.checkpoint(1).wait()
    return config


def test_manifest_records_layers_and_groups_them_in_the_stream(tmp_path):
    model, optimizer = _trained()
    config = _save(tmp_path, model, optimizer)
    manifest = read_manifest(config.directory / "step-1")
    layers = {t.name: t.layer for t in manifest.tensors}
    assert layers["model/2.weight"] == "model/2"
    # optimizer state of parameter 4 (= layer 2's weight) belongs to that layer
    assert layers["optimizer/state/4/exp_avg"] == "model/2"
    assert layers["optimizer/state/4/step"] == "model/2"
    # each layer's tensors (parameters and their optimizer state) are adjacent on disk
    spans = {}
    for record in manifest.tensors:
        for piece in record.pieces:
            spans.setdefault(record.layer, []).append((piece.file, piece.offset))
    ordered = sorted((min(v), max(v), k) for k, v in spans.items())
    for (_, end, _), (start, _, _) in itertools.pairwise(ordered):
        assert end < start


def test_model_only_restore_reads_fewer_bytes(tmp_path):
    model, optimizer = _trained()
    config = _save(tmp_path, model, optimizer)
    fresh = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    with aiockpt.SyncCheckpointer(config, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.restore() == 1
        full = ckpt.stats.last_restore_bytes
        assert ckpt.restore(only=["model"]) == 1
        model_only = ckpt.stats.last_restore_bytes
    assert 0 < model_only < full / 2  # Adam keeps two tensors per parameter
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)


def test_layer_pattern_restores_only_matching_layers(tmp_path):
    model, optimizer = _trained()
    config = _save(tmp_path, model, optimizer)
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with aiockpt.SyncCheckpointer(config, model=fresh) as ckpt:
        assert ckpt.restore(only=["model"]) == 1
        model_bytes = ckpt.stats.last_restore_bytes
        fresh.load_state_dict(before)
        assert ckpt.restore(layers=r"^model/2$") == 1
        layer_bytes = ckpt.stats.last_restore_bytes
    assert layer_bytes == (64 * 64 + 64) * 4
    assert layer_bytes < model_bytes
    for name, value in fresh.state_dict().items():
        expected = model.state_dict()[name] if name.startswith("2.") else before[name]
        assert torch.equal(value, expected), name


def test_load_with_keys_and_layers(tmp_path):
    model, optimizer = _trained()
    config = _save(tmp_path, model, optimizer)
    state = aiockpt.load(config.directory / "step-1", keys=["model"], layers=r"model/[01]$")
    assert list(state) == ["model"]
    assert sorted(state["model"]) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert torch.equal(state["model"]["1.weight"], model[1].weight.detach())
