"""Preemption under torch.distributed: a SIGTERM at one rank stops every rank at one step.

Real processes, two ranks on the CPU with gloo, started as torchrun starts them. The test
sends SIGTERM to rank 1 only, mid-training; both ranks must save the same step, exit with
128 + 15, and a resume from that checkpoint must continue exactly as a run that was never
interrupted. A last test SIGTERMs a real torchrun job as a scheduler does: every process,
the agent too, which passes the signal on to its workers. Run as a script, this file is one rank::

    python test_preemption_ranks.py SCENARIO MODEL DIRECTORY OUT TOTAL

SCENARIO is ``train`` (train up to TOTAL steps with preemption_signals = ["SIGTERM"],
resuming if it can; on the exit, write the state at that step) or ``reference`` (train
TOTAL steps from scratch without checkpoints). MODEL is ``ddp`` (DistributedDataParallel:
the ranks move in lock step) or ``apart`` (no collectives in training, and rank 1 slower:
the ranks are at different steps when the signal comes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

WORLD = 2


# -- one rank ---------------------------------------------------------------------------------
def _build(model_kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    import torch.distributed as dist

    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)
    )
    if model_kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(100 + dist.get_rank())  # each rank's own dropout stream
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 * step + rank))


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).square().mean()


def _state(trainer: Any) -> dict[str, Any]:
    return {
        "step": trainer.step,
        "model": trainer.model.state_dict(),  # torch.save writes the values of now
        "optimizer": trainer.optimizer.state_dict(),
    }


def _rank_main(scenario: str, model_kind: str, directory: str, out: str, total: int) -> None:
    import torch.distributed as dist

    import aiockpt

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, optimizer = _build(model_kind)
    settings: dict[str, Any] = {"directory": directory, "num_threads": 2, "keep_last": None}
    if scenario == "train":
        settings.update(interval_steps=4, preemption_signals=["SIGTERM"], preemption_grace_s=120.0)
    progress = Path(out) / f"progress{rank}"
    pause = 0.004 if model_kind == "ddp" else 0.002 + 0.01 * rank
    with aiockpt.SyncTrainer(model, optimizer, _loss, config=aiockpt.Config(**settings)) as trainer:
        if scenario == "train":
            trainer.resume()
        try:
            while trainer.step < total:
                trainer.train_step(_batch(trainer.step + 1, rank))
                progress.write_text(str(trainer.step))
                time.sleep(pause)  # the signal comes mid-training, not after the end
        except SystemExit:
            torch.save(_state(trainer), Path(out) / f"rank{rank}.pt")
            raise
        torch.save(_state(trainer), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


# -- the test ---------------------------------------------------------------------------------
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
]


def _start(scenario: str, model: str, directory: Path, out: Path, total: int) -> list[Any]:
    from test_distributed import _free_port

    out.mkdir(parents=True, exist_ok=True)
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    return [
        subprocess.Popen(
            [sys.executable, __file__, scenario, model, str(directory), str(out), str(total)],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]


def _finish(processes: list[Any], timeout: float = 240) -> list[tuple[int, str]]:
    results = []
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            output, _ = process.communicate()
        results.append((process.returncode, output))
    return results


def _reached(out: Path, rank: int) -> int:
    try:
        return int((out / f"progress{rank}").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.parametrize("model", ["ddp", "apart"])
def test_sigterm_at_one_rank_stops_every_rank_at_one_step(tmp_path: Path, model: str) -> None:
    from conftest import assert_state_equal

    import aiockpt

    directory, out = tmp_path / "ckpt", tmp_path / "preempted"
    processes = _start("train", model, directory, out, total=100_000)
    deadline = time.monotonic() + 120
    while _reached(out, 1) < 6:
        assert time.monotonic() < deadline, _finish(processes, timeout=1)
        assert all(p.poll() is None for p in processes), _finish(processes, timeout=1)
        time.sleep(0.01)
    signalled_at = _reached(out, 1)
    processes[1].send_signal(signal.SIGTERM)  # rank 1 only
    results = _finish(processes)
    for rank, (code, output) in enumerate(results):
        assert code == 128 + signal.SIGTERM, f"rank {rank} exited with {code}:\n{output[-4000:]}"
    states = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    stop = states[0]["step"]
    assert states[1]["step"] == stop >= signalled_at
    assert [info.step for info in aiockpt.list_checkpoints(directory)][-1] == stop
    saved = aiockpt.load(directory / f"step-{stop}")
    assert saved["trainer"]["step"] == stop
    assert_state_equal(saved["model"], states[0]["model"])
    if model != "ddp":
        return
    # A resume from the saved step goes on exactly as a run that was never stopped.
    total = stop + 3
    resumed = _finish(_start("train", model, directory, tmp_path / "resumed", total))
    straight = _finish(
        _start("reference", model, tmp_path / "unused", tmp_path / "straight", total)
    )
    for rank in range(WORLD):
        assert resumed[rank][0] == 0, resumed[rank][1][-4000:]
        assert straight[rank][0] == 0, straight[rank][1][-4000:]
        a = torch.load(tmp_path / "resumed" / f"rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "straight" / f"rank{rank}.pt", weights_only=True)
        assert a["step"] == b["step"] == total
        assert_state_equal(a, b, f"rank {rank}")


def test_sigterm_to_torchrun_and_its_workers(tmp_path: Path) -> None:
    """As a scheduler does it: SIGTERM to every process of the job, torchrun's agent
    included, which passes it on to its workers again."""
    from test_distributed import _free_port

    import aiockpt

    directory, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={WORLD}",
            f"--master-port={_free_port()}",
            __file__,
            *("train", "ddp", str(directory), str(out), "100000"),
        ],
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(Path(__file__).parents[2]),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a job's
    )
    deadline = time.monotonic() + 120
    while min(_reached(out, rank) for rank in range(WORLD)) < 6:
        assert time.monotonic() < deadline and agent.poll() is None, _finish([agent], 1)
        time.sleep(0.01)
    os.killpg(agent.pid, signal.SIGTERM)
    [(_, output)] = _finish([agent])
    states = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    assert states[0]["step"] == states[1]["step"], output[-4000:]
    assert [info.step for info in aiockpt.list_checkpoints(directory)][-1] == states[0]["step"]
    assert "Exiting with status 143" in output, output[-4000:]


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
