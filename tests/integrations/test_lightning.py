"""PyTorch Lightning's own Trainer and ModelCheckpoint, checkpointing through
AiockptCheckpointIO: real fits on the CPU, a real SIGKILL, exact resume."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import torch
from conftest import assert_state_equal, clone_state
from lightning_run import BATCHES_PER_EPOCH, Losses, Regressor, loader, trainer

import aiockpt
from aiockpt.integrations.lightning import AiockptCheckpointIO

RUNNER = Path(__file__).with_name("lightning_run.py")
TOTAL_STEPS = 30


class Recording(AiockptCheckpointIO):
    """The plugin itself, keeping a copy of every checkpoint dict Lightning hands it."""

    def __init__(self) -> None:
        super().__init__(aiockpt.Config(chunk_size_mb=0.25, num_threads=2))
        self.saved: dict[str, dict[str, Any]] = {}
        self.removed: list[str] = []

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        self.saved[os.fspath(path)] = clone_state(checkpoint)
        super().save_checkpoint(checkpoint, path, storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self.removed.append(os.fspath(path))
        super().remove_checkpoint(path)


def name_of(step: int) -> str:
    return f"epoch={(step - 1) // BATCHES_PER_EPOCH}-step={step}.ckpt"


def fit(directory: Path, max_steps: int, **kwargs: Any) -> tuple[Regressor, Losses, Recording]:
    module, losses, plugin = Regressor(), Losses(), Recording()
    trainer(directory, max_steps, losses, plugin).fit(module, loader(), **kwargs)
    return module, losses, plugin


def test_a_fit_saves_every_checkpoint_exactly_and_top_k_removes_the_right_ones(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "ckpts"
    module, _, plugin = fit(directory, TOTAL_STEPS)
    # ModelCheckpoint, unchanged: every 5 steps, the top 2 by step, and last.
    saved = sorted({Path(p).name for p in plugin.saved})
    assert saved == sorted([name_of(s) for s in range(5, 31, 5)] + ["last.ckpt"])
    assert sorted(Path(p).name for p in plugin.removed) == [name_of(s) for s in (5, 10, 15, 20)]
    assert sorted(os.listdir(directory)) == sorted([name_of(25), name_of(30), "last.ckpt"])
    kept = [p for p in plugin.saved if os.path.exists(p)]
    for path in kept:
        loaded = plugin.load_checkpoint(path)
        # Weights, optimizer and scheduler states, loops, callbacks, hyper-parameters and
        # versions come back with their exact types and bits (last.ckpt: the last save).
        assert_state_equal(loaded, plugin.saved[path])
    last = plugin.load_checkpoint(directory / "last.ckpt")
    assert last["global_step"] == TOTAL_STEPS
    assert_state_equal(last["state_dict"], clone_state(module.state_dict()))
    assert last["hyper_parameters"] == {"hidden": 16, "lr": 0.05, "extra": None}
    assert aiockpt.load(directory / name_of(25))["global_step"] == 25  # any aiockpt reader


def test_an_interrupted_fit_resumes_bit_for_bit(tmp_path: Path) -> None:
    reference, reference_losses, _ = fit(tmp_path / "reference", TOTAL_STEPS)

    directory = tmp_path / "ckpts"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(aiockpt.__file__).parents[1]), str(RUNNER.parent)]),
    }
    killed = subprocess.run(
        [sys.executable, str(RUNNER), str(directory), str(TOTAL_STEPS), "--kill-at", "17"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left_by_the_kill = os.listdir(directory)
    resumed_from = aiockpt.load(directory / "last.ckpt")["global_step"]
    assert resumed_from in (5, 10, 15)  # the newest save that was durable at the kill

    module, losses, plugin = fit(directory, TOTAL_STEPS, ckpt_path=directory / "last.ckpt")
    after = {s: loss for s, loss in losses.by_step.items() if s > resumed_from}
    assert sorted(after) == list(range(resumed_from + 1, TOTAL_STEPS + 1))
    assert after == {s: reference_losses.by_step[s] for s in after}  # every loss, exactly
    assert_state_equal(clone_state(module.state_dict()), clone_state(reference.state_dict()))
    # The resumed ModelCheckpoint went on removing what the killed run had kept; a save
    # the kill cut short left nothing behind once its path was saved again. One step's
    # two saves (top-k, then last) commit one after the other: killed between them, the
    # top-k one of step 15 is there but last.ckpt says 10, and the resumed run, which
    # knows nothing of it, saves its step 15 as "-v1" (Lightning's rule) and leaves it.
    orphans = [name_of(s) for s in (10, 15) if s > resumed_from]
    orphans = [name for name in orphans if name in left_by_the_kill]
    expected = [name_of(25), name_of(30), "last.ckpt", *orphans]
    assert sorted(os.listdir(directory)) == sorted(expected)
    assert all(Path(p).name != "last.ckpt" for p in plugin.removed)


def test_a_value_aiockpt_cannot_store_is_named(tmp_path: Path) -> None:
    # A path among the hyper-parameters: Lightning pickles it, aiockpt refuses to guess
    # a type for it (FORMAT.md: exact types only) and says where it is.
    module, losses = Regressor(extra=Path("data/train")), Losses()
    with pytest.raises(aiockpt.UnsupportedStateError, match="hyper_parameters/extra"):
        trainer(tmp_path / "ckpts", 6, losses).fit(module, loader())
    assert not (tmp_path / "ckpts").exists()  # refused before anything was made


def test_load_and_remove_wait_for_the_save_in_flight(tmp_path: Path) -> None:
    plugin = AiockptCheckpointIO(aiockpt.Config(chunk_size_mb=1, num_threads=1))
    state = {"state_dict": {"w": torch.arange(4_000_000, dtype=torch.float32)}, "epoch": 1}
    path = tmp_path / "one.ckpt"
    plugin.save_checkpoint(state, path)
    state["state_dict"]["w"].zero_()  # the capture is what gets saved
    loaded = plugin.load_checkpoint(path, map_location=torch.device("cpu"))
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(4_000_000, dtype=torch.float32))
    plugin.save_checkpoint(state, path)
    plugin.remove_checkpoint(path)
    assert os.listdir(tmp_path) == []
    with pytest.raises(aiockpt.UsageError, match="storage_options"):
        plugin.save_checkpoint(state, path, storage_options={"x": 1})
    plugin.teardown()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_teardown_raises_a_failed_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:  # the disk fails under the checkpoint's data files
        if "/.tmp-bad.ckpt-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    plugin = AiockptCheckpointIO()
    plugin.save_checkpoint({"w": torch.ones(1000)}, tmp_path / "bad.ckpt")
    with pytest.raises(aiockpt.BackgroundError, match=r"bad\.ckpt") as caught:
        plugin.teardown()
    assert isinstance(caught.value.__cause__, OSError)
    assert os.listdir(tmp_path) == []


def test_save_last_as_a_link_points_at_the_newest_and_resumes(tmp_path: Path) -> None:
    directory = tmp_path / "ckpts"
    plugin = Recording()
    trainer(directory, 12, Losses(), plugin, save_last="link").fit(Regressor(), loader())
    last = directory / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == name_of(10)
    assert sorted(os.listdir(directory)) == sorted([name_of(5), name_of(10), "last.ckpt"])
    assert plugin.load_checkpoint(last)["global_step"] == 10

    module, losses = Regressor(), Losses()
    trainer(directory, 20, losses, Recording(), save_last="link").fit(
        module, loader(), ckpt_path=last
    )
    assert sorted(losses.by_step) == list(range(11, 21))
    assert os.readlink(last) == name_of(20)
    assert sorted(os.listdir(directory)) == sorted([name_of(15), name_of(20), "last.ckpt"])
