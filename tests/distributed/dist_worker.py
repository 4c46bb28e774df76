"""One rank of a multi-process test run (started by tests/distributed/test_distributed.py).

    python dist_worker.py SCENARIO MODEL DIRECTORY OUT

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (as torchrun sets them). Runs on
the CPU with gloo. Scenarios:

- ``save``: train 4 steps, checkpoint steps 2 and 4, train 2 more; write what the state was
  at step 4 and at step 6 to OUT/rank<r>.pt.
- ``restore``: build the model afresh (other weights), restore the newest checkpoint,
  write what was restored, train 2 steps the same way, write the result too.
- ``kill``: like save, but this rank SIGKILLs itself while writing step 4's data when
  KILL_RANK names it.
- ``trainer``: a SyncTrainer checkpointing every 2 steps resumes (if it can) and trains
  up to step 4; also checks that a wall-clock policy is refused on several ranks.

MODEL is ``ddp`` (DistributedDataParallel: replicated state) or ``fsdp`` (fully_shard:
DTensor state).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import aiockpt


def build(kind: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model: nn.Module = nn.Sequential(
        nn.Linear(16, 40), nn.ReLU(), nn.Dropout(0.1), nn.Linear(40, 9), nn.Linear(9, 3)
    )
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    data = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    inputs = torch.randn(8, 16, generator=data)
    model(inputs).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full(value: Any) -> Any:
    """A plain, whole copy of a state value (DTensors gathered from every rank)."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor().clone()
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [full(v) for v in value]
    return value


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": full(model.state_dict()),
        "optimizer": full(optimizer.state_dict()["state"]),
        "rng": torch.get_rng_state(),
    }


def run_trainer(kind: str, directory: str) -> dict[str, Any]:
    model, optimizer = build(kind, seed=0)

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).square().mean()

    result: dict[str, Any] = {}
    try:
        clock = aiockpt.Config(directory=directory, interval_seconds=1.0)
        aiockpt.SyncTrainer(model, optimizer, loss_fn, config=clock)
    except aiockpt.ConfigError as exc:
        result["clock_refused"] = str(exc)
    config = aiockpt.Config(directory=directory, interval_steps=2, keep_last=None)
    with aiockpt.SyncTrainer(model, optimizer, loss_fn, config=config) as trainer:
        result["start"] = trainer.resume()
        for step in range(result["start"] + 1, 5):
            data = torch.Generator().manual_seed(1000 * step + dist.get_rank())
            trainer.train_step(torch.randn(8, 16, generator=data))
        trainer.wait()
        result["at_4"] = snapshot(model, optimizer)
    return result


def main() -> None:
    scenario, kind, directory, out = sys.argv[1:5]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if scenario == "trainer":
        torch.save(run_trainer(kind, directory), Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()
        return
    config = aiockpt.Config(directory=directory, keep_last=None, chunk_size_mb=0.004)
    model, optimizer = build(kind, seed=0 if scenario != "restore" else 123)
    ckpt = aiockpt.SyncCheckpointer(
        config, model=model, optimizer=optimizer, rng=aiockpt.RNGState()
    )
    result: dict[str, Any] = {}
    if scenario in ("save", "kill"):
        if scenario == "kill" and os.environ.get("KILL_RANK") == str(rank):
            _kill_while_writing(step=4)
        for step in range(1, 5):
            train_step(model, optimizer, step)
            if step in (2, 4):
                handle = ckpt.checkpoint(step)
                if scenario == "kill" and step == 2:
                    handle.wait()  # step 2 committed before step 4's writes begin
        try:
            ckpt.wait()
        except aiockpt.CheckpointError as exc:
            result["error"] = str(exc)
        result["at_4"] = snapshot(model, optimizer)
    else:
        result["restored_step"] = ckpt.restore()
        result["at_4"] = snapshot(model, optimizer)
    for step in (5, 6):
        train_step(model, optimizer, step)
    result["at_6"] = snapshot(model, optimizer)
    ckpt.close()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _kill_while_writing(step: int) -> None:
    """SIGKILL this process inside its first data-file write of ``step``."""
    from aiockpt.storage import local

    original = local.write_pieces

    def write_then_die(path: str, *args: Any, **kwargs: Any) -> Any:
        if f".tmp-step-{step}-" in path:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, *args, **kwargs)

    local.write_pieces = write_then_die  # type: ignore[assignment]


if __name__ == "__main__":
    main()
