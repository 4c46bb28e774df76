"""aiockpt in a plain (non-async) training script: SyncTrainer, a DataLoader, a scheduler.

    python examples/train_sync.py                         # 240 steps, checkpoint every 20
    python examples/train_sync.py --dir ckpts             # keep the checkpoints: stop it
                                                          # (Ctrl-C), run it again: it resumes
    python examples/train_sync.py --max-overhead 0.01     # let aiockpt pick the interval
    python examples/train_sync.py --workers 2             # DataLoader worker processes

Each checkpoint is captured in a few milliseconds inside ``train_step`` and written in the
background while training goes on; the script prints what each one cost the training
loop (the stall) and, at the end, the median stall and the time to durable. The data
position is training state too: a ResumableSampler shuffles each epoch with its own
generator and is checkpointed with the model, so a resumed run sees exactly the batches
the interrupted one would have seen next.

Runs on a GPU when there is one, else on the CPU, in a few seconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import aiockpt

EXAMPLES = Path(__file__).resolve().parent


def make_dataset() -> TensorDataset:
    """8192 points in 64 dimensions, labelled by a random teacher network (10 classes)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(8192, 64, generator=g)
    y = (torch.tanh(x @ torch.randn(64, 10, generator=g))).argmax(dim=1)
    return TensorDataset(x, y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="checkpoint directory (default: a temporary one)")
    # The LR schedule is sized from --steps and saved with the rest: keep it on a resume.
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps in all")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--interval", type=int, default=20, help="checkpoint every N steps")
    group.add_argument("--max-overhead", type=float, help="or: keep the stall under this fraction")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    temporary = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="aiockpt-train-sync-")) if temporary else args.dir

    # Settings from the commented example file; the keyword arguments override it.
    interval = None if args.max_overhead else args.interval
    config = aiockpt.Config.from_toml(
        EXAMPLES / "aiockpt.toml",
        directory=directory,
        interval_steps=interval,
        max_overhead=args.max_overhead,
        chunk_count=4,
        keep_last=2,
    )

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 256), nn.GELU(),
        nn.Linear(256, 10),
    ).to(device)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps)
    dataset = make_dataset()
    sampler = aiockpt.ResumableSampler(dataset, seed=0)
    loader = DataLoader(
        dataset,
        batch_size=128,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps iter(loader) off the global RNG (dropout's)
    )

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        return nn.functional.cross_entropy(model(x), y)

    print(f"training on {device}; checkpoints in {directory}")
    try:
        with aiockpt.SyncTrainer(
            model,
            optimizer,
            loss_fn,
            config=config,
            scheduler=scheduler,
            max_grad_norm=1.0,
            sampler=sampler,  # the data position is saved with everything else
        ) as trainer:
            start = trainer.resume()
            if start:
                print(f"resumed at step {start} (epoch {sampler.epoch}, sample {sampler.position})")
            began = time.perf_counter()
            try:
                while trainer.step < args.steps:
                    for batch in sampler.track(loader):
                        before = trainer.last_checkpoint
                        loss = trainer.train_step(batch)
                        handle = trainer.last_checkpoint
                        if handle is not before and handle is not None:
                            print(
                                f"step {trainer.step:4d}  loss {loss.item():.4f}  "
                                f"lr {scheduler.get_last_lr()[0]:.2e}  checkpoint captured, "
                                f"training stalled {handle.metrics.capture_ms:.2f} ms"
                            )
                        if trainer.step >= args.steps:
                            break
            except KeyboardInterrupt:
                trainer.wait()  # what was captured still becomes durable
                newest = aiockpt.list_checkpoints(directory)
                if newest and not temporary:
                    print(
                        f"\ninterrupted at step {trainer.step}; run the same command to "
                        f"resume from step-{newest[-1].step}"
                    )
                return 130
            trainer.wait()  # every checkpoint durable (or its error raised here)
            elapsed = time.perf_counter() - began
            steps = trainer.step - start
            print(f"\n{steps} steps in {elapsed:.2f} s ({steps * 128 / elapsed:.0f} samples/s)")
            if trainer.stalls:
                stalls = sorted(s * 1e3 for s in trainer.stalls)
                print(
                    f"{len(stalls)} checkpoints; stall median {statistics.median(stalls):.2f} ms, "
                    f"max {stalls[-1]:.2f} ms; skipped {trainer.skipped}"
                )
                print("newest, once durable:", trainer.last_checkpoint.metrics.summary())
        kept = aiockpt.list_checkpoints(directory)
        print("kept:", ", ".join(f"step-{info.step}" for info in kept))
        return 0
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
