"""Kill a training process with SIGKILL mid-run, resume it, and prove nothing changed.

    python examples/resume_after_crash.py              # kill at a random step
    python examples/resume_after_crash.py --seed 7     # a reproducible kill step

Three fresh processes run the same async ``aiockpt.Trainer`` loop (dropout, shuffled
DataLoader batches through a ResumableSampler, AdamW, a cosine LR schedule):

1. *crash*: trains with a checkpoint every 10 steps and, at a random step, kills itself
   with ``os.kill(os.getpid(), signal.SIGKILL)``: no cleanup, a checkpoint possibly still
   in flight.
2. *resume*: new objects (other random weights), ``await trainer.resume()`` loads the
   newest committed checkpoint, and training goes on to the last step.
3. *reference*: the same run without the crash.

The script exits non-zero unless the final model and optimizer state of 2 and 3 are
bitwise identical and every loss after the resume equals the reference's. Runs on a GPU
when there is one, else on the CPU, in well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import aiockpt

TOTAL_STEPS = 120
CHECKPOINT_EVERY = 10
EXAMPLES = Path(__file__).resolve().parent


def build(directory: Path, init_seed: int, device: torch.device):  # type: ignore[no-untyped-def]
    torch.manual_seed(init_seed)
    model = nn.Sequential(
        nn.Linear(32, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 4),
    ).to(device)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=TOTAL_STEPS)
    g = torch.Generator().manual_seed(1234)  # the data itself is fixed; its order is state
    x = torch.randn(2000, 32, generator=g)
    y = (x @ torch.randn(32, 4, generator=g)).argmax(dim=1)
    dataset = TensorDataset(x, y)
    sampler = aiockpt.ResumableSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler, generator=torch.Generator())

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = (t.to(device) for t in batch)
        return nn.functional.cross_entropy(model(inputs), targets)

    config = aiockpt.Config.from_toml(
        EXAMPLES / "aiockpt.toml", directory=directory, interval_steps=CHECKPOINT_EVERY
    )
    trainer = aiockpt.Trainer(
        model, optimizer, loss_fn, config=config, scheduler=scheduler, sampler=sampler
    )
    return trainer, sampler, loader


async def run(mode: str, directory: Path, kill_at: int, out: Path, device: torch.device) -> None:
    # "resume" builds its objects from other random weights: the restore must replace them.
    trainer, sampler, loader = build(directory, 999 if mode == "resume" else 0, device)
    losses: dict[int, float] = {}
    async with trainer:
        start = await trainer.resume()  # 0 when the directory has no checkpoint
        print(f"[{mode}] starting at step {start}", flush=True)
        while trainer.step < TOTAL_STEPS:
            for batch in sampler.track(loader):
                loss = await trainer.train_step(batch)  # checkpoints every 10 steps
                losses[trainer.step] = loss.item()
                if mode == "crash" and trainer.step == kill_at:
                    print(f"[crash] SIGKILL at step {kill_at}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                if trainer.step >= TOTAL_STEPS:
                    break
        stalls = [f"{s * 1e3:.1f}" for s in trainer.stalls]
        print(f"[{mode}] done; stall per checkpoint (ms): {', '.join(stalls)}", flush=True)
    state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}
    torch.save(state, out / f"{mode}.pt")
    (out / f"{mode}.json").write_text(json.dumps({"start": start, "losses": losses}))


def bitwise_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            bitwise_equal(a[k], b[k]) for k in a
        )  # fmt: skip
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def child(mode: str, directory: Path, out: Path, kill_at: int = 0) -> int:
    command = [sys.executable, __file__, "--mode", mode, "--dir", str(directory)]
    command += ["--out", str(out), "--kill-at", str(kill_at)]
    return subprocess.run(command, check=False).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="picks the kill step (default: random)")
    parser.add_argument("--mode", choices=["crash", "resume", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kill-at", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # Bit-identical runs across processes need deterministic GPU kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if args.mode:
        asyncio.run(run(args.mode, args.dir, args.kill_at, args.out, device))
        return 0

    kill_at = random.Random(args.seed).randint(CHECKPOINT_EVERY + 1, TOTAL_STEPS - 5)
    work = Path(tempfile.mkdtemp(prefix="aiockpt-crash-"))
    try:
        print(f"training on {device}; the first process will be killed at step {kill_at}")
        code = child("crash", work / "checkpoints", work, kill_at)
        if code != -signal.SIGKILL:
            print(f"FAIL: the crashing process exited with {code}, not SIGKILL")
            return 1
        committed = [info.step for info in aiockpt.list_checkpoints(work / "checkpoints")]
        print(f"committed checkpoints after the kill: {committed}")
        if child("resume", work / "checkpoints", work) or child("reference", work / "ref", work):
            print("FAIL: a child process failed")
            return 1
        resumed = torch.load(work / "resume.pt", weights_only=True)
        reference = torch.load(work / "reference.pt", weights_only=True)
        log = json.loads((work / "resume.json").read_text())
        expected = json.loads((work / "reference.json").read_text())["losses"]
        same_losses = all(expected[step] == loss for step, loss in log["losses"].items())
        same_model = bitwise_equal(resumed["model"], reference["model"])
        same_optimizer = bitwise_equal(resumed["optimizer"], reference["optimizer"])
        print(
            f"resumed at step {log['start']}, redid steps {log['start'] + 1}-{TOTAL_STEPS}:\n"
            f"  losses {'==' if same_losses else '!='} the uninterrupted run's\n"
            f"  model parameters {'bitwise ==' if same_model else '!='} the uninterrupted run's\n"
            f"  optimizer state {'bitwise ==' if same_optimizer else '!='} the uninterrupted run's"
        )
        ok = same_losses and same_model and same_optimizer and log["start"] > 0
        print("OK: exact resume after SIGKILL" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
