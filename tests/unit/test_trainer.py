"""Trainer, SyncTrainer and ResumableSampler: exact resume after a real SIGKILL, gradient
accumulation, forced checkpoints, TOML configs, the GradScaler, and the data position.

This file is also the child process of the crash test::

    python tests/unit/test_trainer.py child DIR KILL_AT PROGRESS WORKERS SAMPLES

trains with checkpoints, appends ``step loss`` lines to PROGRESS, and SIGKILLs itself right
after step KILL_AT (a checkpoint may still be in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_state_equal, clone_state, make_config, run
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import aiockpt
from aiockpt.storage.local import LOCK_NAME

BATCH = 16
CHECK_EVERY = 4
K = 12  # the crash test trains 2 * K steps
SEED = int(os.environ.get("TRAINER_TEST_SEED", "20240611"))
REPO = Path(__file__).resolve().parents[2]


# -- one training recipe, shared by the reference run, the child and the resumed run --------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_dataset(samples: int) -> TensorDataset:
    g = torch.Generator().manual_seed(99)
    return TensorDataset(
        torch.randn(samples, 8, generator=g), torch.randint(0, 4, (samples,), generator=g)
    )


def build(
    directory: Path, *, init_seed: int, workers: int = 0, samples: int = 80, **kw: Any
) -> tuple[aiockpt.Trainer, aiockpt.ResumableSampler, DataLoader[Any]]:
    torch.manual_seed(init_seed)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.8)
    dataset = make_dataset(samples)
    sampler = aiockpt.ResumableSampler(dataset, seed=3)
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=sampler,
        num_workers=workers,
        generator=torch.Generator(),  # iter(loader) must not draw from the global RNG
    )
    cfg = aiockpt.Config(
        directory=directory, interval_steps=CHECK_EVERY, keep_last=None, num_threads=2
    )
    trainer = aiockpt.Trainer(
        model, optimizer, loss_fn, config=cfg, scheduler=scheduler, sampler=sampler, **kw
    )
    return trainer, sampler, loader


async def train_until(
    trainer: aiockpt.Trainer,
    sampler: aiockpt.ResumableSampler,
    loader: DataLoader[Any],
    total: int,
    after_step: Callable[[int, float], Awaitable[None]] | None = None,
) -> dict[int, float]:
    losses: dict[int, float] = {}
    while trainer.step < total:
        for batch in sampler.track(loader):
            loss = await trainer.train_step(batch)
            losses[trainer.step] = loss.item()
            if after_step is not None:
                await after_step(trainer.step, losses[trainer.step])
            if trainer.step >= total:
                break
    return losses


def training_state(trainer: aiockpt.Trainer, sampler: aiockpt.ResumableSampler) -> dict[str, Any]:
    return clone_state(
        {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )


async def child_main(
    directory: Path, kill_at: int, progress: Path, workers: int, samples: int
) -> None:
    trainer, sampler, loader = build(directory, init_seed=0, workers=workers, samples=samples)
    assert await trainer.resume() == 0
    with progress.open("a") as out:

        async def after_step(step: int, loss: float) -> None:
            out.write(f"{step} {loss!r}\n")
            out.flush()
            if step == CHECK_EVERY:
                await trainer.wait()  # at least one checkpoint is committed before the kill
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush of anything else

        await train_until(trainer, sampler, loader, 10 * K, after_step)
    raise SystemExit("the child should have been killed")


def wait_for_lock(directory: Path, timeout: float = 30.0) -> None:
    """Wait until no process holds the directory's writer lock.

    DataLoader workers fork from the child after it took the lock (a flock, which forked
    processes share); once the child is killed they hold it until their watchdog notices
    (within 5 s), unless the store closes the inherited fd in forked children.
    """
    deadline = time.monotonic() + timeout
    fd = os.open(directory / LOCK_NAME, os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- exact resume after SIGKILL ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("workers", "samples"),
    [(0, 80), (2, 80), (0, 64)],
    ids=["mid-epoch", "mid-epoch-2-workers", "epoch-boundary"],
)
def test_exact_resume_after_sigkill(tmp_path: Path, workers: int, samples: int) -> None:
    """2K steps straight == K-ish steps in a SIGKILLed child + the rest after a restore.

    Dropout is active, the data is shuffled by a DataLoader through a ResumableSampler
    (80 samples: checkpoints fall mid-epoch; 64: at epoch ends), Adam and StepLR run.
    """
    kill_at = random.Random(SEED + workers + samples).randint(K - 2, K + 2)
    progress, log = tmp_path / "progress", tmp_path / "child.log"
    with log.open("w") as out:
        # Output to a file, not a pipe: orphaned DataLoader workers would hold a pipe open.
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "child",
                str(tmp_path / "crashed"),
                str(kill_at),
                str(progress),
                str(workers),
                str(samples),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])},
        )
        code = child.wait(timeout=120)
    assert code == -signal.SIGKILL, f"child exited with {code}:\n{log.read_text()}"
    wait_for_lock(tmp_path / "crashed")

    async def reference() -> tuple[dict[int, float], dict[int, Any], dict[str, Any]]:
        trainer, sampler, loader = build(
            tmp_path / "reference", init_seed=0, workers=workers, samples=samples
        )
        saved: dict[int, Any] = {}

        async def after_step(step: int, loss: float) -> None:
            if step % CHECK_EVERY == 0:
                saved[step] = training_state(trainer, sampler)

        async with trainer:
            losses = await train_until(trainer, sampler, loader, 2 * K, after_step)
        return losses, saved, training_state(trainer, sampler)

    expected_losses, expected_at, expected_final = run(reference())
    assert sorted(expected_losses) == list(range(1, 2 * K + 1))

    lines = progress.read_text().split()
    child_losses = {int(s): float(v) for s, v in zip(lines[::2], lines[1::2], strict=True)}
    assert sorted(child_losses) == list(range(1, kill_at + 1))
    assert child_losses == {s: expected_losses[s] for s in child_losses}

    async def resumed() -> tuple[int, dict[str, Any], dict[int, float], dict[str, Any]]:
        # A new process's objects: different initial weights, which the restore replaces.
        trainer, sampler, loader = build(
            tmp_path / "crashed", init_seed=12345, workers=workers, samples=samples
        )
        async with trainer:
            start = await trainer.resume()
            at_start = training_state(trainer, sampler)
            losses = await train_until(trainer, sampler, loader, 2 * K)
        return start, at_start, losses, training_state(trainer, sampler)

    start, at_start, losses, final = run(resumed())
    assert CHECK_EVERY <= start <= kill_at and start % CHECK_EVERY == 0, (start, kill_at)
    assert_state_equal(at_start, expected_at[start])
    assert losses == {s: expected_losses[s] for s in range(start + 1, 2 * K + 1)}
    assert_state_equal(final, expected_final)  # parameters, Adam, StepLR, data position, RNG


# -- gradient accumulation -------------------------------------------------------------------
def test_gradient_accumulation_checkpoints_only_between_optimizer_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    reference = nn.Linear(6, 3)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(12, 6), torch.randn(12, 3)

    def mse(m: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    async def main() -> None:
        trainer = aiockpt.Trainer(
            model,
            loss_fn=mse,
            optimizer_class=torch.optim.SGD,
            optimizer_kwargs={"lr": 0.1},
            grad_accumulation_steps=3,
            config=make_config(tmp_path, interval_steps=2, keep_last=None),
        )
        # Forced on or off mid-window: it applies to the window's optimizer step. Steps:
        # 1 forced on, 2 (the policy's) forced off, 3 forced on, 4 by the policy.
        force = {1: True, 4: False, 6: True}
        async with trainer:
            saved = {}
            for micro in range(12):
                part = slice(4 * (micro % 3), 4 * (micro % 3) + 4)
                await trainer.train_step((x[part], y[part]), enable_checkpoint=force.get(micro))
                assert trainer.micro_step == (micro + 1) % 3
                assert trainer.step == (micro + 1) // 3
                if trainer.micro_step:
                    with pytest.raises(aiockpt.CheckpointError, match="micro-batches"):
                        await trainer.checkpoint()
                else:
                    saved[trainer.step] = clone_state(model.state_dict())
            await trainer.wait()
        infos = aiockpt.list_checkpoints(tmp_path / "ckpt")
        assert [info.step for info in infos] == [1, 3, 4]
        for info in infos:
            state = aiockpt.load(info.path)
            assert state["trainer"]["step"] == info.step
            assert_state_equal(dict(state["model"]), dict(saved[info.step]))

    run(main())
    # Three equal micro-batches accumulate the gradient of the whole batch.
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(4):
        nn.functional.mse_loss(reference(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want)


# -- forcing, deduplication, the policy's numbers --------------------------------------------
def _linear_trainer(tmp_path: Path, cls: type[Any] = aiockpt.Trainer, **cfg: Any) -> Any:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return cls(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        lambda m, batch: m(batch).square().mean(),
        config=make_config(tmp_path, keep_last=None, **cfg),
    )


def test_enable_checkpoint_overrides_the_policy(tmp_path: Path) -> None:
    async def main() -> None:
        async with _linear_trainer(tmp_path, interval_steps=2) as trainer:
            force = {2: False, 3: True}
            for step in range(1, 7):
                await trainer.train_step(torch.randn(5, 4), enable_checkpoint=force.get(step))
            first = await trainer.checkpoint()  # step 6 is checkpointed already: same handle
            assert first is await trainer.checkpoint() and first.step == 6
            await trainer.wait()
            # Every checkpoint reported its numbers to the policy once durable.
            assert trainer.policy.recorded == 3
            assert all(p > 0 for p in trainer.policy.persists)
            assert len(trainer.stalls) == 3 and all(s > 0 for s in trainer.stalls)
            assert len(trainer.policy.step_times) == 6

    run(main())
    assert [i.step for i in aiockpt.list_checkpoints(tmp_path / "ckpt")] == [3, 4, 6]


def test_sync_trainer_checkpoints_and_resumes(tmp_path: Path) -> None:
    saved = {}
    with _linear_trainer(tmp_path, aiockpt.SyncTrainer, interval_steps=3) as trainer:
        assert trainer.resume() == 0
        for _ in range(7):
            loss = trainer.train_step(torch.randn(5, 4))
            assert isinstance(loss, torch.Tensor) and not loss.requires_grad
            if trainer.step % 3 == 0:
                saved[trainer.step] = clone_state(trainer.model.state_dict())
        handle = trainer.checkpoint()
        assert isinstance(handle, aiockpt.SyncCheckpointHandle)
        assert handle.wait() is not None
    assert [i.step for i in aiockpt.list_checkpoints(tmp_path / "ckpt")] == [3, 6, 7]

    torch.manual_seed(1)  # other weights, which the restore replaces
    with _linear_trainer(tmp_path, aiockpt.SyncTrainer, interval_steps=3) as trainer:
        assert trainer.resume(step=6) == 6 == trainer.step
        assert_state_equal(clone_state(trainer.model.state_dict()), saved[6])
        assert trainer.resume() == 7


def test_config_from_a_toml_path(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text(
        f'[checkpoint]\ndirectory = "{tmp_path / "from-toml"}"\ninterval_steps = 2\n'
        "num_threads = 2\nkeep_last = 5\n"
    )

    async def main() -> None:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        async with aiockpt.Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            lambda m, b: m(b).sum(),
            config=str(path),
        ) as trainer:
            assert trainer.config.interval_steps == 2 and trainer.config.keep_last == 5
            for _ in range(5):
                await trainer.train_step(torch.randn(3, 4))

    run(main())
    assert [i.step for i in aiockpt.list_checkpoints(tmp_path / "from-toml")] == [2, 4]


def test_grad_scaler_state_round_trips(tmp_path: Path) -> None:
    def make(init_scale: float) -> aiockpt.Trainer:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
        return aiockpt.Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.01),
            lambda m, b: m(b).square().mean(),
            config=make_config(tmp_path),
            grad_scaler=scaler,
            max_grad_norm=1.0,
        )

    async def main() -> None:
        async with make(1024.0) as trainer:
            for _ in range(5):
                await trainer.train_step(torch.randn(3, 4))
            await trainer.checkpoint()
            expected = trainer.grad_scaler.state_dict()
        assert expected["scale"] == 4096.0  # grew twice: the scaler really ran
        async with make(2.0**16) as trainer:
            assert await trainer.resume() == 5
            assert trainer.grad_scaler.state_dict() == expected
        assert aiockpt.load(tmp_path / "ckpt" / "step-5")["scaler"] == expected

    run(main())


def test_constructor_checks(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    cfg = make_config(tmp_path)
    with pytest.raises(TypeError, match="optimizer_class"):
        aiockpt.Trainer(model, config=cfg)
    with pytest.raises(TypeError, match="names the Trainer saves"):
        aiockpt.Trainer(
            model,
            optimizer_class=torch.optim.SGD,
            optimizer_kwargs={"lr": 0.1},
            config=cfg,
            trainer=nn.Linear(1, 1),
        )
    with pytest.raises(ValueError, match="grad_accumulation_steps"):
        aiockpt.SyncTrainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            config=cfg,
            grad_accumulation_steps=0,
        )


def test_default_loss_is_the_models_own(tmp_path: Path) -> None:
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.mse_loss(self.fc(x).squeeze(1), target)}

    model = WithLoss()
    with aiockpt.SyncTrainer(
        model,
        optimizer_class=torch.optim.SGD,
        optimizer_kwargs={"lr": 0.1},
        config=make_config(tmp_path),
    ) as t:
        loss = t.train_step({"x": torch.randn(4, 3), "target": torch.randn(4)})
        assert loss.ndim == 0 and t.step == 1


# -- ResumableSampler ------------------------------------------------------------------------
def test_sampler_continues_at_the_next_index() -> None:
    first = aiockpt.ResumableSampler(50, seed=5)
    iterator = iter(first)
    head = [next(iterator) for _ in range(23)]
    state = first.state_dict()
    assert state == {"seed": 5, "epoch": 0, "position": 23}
    rest = list(iterator)
    assert sorted(head + rest) == list(range(50))
    assert first.state_dict() == {"seed": 5, "epoch": 1, "position": 0}
    epoch1 = list(first)

    second = aiockpt.ResumableSampler(50, seed=0)
    second.load_state_dict(state)
    assert list(second) == rest  # exactly the indices that would have come next
    assert list(second) == epoch1 != head + rest  # each epoch its own order
    second.set_epoch(2)
    assert second.state_dict() == {"seed": 5, "epoch": 2, "position": 0}
    second.load_state_dict({"seed": 5, "epoch": 2, "position": 7})
    second.set_epoch(2)  # the current epoch: a restored position survives
    assert second.position == 7
    with pytest.raises(ValueError, match="outside"):
        second.load_state_dict({"seed": 5, "epoch": 0, "position": 51})
    assert list(aiockpt.ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_track_counts_what_training_received_not_what_workers_prefetched() -> None:
    dataset = TensorDataset(torch.arange(64))
    sampler = aiockpt.ResumableSampler(dataset, seed=1)
    loader = DataLoader(
        dataset, batch_size=8, sampler=sampler, num_workers=2, generator=torch.Generator()
    )
    seen: list[int] = []
    for count, (batch,) in enumerate(sampler.track(loader), 1):
        seen += batch.tolist()
        # The workers hold up to prefetch_factor * num_workers batches more than this.
        assert sampler.state_dict()["position"] == 8 * count
        if count == 3:
            break
    assert sampler.state_dict() == {"seed": 1, "epoch": 0, "position": 24}
    rest = [i for (batch,) in sampler.track(loader) for i in batch.tolist()]
    assert seen + rest == sampler.order(0).tolist()
    assert sampler.state_dict() == {"seed": 1, "epoch": 1, "position": 0}
    with pytest.raises(ValueError, match="generator"):
        sampler.track(DataLoader(dataset, batch_size=8, sampler=sampler))
    with pytest.raises(ValueError, match="sampler=this sampler"):
        sampler.track(DataLoader(dataset, batch_size=8))


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    directory, kill_at, progress, workers, samples = sys.argv[2:7]
    asyncio.run(
        child_main(Path(directory), int(kill_at), Path(progress), int(workers), int(samples))
    )
