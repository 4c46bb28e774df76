"""Checkpoints in a real S3-compatible server: save, restore, load, list, retention."""

from __future__ import annotations

import pytest
import torch

import aiockpt
from aiockpt._util.location import ObjectPath

from .s3server import keys


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_checkpoint_restore_load_and_list(s3_url, bucket, s3_client_):
    model = _model(0)
    optimizer = torch.optim.Adam(model.parameters())
    config = aiockpt.Config(directory=s3_url, keep_last=2, chunk_size_mb=0.01)
    assert isinstance(config.directory, ObjectPath)
    assert str(config.directory) == s3_url
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        for step in (1, 2, 3):
            model[0].weight.data += 1
            info = ckpt.checkpoint(step).wait()
            assert str(info.path) == f"{s3_url}/step-{step}"
    listed = aiockpt.list_checkpoints(s3_url)
    assert [i.step for i in listed] == [2, 3]  # retention kept the newest two
    assert all(i.nbytes > 0 for i in listed)
    stored = keys(s3_client_, bucket)
    assert not [k for k in stored if k.startswith("run-1/step-1/")]
    assert "run-1/latest" in stored
    assert "run-1/.aiockpt.lock" not in stored  # closed: the lock object is gone

    fresh = _model(1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    with aiockpt.SyncCheckpointer(config, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.restore() == 3
    assert _equal(fresh, model)

    state = aiockpt.load(f"{s3_url}/step-3", keys=["model"])
    for name, value in model.state_dict().items():
        assert torch.equal(state["model"][name], value)
    with pytest.raises(aiockpt.NoCheckpointError):
        aiockpt.load(f"{s3_url}/step-1")
