"""A training process is SIGKILLed after a memory-tier checkpoint and before the next
primary one; a new process must resume from the memory tier's newer step, bit for bit.

The child trains a small model with an optimizer, checkpointing every 2 steps to the
memory tier (its location derived from the primary directory, in /dev/shm, as a real run
would have it) and every 10 to the primary. After step 14 is committed in memory (step 10
being the newest on disk) it saves what it expects a resume to see and waits to be killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import aiockpt
from aiockpt._util.shm import derived_memory_directory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
    reason="needs Linux and its /dev/shm tmpfs",
)

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 120.0
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    import aiockpt

    primary, expected = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    config = aiockpt.Config(directory=primary, interval_steps=10, keep_last=2, num_threads=2,
                            memory={"interval_steps": 2, "keep_last": 2})
    ckpt = aiockpt.SyncCheckpointer(config, model=model, optimizer=opt)
    for step in range(1, 15):
        loss = model(torch.randn(16, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2 == 0:
            ckpt.checkpoint(step).wait()
            state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            torch.save(state, expected / f"step-{step}.pt")
    print("READY", flush=True)
    time.sleep(600)  # killed here: step 14 is in memory only, step 10 is the newest on disk
    """
)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    primary, expected = tmp_path / "primary", tmp_path / "expected"
    expected.mkdir()
    memory = derived_memory_directory(primary)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("AIOCKPT_")}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(primary), str(expected)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        line = b""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line.startswith(b"READY"):
                break
        assert line.startswith(b"READY"), f"child did not get ready: {proc.stdout.read()!r}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        yield primary, memory, expected
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(memory, ignore_errors=True)


def steps(directory: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in directory.iterdir() if p.name.startswith("step-"))


def resume(primary: Path) -> tuple[int | None, str | None, dict[str, object]]:
    torch.manual_seed(1)  # different weights: every restored byte must come from the tier
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    config = aiockpt.Config(
        directory=primary, interval_steps=10, keep_last=2, num_threads=2,
        memory={"interval_steps": 2, "keep_last": 2},
    )  # fmt: skip
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=opt) as ckpt:
        step = ckpt.restore()
        tier = ckpt.stats.last_restore_tier
        return step, tier, {"model": model.state_dict(), "optimizer": opt.state_dict()}


def assert_bit_exact(actual: object, expected: object, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        as_bytes = [t.detach().reshape(-1).view(torch.uint8) for t in (actual, expected)]
        assert torch.equal(*as_bytes), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), where
        for key in expected:
            assert_bit_exact(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_bit_exact(a, e, f"{where}/{i}")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def flip_bit(checkpoint: Path) -> None:
    data = sorted(checkpoint.glob("data-*.bin"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    data.write_bytes(bytes(raw))


def test_a_new_process_resumes_from_the_memory_tier(run: tuple[Path, Path, Path]):
    primary, memory, expected = run
    assert steps(primary) == [10]
    assert steps(memory) == [12, 14]
    step, tier, state = resume(primary)
    assert (step, tier) == (14, "memory")
    assert_bit_exact(state, torch.load(expected / "step-14.pt", weights_only=True))


def test_a_corrupt_memory_checkpoint_falls_back(run: tuple[Path, Path, Path]):
    primary, memory, expected = run
    flip_bit(memory / "step-14")
    step, tier, state = resume(primary)
    assert (step, tier) == (12, "memory")
    assert_bit_exact(state, torch.load(expected / "step-12.pt", weights_only=True))
    # Both memory checkpoints corrupt: the primary's step 10 is next, wherever it is.
    flip_bit(memory / "step-12")
    step, tier, state = resume(primary)
    assert (step, tier) == (10, "primary")
    assert_bit_exact(state, torch.load(expected / "step-10.pt", weights_only=True))
