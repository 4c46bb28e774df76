"""Two gloo ranks checkpointing into a real S3 server: each rank uploads its own data
objects, rank 0 writes the one manifest after every rank voted, and a second run of two
ranks restores bit for bit. The ranks are real processes, started as torchrun would,
running tests/distributed/dist_worker.py with an s3:// directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import aiockpt

from .s3server import keys

WORKER = Path(__file__).parents[1] / "distributed" / "dist_worker.py"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
]


def _ranks(scenario: str, url: str, out: Path, world: int = 2) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, "ddp", url, str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    errors = []
    for rank, process in enumerate(ranks):
        try:
            _, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            _, stderr = process.communicate()
        if process.returncode != 0:
            errors.append(f"rank {rank} exited {process.returncode}:\n{stderr[-3000:]}")
    assert not errors, "\n".join(errors)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def test_two_ranks_save_and_restore_through_s3(s3_url, bucket, s3_client_, tmp_path):
    _ranks("save", s3_url, tmp_path / "saved")
    assert [info.step for info in aiockpt.list_checkpoints(s3_url)] == [2, 4]
    stored = keys(s3_client_, bucket, "run-1/step-4/")
    data = [k for k in stored if not k.endswith("/manifest.json")]
    # One data prefix for the checkpoint, shared by both ranks, each with its own files.
    assert len({k.split("/")[2] for k in data}) == 1
    assert {k.rsplit("/", 1)[1][:11] for k in data} == {"data-r00000", "data-r00001"}
    assert "run-1/step-4/manifest.json" in stored

    _ranks("restore", s3_url, tmp_path / "restored")
    for rank in range(2):
        saved = torch.load(tmp_path / "saved" / f"rank{rank}.pt", weights_only=False)
        restored = torch.load(tmp_path / "restored" / f"rank{rank}.pt", weights_only=False)
        assert restored["restored_step"] == 4
        assert _equal(saved["at_4"], restored["at_4"])
        assert _equal(saved["at_6"], restored["at_6"])  # exact resume
