"""aiockpt quickstart: checkpoint a training loop asynchronously, then resume it exactly.

    python examples/quickstart.py                # train, checkpoint, resume in a new process
    python examples/quickstart.py --dir ckpts    # keep the checkpoints in ./ckpts

The first process trains a small MLP (dropout, shuffled mini-batches) for 65 steps and
checkpoints every 10 steps. ``await ckpt.checkpoint(step)`` returns once the state is
captured; the write happens in the background while training goes on. Then the first
process pretends to crash: everything after its last checkpoint (step 60) is lost.

A second, fresh process builds a new model and optimizer (with different random
weights), restores the newest checkpoint, and redoes steps 61-65. It exits non-zero unless
the restored weights are bit-identical to the ones saved at step 60 and every redone loss
is bit-identical to what the first process computed: model, optimizer, LR scheduler, data
order and RNG state (dropout masks) all came back exactly.

Runs on a GPU when there is one, else on the CPU, in a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import aiockpt

TOTAL_STEPS = 65
CHECKPOINT_EVERY = 10
BATCH_SIZE = 128
DATA_SEED = 1234  # the data set itself is fixed; only its order is training state


class ShuffledBatches:
    """Endless mini-batches of a fixed data set, reshuffled every epoch.

    It is Stateful (state_dict/load_state_dict), so a checkpoint records where in which
    epoch's order training was, and a resume draws exactly the batches that would have
    come next.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.position = 0
        self.order = torch.randperm(len(x), generator=self.generator)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.order):
            self.epoch += 1
            self.position = 0
            self.order = torch.randperm(len(self.x), generator=self.generator)
        index = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.x[index], self.y[index]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "order": self.order,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.position = state["position"]
        self.order = state["order"]
        self.generator.set_state(state["generator"])


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """4096 points in 32 dimensions, labelled by a random teacher network (4 classes)."""
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(4096, 32, generator=g)
    teacher = torch.randn(32, 4, generator=g)
    y = (torch.tanh(x @ teacher) + 0.1 * torch.randn(4096, 4, generator=g)).argmax(dim=1)
    return x, y


def make_training(device: torch.device):  # type: ignore[no-untyped-def]
    model = nn.Sequential(
        nn.Linear(32, 256),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(256, 256),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(256, 4),
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=TOTAL_STEPS)
    x, y = make_data()
    batches = ShuffledBatches(x, y, BATCH_SIZE, seed=0)
    return model, optimizer, scheduler, batches


def train_step(model, optimizer, scheduler, batches, device) -> float:  # type: ignore[no-untyped-def]
    x, y = batches.next()
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def fingerprint(model: nn.Module) -> str:
    """A digest of the exact bits of every parameter and buffer."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(
            bytes(tensor.detach().cpu().contiguous().view(torch.uint8).flatten().tolist())
        )
    return digest.hexdigest()[:16]


def make_config(directory: Path) -> aiockpt.Config:
    # The same settings could come from a TOML file: aiockpt.Config.from_toml("aiockpt.toml").
    return aiockpt.Config(
        directory=directory,
        keep_last=3,  # retention: only the three newest checkpoints stay
        max_async=2,  # checkpoints in flight at once
        chunk_count=4,  # each checkpoint is written as 4 files in parallel
    )


async def train(directory: Path, device: torch.device) -> dict[str, Any]:
    """The first process: train, checkpointing every CHECKPOINT_EVERY steps."""
    torch.manual_seed(0)
    model, optimizer, scheduler, batches = make_training(device)
    cfg = make_config(directory)
    expected: dict[str, Any] = {"losses": {}}
    handles = []
    async with aiockpt.Checkpointer(
        cfg,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=batches,
        rng=aiockpt.RNGState(),
    ) as ckpt:
        for step in range(1, TOTAL_STEPS + 1):
            model.train()
            loss = train_step(model, optimizer, scheduler, batches, device)
            expected["losses"][step] = loss
            if step % CHECKPOINT_EVERY == 0:
                expected["step"], expected["fingerprint"] = step, fingerprint(model)
                # Returns once the state is captured. The handle could be awaited for the
                # durable commit; we let it persist in the background and keep training.
                handle = await ckpt.checkpoint(step)
                handles.append(handle)
                print(
                    f"step {step:3d}  loss {loss:.4f}  checkpoint captured, training "
                    f"stalled {handle.metrics.capture_ms:.2f} ms"
                )
        await ckpt.wait()  # everything in flight is now durable (or its error re-raised)

        print("\ncheckpoints, once durable:")
        for handle in handles:
            print(" ", handle.metrics.summary())
        stalls = [h.metrics.capture_ms for h in handles]
        stats = ckpt.stats
        print(
            f"stall per checkpoint: median {statistics.median(stalls):.2f} ms, "
            f"max {max(stalls):.2f} ms; requested {stats.requested}, committed "
            f"{stats.committed}, skipped {stats.skipped}, failed {stats.failed}"
        )
    kept = aiockpt.list_checkpoints(directory)
    print(f"kept (keep_last={cfg.keep_last}):", ", ".join(f"step-{i.step}" for i in kept))
    return expected


async def resume(directory: Path, device: torch.device, expected: dict[str, Any]) -> int:
    """The second process: fresh objects, restore, redo the steps the crash lost."""
    torch.manual_seed(987654321)  # different initial weights: the restore must replace them
    model, optimizer, scheduler, batches = make_training(device)
    async with aiockpt.Checkpointer(
        make_config(directory),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=batches,
        rng=aiockpt.RNGState(),
    ) as ckpt:
        step = await ckpt.restore()  # newest checkpoint whose checksums verify
    if step is None:
        print(f"[resume] no checkpoint found in {directory}")
        return 1
    print(f"[resume] resumed at step {step}")
    ok = True
    if step != expected["step"]:
        print(f"[resume] FAIL: expected the newest checkpoint, step {expected['step']}")
        ok = False
    got = fingerprint(model)
    same = got == expected["fingerprint"]
    ok &= same
    print(
        f"[resume] weights fingerprint {got} "
        f"{'==' if same else '!='} {expected['fingerprint']} saved at step {expected['step']}"
    )
    for next_step in range(step + 1, TOTAL_STEPS + 1):
        model.train()
        loss = train_step(model, optimizer, scheduler, batches, device)
        before = expected["losses"][str(next_step)]
        same = loss == before
        ok &= same
        print(
            f"[resume] step {next_step:3d}  loss {loss:.6f}  "
            f"{'== first run' if same else f'!= first run ({before:.6f})'}"
        )
    print(f"[resume] {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--expect", help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # Bit-identical losses across processes need deterministic GPU kernels (cuBLAS
        # reads this variable when it starts). CPU kernels already are.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    if args.resume:
        return asyncio.run(resume(args.dir, device, json.loads(args.expect)))

    temporary = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="aiockpt-quickstart-")) if temporary else args.dir
    shutil.rmtree(directory, ignore_errors=True)  # start clean
    try:
        print(f"training on {device}; checkpoints in {directory}")
        expected = asyncio.run(train(directory, device))
        print(
            f"\n-- the first process stops at step {TOTAL_STEPS}; steps after "
            f"{expected['step']} were never checkpointed. Resuming in a new process:",
            flush=True,
        )
        child = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--resume",
                "--dir",
                str(directory),
                "--expect",
                json.dumps(expected),
            ],
            check=False,
        )
        if child.returncode != 0:
            print(f"quickstart FAILED: the resumed process exited with {child.returncode}")
            return 1
        print(
            f"quickstart OK: training resumed at step {expected['step']} in a new process, "
            "bit-identical."
        )
        return 0
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
