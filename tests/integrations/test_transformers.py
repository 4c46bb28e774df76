"""AiockptCallback with a real transformers.Trainer: a small randomly initialised GPT-2 on CPU.

A run stopped at a save step and resumed by new model and Trainer objects continues as the
uninterrupted run did: the same loss at every step after the resume, bit for bit, and the
same final weights. The Trainer writes no checkpoint of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import aiockpt  # noqa: E402
from aiockpt.integrations.transformers import AiockptCallback  # noqa: E402

STEPS = 14  # 12 batches an epoch: the runs cross an epoch boundary
SAVE_STEPS = 4
SEQ = 16


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # Tiny matrices: several threads only wait for each other (and for other processes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TokenIds(torch.utils.data.Dataset):
    """Synthetic token ids, the same for every instance."""

    def __init__(self, count: int = 48) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, 64, (count, SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class LossPerStep(transformers.TrainerCallback):
    """Records the loss the Trainer logs at every step (logging_steps=1)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


class StopAt(transformers.TrainerCallback):
    """Stops training after a given step, as a crash right after it would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class KillAt(transformers.TrainerCallback):
    """SIGKILLs its own process after a given step, checkpoints in flight or not, once the
    checkpoint of step ``durable`` is committed (so that there is one to resume from)."""

    def __init__(self, step: int, durable: int, directory: Path) -> None:
        self.step, self.durable, self.directory = step, durable, directory

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        for _ in range(6000):  # a minute at most, on a loaded machine
            if self.durable in [i.step for i in aiockpt.list_checkpoints(self.directory)]:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.01)
        raise AssertionError(f"step {self.durable} never committed")


def make_trainer(tmp_path: Path, callbacks: list[Any], **overrides: Any) -> transformers.Trainer:
    """A fresh tiny GPT-2 (dropout on) and Trainer; every run builds all of it anew."""
    transformers.set_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    settings: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    args = transformers.TrainingArguments(**settings)
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TokenIds(),
        eval_dataset=TokenIds(8),
        callbacks=callbacks,
    )


def weights(trainer: transformers.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def train_uninterrupted(tmp_path: Path, **overrides: Any) -> tuple[dict[int, float], dict]:
    losses = LossPerStep()
    trainer = make_trainer(tmp_path / "whole", [losses], **{**overrides, "save_strategy": "no"})
    trainer.train()
    return losses.losses, weights(trainer)


def stop_at(tmp_path: Path, config: aiockpt.Config, stop: int, **overrides: Any) -> None:
    """Train with checkpoints until ``stop``, as a run that dies right after that step."""
    trainer = make_trainer(tmp_path, [AiockptCallback(config), StopAt(stop)], **overrides)
    trainer.train()
    assert trainer.state.global_step == stop


def resume(tmp_path: Path, config: aiockpt.Config, **overrides: Any) -> tuple[dict, dict]:
    """New model, Trainer and callback objects that resume in one line; the losses they log
    and their final weights."""
    callback, losses = AiockptCallback(config), LossPerStep()
    trainer = make_trainer(tmp_path, [callback, losses], **overrides)
    trainer.train(resume_from_checkpoint=callback.resume_point())
    return losses.losses, weights(trainer)


def checkpoint_config(tmp_path: Path, **kw: Any) -> aiockpt.Config:
    kw.setdefault("keep_last", 2)
    return aiockpt.Config(directory=tmp_path / "ckpt", num_threads=2, **kw)


def assert_same_run(
    whole: tuple[dict[int, float], dict], resumed: dict[int, float], final: dict, start: int
) -> None:
    expected_losses, expected_weights = whole
    assert sorted(resumed) == list(range(start + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == expected_losses[step], f"step {step}: {loss} != {expected_losses[step]}"
    assert final.keys() == expected_weights.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, expected_weights[name]), name


# With evaluation at every save step: evaluation draws from the global generator, so the
# checkpoint must hold the generators as they are after it, as the Trainer's own save does.
EVAL_AND_ACCUMULATION = {
    "eval_strategy": "steps",
    "eval_steps": SAVE_STEPS,
    "gradient_accumulation_steps": 2,
}


@pytest.mark.parametrize(
    ("stop", "overrides"),
    [(8, {}), (12, {}), (8, EVAL_AND_ACCUMULATION), (12, {"save_strategy": "epoch"})],
    ids=["mid-epoch", "epoch-boundary", "eval-and-accumulation", "save-every-epoch"],
)
def test_resume_continues_bit_for_bit(tmp_path: Path, stop: int, overrides: dict) -> None:
    whole = train_uninterrupted(tmp_path, **overrides)
    config = checkpoint_config(tmp_path)
    stop_at(tmp_path, config, stop, **overrides)
    losses, final = resume(tmp_path, config, **overrides)
    assert_same_run(whole, losses, final, stop)
    # Only aiockpt wrote checkpoints: the Trainer's blocking save was switched off.
    out = tmp_path / "out"
    assert not [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert not (out / "aiockpt-resume").exists()  # removed after the first resumed step
    assert [i.step for i in aiockpt.list_checkpoints(tmp_path / "ckpt")] == [12, STEPS]


def test_a_corrupt_newest_checkpoint_is_passed_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole = train_uninterrupted(tmp_path)
    config = checkpoint_config(tmp_path, keep_last=3)
    stop_at(tmp_path, config, 12)
    newest = tmp_path / "ckpt" / "step-12"
    # One flipped byte, in the middle of the biggest tensor this checkpoint wrote itself (a
    # file it shares with older ones, unchanged tensors, would damage those too).
    manifest = json.loads((newest / "manifest.json").read_bytes())
    piece = max(
        (p for t in manifest["tensors"] for p in t["pieces"] if "-s" not in p["file"]),
        key=lambda p: p["length"],
    )
    data = newest / piece["file"]
    with data.open("r+b") as f:
        f.seek(piece["offset"] + piece["length"] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level("WARNING", logger="aiockpt"):
        losses, final = resume(tmp_path, config)
    assert "step-12" in caplog.text
    assert_same_run(whole, losses, final, 8)  # from the checkpoint before it


def test_no_checkpoint_yet_is_a_fresh_start(tmp_path: Path) -> None:
    callback = AiockptCallback(checkpoint_config(tmp_path))
    make_trainer(tmp_path, [callback])
    assert callback.resume_point() is None


def test_resume_point_before_the_trainer_is_built(tmp_path: Path) -> None:
    with pytest.raises(aiockpt.UsageError, match="build the Trainer"):
        AiockptCallback(checkpoint_config(tmp_path)).resume_point()


def test_a_prepared_resume_not_passed_to_train(tmp_path: Path) -> None:
    config = checkpoint_config(tmp_path)
    stop_at(tmp_path, config, 4)
    callback = AiockptCallback(config)
    trainer = make_trainer(tmp_path, [callback])
    assert callback.resume_point() is not None
    with pytest.raises(aiockpt.UsageError, match="resume_from_checkpoint"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not (tmp_path / "out" / "aiockpt-resume").exists()


def test_settings_it_cannot_serve_are_refused_before_training(tmp_path: Path) -> None:
    callback = AiockptCallback(checkpoint_config(tmp_path))
    trainer = make_trainer(
        tmp_path,
        [callback],
        eval_strategy="steps",
        eval_steps=SAVE_STEPS,
        load_best_model_at_end=True,
    )
    with pytest.raises(aiockpt.UsageError, match="load_best_model_at_end"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not aiockpt.list_checkpoints(tmp_path / "ckpt")


def test_no_save_strategy_is_said_out_loud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = checkpoint_config(tmp_path, interval_steps=5)
    trainer = make_trainer(tmp_path, [AiockptCallback(config)], save_strategy="no", max_steps=2)
    with caplog.at_level("WARNING", logger="aiockpt"):
        trainer.train()
    assert "takes no checkpoint" in caplog.text
    assert "interval_steps is not used" in caplog.text
    assert not aiockpt.list_checkpoints(tmp_path / "ckpt")


def test_a_config_of_the_wrong_type() -> None:
    with pytest.raises(aiockpt.ConfigError, match="AiockptCallback"):
        AiockptCallback(42)  # type: ignore[arg-type]


KILL_AT = 10


def train_until_killed(root: str) -> None:
    """In a process of its own: train with checkpoints until SIGKILL after step KILL_AT."""
    torch.set_num_threads(1)  # as in the test process: the same arithmetic
    tmp_path = Path(root)
    config = checkpoint_config(tmp_path)
    callbacks = [AiockptCallback(config), KillAt(KILL_AT, SAVE_STEPS, config.directory)]
    make_trainer(tmp_path, callbacks).train()


@pytest.mark.slow
def test_resume_after_sigkill_of_the_training_process(tmp_path: Path) -> None:
    whole = train_uninterrupted(tmp_path)
    here = Path(__file__).resolve().parent
    code = (
        f"import sys; sys.path.insert(0, {str(here)!r}); import test_transformers as t; "
        f"t.train_until_killed({str(tmp_path)!r})"
    )
    python_path = os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")])
    child = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": python_path},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    losses, final = resume(tmp_path, checkpoint_config(tmp_path))
    # Step 8's checkpoint may or may not have been durable when the process died.
    start = min(losses) - 1
    assert start in (4, 8)
    assert_same_run(whole, losses, final, start)
