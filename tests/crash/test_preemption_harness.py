"""Preemption, end to end: SIGTERM a real training process, SIGKILL it after the grace
period if it is still alive, resume in another process, and compare bit for bit.

Each trial starts a training process (a Trainer on the CPU: a small model with dropout,
AdamW, a step LR schedule, batches that depend only on the step) and sends it SIGTERM
once it reports a random step. The test process then resumes from the checkpoint
directory; it must start at most one step behind
the step the trainer had reported when the signal was sent, with model, optimizer,
scheduler, RNG and step equal to an uninterrupted run's at that step. The quick version
runs a few trials; the ``slow`` one many, and reports N of N.

A grace period too short for any tier: the process logs so (with its estimate and the
grace), exits with 128 + 15 all the same, writes nothing, and the checkpoints it had
committed before are intact; restore finds the newest of them.

Run as a script, this file is the training process::

    python test_preemption_harness.py DIRECTORY PROGRESS GRACE
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

INTERVAL = 5
GRACE_S = 20.0
STEP_PAUSE_S = 0.003  # steps of a few ms, so that a signal lands mid-training


# -- the training process -----------------------------------------------------------------------
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """As the training process runs (OMP_NUM_THREADS=1), so that results compare bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.7)
    return model, optimizer, scheduler


def _batch(step: int) -> torch.Tensor:
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(step))


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).square().mean()


def _trainer(directory: str, grace_s: float) -> Any:
    import aiockpt

    model, optimizer, scheduler = _build()
    config = aiockpt.Config(
        directory=directory,
        interval_steps=INTERVAL,
        keep_last=None,
        num_threads=2,
        preemption_signals=["SIGTERM"],
        preemption_grace_s=grace_s,
    )
    return aiockpt.Trainer(model, optimizer, _loss, config=config, scheduler=scheduler)


def _snapshot(trainer: Any) -> dict[str, Any]:
    return {
        "step": trainer.step,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }


async def _train(directory: str, progress: str, grace_s: float) -> None:
    with open(progress, "a") as log:
        async with _trainer(directory, grace_s) as trainer:
            await trainer.resume()
            while True:
                await trainer.train_step(_batch(trainer.step + 1))
                log.write(f"{trainer.step}\n")
                log.flush()
                time.sleep(STEP_PAUSE_S)


def _resumed(directory: Path) -> dict[str, Any]:
    """What a Trainer resumed from ``directory`` holds (in this process, a new one to the
    checkpoints)."""
    from conftest import clone_state, run

    async def resume() -> dict[str, Any]:
        async with _trainer(str(directory), GRACE_S) as trainer:
            await trainer.resume()
            return clone_state(_snapshot(trainer))  # type: ignore[no-any-return]

    with _one_thread():
        return run(resume())


# -- the harness --------------------------------------------------------------------------------
def _start(*args: object, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, __file__, *map(str, args)], env=env, stdout=out, stderr=out
        )


def _reported(progress: Path) -> int:
    lines = progress.read_text().split() if progress.exists() else []
    return int(lines[-1]) if lines else 0


def _preempt(
    process: subprocess.Popen[bytes], progress: Path, at_step: int, kill_after: float
) -> tuple[int, int]:
    """SIGTERM ``process`` once it reports ``at_step``; SIGKILL it ``kill_after`` seconds
    later if it is still alive. The step reported when the signal went, and the exit code."""
    deadline = time.monotonic() + 120
    while _reported(progress) < at_step:
        assert process.poll() is None, f"exited early with {process.returncode}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.002)
    reported = _reported(progress)
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.kill()  # what the scheduler does when the grace period is over
        code = process.wait()
    return reported, code


def _uninterrupted(steps: int) -> dict[int, dict[str, Any]]:
    """An uninterrupted run's state after every step up to ``steps``, as the Trainer makes it
    (the same modules and calls, without checkpoints)."""
    from conftest import clone_state

    with _one_thread():
        return _run_uninterrupted(steps, clone_state)


def _run_uninterrupted(steps: int, clone_state: Any) -> dict[int, dict[str, Any]]:
    model, optimizer, scheduler = _build()
    states = {}
    for step in range(1, steps + 1):
        model.train()
        _loss(model, _batch(step)).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        states[step] = clone_state(
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            }
        )
    return states


def _trials(tmp_path: Path, count: int, seed: int) -> None:
    from conftest import assert_state_equal

    chooser = random.Random(seed)
    steps = [chooser.randint(2, 4 * INTERVAL) for _ in range(count)]
    reference = _uninterrupted(max(steps) + 60)
    failures = []
    for trial, at_step in enumerate(steps):
        where = tmp_path / f"trial{trial}"
        where.mkdir()
        process = _start(where / "ckpt", where / "progress", GRACE_S, log=where / "train.log")
        reported, code = _preempt(process, where / "progress", at_step, kill_after=GRACE_S)
        resumed = _resumed(where / "ckpt")
        problem = None
        if code != 128 + signal.SIGTERM:
            problem = f"exit code {code}"
        elif resumed["step"] < reported - 1:
            problem = f"resumed at {resumed['step']}, signalled at {reported}"
        else:
            try:
                assert_state_equal(resumed, reference[resumed["step"]])
            except AssertionError as exc:
                problem = str(exc)
        if problem is not None:
            log = (where / "train.log").read_text()[-2000:]
            failures.append(f"trial {trial} (SIGTERM at step {reported}): {problem}\n{log}")
    print(f"preemption harness (seed {seed}): {count - len(failures)} of {count} trials exact")
    assert not failures, "\n".join(failures)


def test_sigterm_saves_the_step_and_resume_is_exact(tmp_path: Path) -> None:
    _trials(tmp_path, count=3, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigterm_saves_the_step_and_resume_is_exact_many_trials(tmp_path: Path) -> None:
    _trials(tmp_path, count=25, seed=int(os.environ.get("AIOCKPT_TEST_SEED", "7")))


def test_grace_too_short_for_any_tier_keeps_the_older_checkpoints(tmp_path: Path) -> None:
    import aiockpt

    progress, directory = tmp_path / "progress", tmp_path / "ckpt"
    # The grace the process believes in is too short for anything; the harness still
    # waits the usual grace before a SIGKILL, to see what the process does with it.
    process = _start(directory, progress, 0.001, log=tmp_path / "train.log")
    reported, code = _preempt(process, progress, 3 * INTERVAL + 2, kill_after=GRACE_S)
    log = (tmp_path / "train.log").read_text()
    assert code == 128 + signal.SIGTERM, log
    assert "no tier can make the checkpoint" in log and "preemption_grace_s = 0.001" in log, log
    assert "estimates: directory" in log, log
    committed = [info.step for info in aiockpt.list_checkpoints(directory)]
    assert committed and all(step % INTERVAL == 0 for step in committed), committed
    assert committed[-1] <= reported + 1
    assert not [p.name for p in directory.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    for step in committed:
        aiockpt.load(directory / f"step-{step}")  # every byte checked against its checksum
    assert _resumed(directory)["step"] == committed[-1]


if __name__ == "__main__":
    torch.set_num_threads(1)
    asyncio.run(_train(sys.argv[1], sys.argv[2], float(sys.argv[3])))
