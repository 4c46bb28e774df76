"""``aiockpt bench --trainer``: Trainer-driven throughput at several checkpoint intervals.

Each configuration trains the same model for the same wall time with a SyncTrainer,
after a warm-up checkpoint that allocates its staging memory, and reports samples/s
against the no-checkpoint run, plus the checkpoint interval actually achieved (with
on_backpressure = "skip", requests that find every in-flight place busy are dropped).
Configurations are interleaved round by round so drift hits them alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bench import Preset
from .config import Config
from .trainer import SyncTrainer

__all__ = ["run_trainer_matrix"]


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def _one_run(
    trainer: SyncTrainer, tokens: torch.Tensor, seconds: float, device: torch.device
) -> dict[str, float]:
    trainer.train_step(tokens, enable_checkpoint=True)  # warm-up: allocate staging memory
    trainer.wait()
    skipped_before = trainer.checkpointer.stats.skipped
    committed_before = trainer.checkpointer.stats.committed
    steps = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.train_step(tokens).item()  # .item(): the sync a real loop makes to log
        steps += 1
    elapsed = time.perf_counter() - start
    trainer.wait()
    stats = trainer.checkpointer.stats
    checkpoints = stats.committed - committed_before
    return {
        "steps": steps,
        "seconds": elapsed,
        "steps_per_second": steps / elapsed,
        "checkpoints": checkpoints,
        "skipped": stats.skipped - skipped_before,
        "achieved_interval": steps / checkpoints if checkpoints else float("inf"),
    }


def run_trainer_matrix(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    preset: Preset,
    device: torch.device,
    root: Path,
    *,
    intervals: list[tuple[int, str]],
    seconds: float,
    rounds: int,
    base: dict[str, Any],
) -> dict[str, Any]:
    """samples/s per (interval, backpressure policy), against no checkpoints at all."""
    tokens = torch.randint(0, preset.vocab, (preset.batch, preset.seq + 1), device=device)
    configs = [("none", 0, "block")]
    configs += [(f"every {n} ({policy})", n, policy) for n, policy in intervals]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in configs}
    for _ in range(rounds):
        for name, interval, policy in configs:
            directory = root / "trainer" / name.replace(" ", "-").replace("(", "").replace(")", "")
            config = Config(
                directory=directory,
                interval_steps=interval or None,
                on_backpressure=policy,
                keep_last=1,
                **base,
            )
            trainer = SyncTrainer(
                model, optimizer, _loss, config=config, amp=device.type == "cuda" and torch.bfloat16
            )
            try:
                runs[name].append(_one_run(trainer, tokens, seconds, device))
            finally:
                trainer.close()
    baseline = statistics.median(r["steps_per_second"] for r in runs["none"])
    table = {}
    for name, results in runs.items():
        rate = statistics.median(r["steps_per_second"] for r in results)
        table[name] = {
            "samples_per_second": rate * preset.batch,
            "vs_no_checkpoint": rate / baseline,
            "checkpoints": sum(r["checkpoints"] for r in results),
            "skipped": sum(r["skipped"] for r in results),
            "achieved_interval": statistics.median(r["achieved_interval"] for r in results),
            "raw": results,
        }
    return table
