"""An object store as the remote tier: fed from the committed primary, restored from when
the primary is gone, listed by ``aiockpt ls``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

import aiockpt
from aiockpt.cli.ls import list_tiers

from .s3server import keys


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _config(tmp_path: Path, s3_url: str) -> aiockpt.Config:
    return aiockpt.Config(
        directory=tmp_path / "primary",
        keep_last=1,
        chunk_size_mb=0.01,
        remote={"url": s3_url, "interval_steps": 2, "keep_last": 2, "on_backpressure": "block"},
    )


def test_remote_tier_on_s3_is_fed_from_the_primary_and_restored_from(
    tmp_path: Path, s3_url: str, bucket: str, s3_client_: object
) -> None:
    model = _model(0)
    optimizer = torch.optim.Adam(model.parameters())
    config = _config(tmp_path, s3_url)
    saved: dict[int, dict[str, torch.Tensor]] = {}
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        for step in range(1, 7):
            model(torch.randn(3, 16)).sum().backward()
            optimizer.step()
            ckpt.checkpoint(step).wait()
            saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
        remote = ckpt.stats.tiers["remote"]
        assert remote.committed == 3  # steps 2, 4 and 6
    # The remote keeps its own two newest; the primary its one.
    assert [i.step for i in aiockpt.list_checkpoints(s3_url)] == [4, 6]
    assert [i.step for i in aiockpt.list_checkpoints(tmp_path / "primary")] == [6]
    assert any(k.startswith("run-1/step-6/") for k in keys(s3_client_, bucket))

    report = list_tiers(tmp_path / "primary", remote=aiockpt.Config(directory=s3_url).directory)
    (remote_row,) = [t for t in report["tiers"] if t["tier"] == "remote"]
    assert remote_row["steps"] == [4, 6]

    # The machine is lost with its disk: a new one restores from the object store.
    shutil.rmtree(tmp_path / "primary")
    fresh = _model(1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    with aiockpt.SyncCheckpointer(config, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.restore() == 6
        assert ckpt.stats.last_restore_tier == "remote"
        assert ckpt.restore(step=4) == 4
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved[4][name]), name
