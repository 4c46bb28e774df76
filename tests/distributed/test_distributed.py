"""Checkpoints of several ranks, on the CPU with gloo: real processes, as torchrun starts them.

Each test starts one process per rank running tests/distributed/dist_worker.py and compares what the
ranks saved and restored, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import aiockpt

WORKER = Path(__file__).with_name("dist_worker.py")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not available"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(
    world: int, scenario: str, model: str, directory: Path, out: Path, **env: str
) -> list[subprocess.CompletedProcess[str]]:
    out.mkdir(parents=True, exist_ok=True)
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[2]),
        **env,
    }
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, model, str(directory), str(out)],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    results = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            stdout, stderr = process.communicate()
        results.append(
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        )
    return results


def _ok(results: list[subprocess.CompletedProcess[str]]) -> None:
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-4000:]}"


def _load(out: Path, rank: int) -> dict[str, Any]:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}/{key}")
    else:
        assert a == b, where


def _bytes_by_rank(checkpoint: Path) -> dict[int, int]:
    found: dict[int, int] = {}
    for path in checkpoint.glob("data-r*-c*.bin"):
        rank = int(path.name[6:11])
        found[rank] = found.get(rank, 0) + path.stat().st_size
    return found


@pytest.mark.parametrize(("model", "world"), [("ddp", 2), ("fsdp", 2), ("fsdp", 4)])
def test_save_and_restore_at_the_same_world_size_is_bit_exact(tmp_path, model, world):
    directory = tmp_path / "ckpt"
    _ok(run_ranks(world, "save", model, directory, tmp_path / "saved"))
    steps = [info.step for info in aiockpt.list_checkpoints(directory)]
    assert steps == [2, 4]
    # One commit for all ranks, and every rank wrote a share of the bytes.
    written = _bytes_by_rank(directory / "step-4")
    assert sorted(written) == list(range(world))
    assert all(n > 0 for n in written.values())
    if model == "ddp":  # replicated state split evenly: no rank writes much more
        total = sum(written.values())
        assert max(written.values()) < total / world + 40 * 16 * 4 * 3

    _ok(run_ranks(world, "restore", model, directory, tmp_path / "restored"))
    for rank in range(world):
        saved, restored = _load(tmp_path / "saved", rank), _load(tmp_path / "restored", rank)
        assert restored["restored_step"] == 4
        _assert_equal(saved["at_4"], restored["at_4"], f"rank {rank} at step 4")
        # Exact resume: two more steps land on the same bits as the uninterrupted run.
        # Only with 2 ranks: with more, gloo's ring all-reduce sums each element in an
        # order that follows DDP's gradient buckets, which a fresh DDP lays out anew in
        # its first iteration; the restored state itself is exact either way (above).
        if world == 2 or model == "fsdp":
            _assert_equal(saved["at_6"], restored["at_6"], f"rank {rank} at step 6")


@pytest.mark.parametrize("model", ["ddp", "fsdp"])
def test_restore_onto_fewer_ranks(tmp_path, model):
    directory = tmp_path / "ckpt"
    _ok(run_ranks(4, "save", model, directory, tmp_path / "saved"))
    _ok(run_ranks(2, "restore", model, directory, tmp_path / "restored"))
    saved = _load(tmp_path / "saved", 0)
    for rank in range(2):
        restored = _load(tmp_path / "restored", rank)
        assert restored["restored_step"] == 4
        # Model and optimizer state are whole again (DTensors resharded 4 -> 2); the RNG
        # state of rank r is the one rank r saved.
        _assert_equal(saved["at_4"]["model"], restored["at_4"]["model"], "model")
        _assert_equal(saved["at_4"]["optimizer"], restored["at_4"]["optimizer"], "optimizer")
        _assert_equal(_load(tmp_path / "saved", rank)["at_4"]["rng"], restored["at_4"]["rng"])


def test_restore_onto_more_ranks_than_saved_per_rank_state_is_refused(tmp_path):
    directory = tmp_path / "ckpt"
    _ok(run_ranks(2, "save", "ddp", directory, tmp_path / "saved"))
    results = run_ranks(4, "restore", "ddp", directory, tmp_path / "restored")
    assert all(r.returncode != 0 for r in results)
    assert any("WorldSizeError" in r.stderr for r in results)
    assert any("restore it with as many ranks" in r.stderr for r in results)


def test_load_of_a_sharded_checkpoint_gives_whole_tensors(tmp_path):
    directory = tmp_path / "ckpt"
    _ok(run_ranks(2, "save", "fsdp", directory, tmp_path / "saved"))
    saved = _load(tmp_path / "saved", 1)
    state = aiockpt.load(directory / "step-4", rank=1)
    _assert_equal(saved["at_4"]["model"], dict(state["model"]), "model")
    assert torch.equal(state["rng"]["torch"], saved["at_4"]["rng"])


@pytest.mark.parametrize("victim", ["0", "1"])
def test_a_rank_killed_mid_write_leaves_the_previous_checkpoint_newest(tmp_path, victim):
    directory = tmp_path / "ckpt"
    results = run_ranks(2, "kill", "ddp", directory, tmp_path / "out", KILL_RANK=victim)
    assert results[int(victim)].returncode == -signal.SIGKILL
    assert [info.step for info in aiockpt.list_checkpoints(directory)] == [2]
    state = aiockpt.load(directory / "step-2")  # verifies every checksum
    assert "model" in state and "optimizer" in state


def test_trainer_under_several_ranks_checkpoints_and_resumes(tmp_path):
    directory = tmp_path / "ckpt"
    _ok(run_ranks(2, "trainer", "ddp", directory, tmp_path / "first"))
    assert [info.step for info in aiockpt.list_checkpoints(directory)] == [2, 4]
    first = _load(tmp_path / "first", 0)
    assert first["start"] == 0
    assert "interval_steps" in first["clock_refused"]
    _ok(run_ranks(2, "trainer", "ddp", directory, tmp_path / "again"))
    for rank in range(2):
        again = _load(tmp_path / "again", rank)
        assert again["start"] == 4  # resumed at the newest checkpoint: nothing left to train
        _assert_equal(_load(tmp_path / "first", rank)["at_4"], again["at_4"], f"rank {rank}")


def test_sharded_checkpoint_through_dcp_and_back(tmp_path):
    """Export a 2-rank FSDP checkpoint to torch.distributed.checkpoint's format, import it
    back (whole tensors now), and restore it into the sharded model on 2 ranks."""
    from aiockpt.cli.convert import export_checkpoint, import_checkpoint

    directory = tmp_path / "ckpt"
    _ok(run_ranks(2, "save", "fsdp", directory, tmp_path / "saved"))
    export_checkpoint(directory / "step-4", "dcp", tmp_path / "dcp")
    imported = tmp_path / "imported"
    import_checkpoint(tmp_path / "dcp", "dcp", 4, imported)
    _ok(run_ranks(2, "restore", "fsdp", imported, tmp_path / "restored"))
    saved = _load(tmp_path / "saved", 0)
    for rank in range(2):
        restored = _load(tmp_path / "restored", rank)
        assert restored["restored_step"] == 4
        _assert_equal(saved["at_4"]["model"], restored["at_4"]["model"], "model")
        _assert_equal(saved["at_4"]["optimizer"], restored["at_4"]["optimizer"], "optimizer")


def test_bench_ranks_reports_every_figure(tmp_path):
    """`python -m aiockpt.tools.bench_ranks` under torchrun, tiny preset on gloo: the structure of
    its report (timings mean something only on GPUs)."""
    output = tmp_path / "ranks.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(_free_port()), "-m", "aiockpt.tools.bench_ranks", "--preset", "tiny",
        "--wrap", "fsdp", "--rounds", "1", "--steps", "4", "--interval", "2",
        "--directory", str(tmp_path / "run"), "--output", str(output), "--cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["world_size"] == 2 and report["wrap"] == "fsdp"
    assert report["restore_bit_exact_all_ranks"] is True
    assert report["raw_fsync_write_gbps_all_ranks"] > 0 and report["persist_gbps_all_ranks"] > 0
    assert report["throughput_vs_no_checkpoint"] > 0 and report["stall_ms_median"] > 0
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert not (tmp_path / "run").exists()
