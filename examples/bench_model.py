"""Your own model in ``aiockpt bench``: a function that builds it and one training step.

    aiockpt bench --model examples.bench_model:workload            (from the repository root)
    aiockpt bench --model examples.bench_model:workload --systems none,aiockpt --steps 100

``aiockpt bench --model MODULE:FUNCTION`` imports MODULE (the current directory is on the
path), calls FUNCTION with the torch.device to train on, and checkpoints
``{"model": model, "optimizer": optimizer}`` with every system it compares. Replace the
model, optimizer and batch below with yours; keep the return value's shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

BATCH = 64


def workload(
    device: torch.device,
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None], int]:
    """(model, optimizer, step_fn, samples_per_step): what ``--model`` expects."""
    model = nn.Sequential(
        nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10)
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A fixed batch already on the device: the bench measures checkpointing, not loading.
    inputs = torch.randn(BATCH, 256, device=device)
    labels = torch.randint(0, 10, (BATCH,), device=device)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step, BATCH
