"""A ZeroRedundancyOptimizer (each rank holds a shard of the optimizer state) is saved
whole and restored into a fresh one, whose state_dict() would refuse to answer.

Real ranks: one gloo process per rank on the CPU, started as torchrun would. This file is
also the rank's script::

    python tests/test_zero_optimizer.py rank SCENARIO DIRECTORY OUT

with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. ``save`` trains 3 steps,
checkpoints step 3 and trains to step 5; ``restore`` builds everything afresh (other
weights, an optimizer that never stepped), restores, and trains to step 5 the same way.
Both write the model and the whole optimizer state at step 5 to OUT/rank<r>-SCENARIO.pt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import assert_state_equal
from test_distributed import _free_port
from torch import nn

import aiockpt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed"),
]


def build(seed: int) -> tuple[nn.Module, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(seed)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 2))
    )
    optimizer = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.05
    )
    return model, optimizer


def train_step(model: nn.Module, optimizer: Any, step: int) -> None:
    data = torch.Generator().manual_seed(100 * step + dist.get_rank())
    model(torch.randn(6, 12, generator=data)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def whole_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    optimizer.consolidate_state_dict(to=0)  # a collective: every rank calls it
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    if dist.get_rank() == 0:
        state["optimizer"] = optimizer.state_dict()
    return state


def rank_main(scenario: str, directory: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    config = aiockpt.Config(directory=directory, num_threads=2, keep_last=None)
    if scenario == "save":
        model, optimizer = build(seed=0)
        with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
            for step in (1, 2, 3):
                train_step(model, optimizer, step)
            ckpt.checkpoint(3).wait()
    else:
        model, optimizer = build(seed=1 + dist.get_rank())
        with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
            assert ckpt.restore() == 3
    for step in (4, 5):
        train_step(model, optimizer, step)
    torch.save(whole_state(model, optimizer), out / f"rank{dist.get_rank()}-{scenario}.pt")
    dist.destroy_process_group()


def run_ranks(world: int, scenario: str, directory: Path, out: Path) -> None:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path]),
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, "rank", scenario, str(directory), str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for rank in ranks:
            outputs.append(rank.communicate(timeout=180)[0])
    finally:
        for rank in ranks:
            rank.kill()
    for number, (rank, output) in enumerate(zip(ranks, outputs, strict=True)):
        assert rank.returncode == 0, (
            f"{scenario}: rank {number} exited {rank.returncode}:\n{output}"
        )


@pytest.mark.parametrize("world", [1, 2])
def test_zero_optimizer_saves_whole_and_restores_into_a_fresh_one(
    tmp_path: Path, world: int
) -> None:
    directory, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    run_ranks(world, "save", directory, out)
    saved = aiockpt.load(directory / "step-3")
    # The whole optimizer state is in the checkpoint, every parameter's, whatever rank
    # held its shard.
    assert sorted(saved["optimizer"]["state"]) == [0, 1, 2, 3, 4, 5]
    run_ranks(world, "restore", directory, out)
    for rank in range(world):
        expected = torch.load(out / f"rank{rank}-save.pt")
        actual = torch.load(out / f"rank{rank}-restore.pt")
        assert_state_equal(actual, expected)


if __name__ == "__main__" and sys.argv[1:2] == ["rank"]:
    rank_main(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
