"""A tiny, deterministic Lightning fit on the CPU, checkpointed through AiockptCheckpointIO.

Imported by tests/integrations/test_lightning.py, and run as a script by it for the
training that is killed: ``python lightning_run.py DIR MAX_STEPS --kill-at STEP`` fits
with ``ModelCheckpoint`` saving into DIR and SIGKILLs its own process at the end of
optimizer step STEP (a real crash: nothing is drained or closed).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from aiockpt.integrations.lightning import AiockptCheckpointIO

BATCHES_PER_EPOCH = 5
EVERY_N_STEPS = 5


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.05, extra: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8 * BATCHES_PER_EPOCH, 4, generator=generator)
    y = (x * torch.tensor([0.5, -1.0, 2.0, 0.1])).sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


class Losses(Callback):
    """Every step's loss, by the optimizer step it led to; optionally a SIGKILL."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.by_step: dict[int, float] = {}
        self.kill_at = kill_at

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.by_step[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def checkpoints(directory: Path, save_last: bool | str = True) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=directory,
        every_n_train_steps=EVERY_N_STEPS,
        save_top_k=2,
        monitor="step",
        mode="max",
        save_last=save_last,  # type: ignore[arg-type]
    )


def trainer(
    directory: Path,
    max_steps: int,
    losses: Losses,
    plugin: AiockptCheckpointIO | None = None,
    save_last: bool | str = True,
) -> L.Trainer:
    # Not deterministic=True: it turns torch.use_deterministic_algorithms on for the whole
    # process (the rest of a pytest run too); these CPU kernels give the same bits anyway.
    return L.Trainer(
        max_steps=max_steps,
        plugins=[plugin or AiockptCheckpointIO()],
        callbacks=[checkpoints(directory, save_last), losses],
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--kill-at", type=int)
    args = parser.parse_args()
    fit = trainer(args.directory, args.max_steps, Losses(args.kill_at))
    fit.fit(Regressor(), loader())


if __name__ == "__main__":
    main()
