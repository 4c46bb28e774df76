"""Checkpoints of a Hugging Face ``transformers.Trainer`` through aiockpt.

:class:`AiockptCallback` takes the checkpoints the Trainer's ``save_strategy`` and
``save_steps`` ask for: training waits for the capture, the files are written in the
background, and the Trainer's own blocking save of those steps is switched off through its
control object, so that nothing is written twice.

Resuming goes through the Trainer's own ``resume_from_checkpoint``, because only that path
makes the Trainer skip the epochs and batches already trained and put the random generators
back at the moment its data skipping needs them::

    trainer.train(resume_from_checkpoint=callback.resume_point())

The Trainer reads model weights and ``trainer_state.json`` from that directory before any
callback runs, so :meth:`AiockptCallback.resume_point` writes them there from the newest
valid aiockpt checkpoint (with ``rng_state.pth``); the optimizer, the LR scheduler and the
grad scaler, most of the bytes, are restored in place from the same checkpoint when
training begins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # the extra is optional: say which one
    raise ImportError(
        "aiockpt.integrations.transformers needs transformers and accelerate: "
        "pip install 'aiockpt[transformers]'"
    ) from exc

import aiockpt
from aiockpt._util.location import Location
from aiockpt.cli.convert import export_checkpoint
from aiockpt.cli.verify import verify_checkpoints
from aiockpt.config import resolve_config

__all__ = ["AiockptCallback"]

logger = logging.getLogger(__name__)

# The files the Trainer reads from a resume_from_checkpoint directory.
_WEIGHTS_FILE = "model.safetensors"
_TRAINER_STATE_FILE = "trainer_state.json"
_RNG_FILE = "rng_state.pth"
# Where resume_point() writes that directory, under the Trainer's output_dir. Not named
# checkpoint-<N>, so that the Trainer's rotation and get_last_checkpoint() never see it.
_RESUME_DIR = "aiockpt-resume"
# What resume_point() reads for the Trainer besides the model weights; the rest is
# restored in place at train begin.
_FOR_THE_TRAINER = ("trainer_state", "rng")
_RESTORED_IN_PLACE = ("optimizer", "scheduler", "scaler")


class _TrainerStateRecord:
    """The Trainer's TrainerState as a Stateful: the JSON text of trainer_state.json.

    It holds the global step and the epoch, from which the Trainer derives the data
    position on resume, and the log history, best metric and counters it reports.
    """

    def __init__(self) -> None:
        self.state: TrainerState | None = None

    def state_dict(self) -> dict[str, Any]:
        if self.state is None:
            raise aiockpt.UsageError("no TrainerState yet: checkpoints start with training")
        # The Trainer's own trainer_state.json writer does the same; its reader takes it back.
        text = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"
        return {"json": text}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.state is None:
            raise aiockpt.UsageError("no TrainerState to restore into before training begins")
        for key, value in json.loads(state_dict["json"]).items():
            setattr(self.state, key, value)


class AiockptCallback(TrainerCallback):
    """Asynchronous, crash-safe checkpoints for ``transformers.Trainer``.

    >>> callback = AiockptCallback("aiockpt.toml")
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    >>> trainer.train(resume_from_checkpoint=callback.resume_point())  # None: a fresh start

    The Trainer's ``save_strategy`` (``"steps"`` or ``"epoch"``) and ``save_steps`` decide
    when; each checkpoint holds the model, optimizer, LR scheduler, grad scaler (when the
    Trainer uses one), every random generator and the TrainerState, and is named after the
    global step. It is captured where the Trainer would have saved, after that step's
    logging and evaluation, and persisted in the background; ``train()`` returns once every
    checkpoint is durable. Retention is the Config's ``keep_last``; its interval keys are
    not used (the Trainer's arguments decide).

    Args:
        config: a :class:`~aiockpt.Config`, the path of a TOML file, or None for the
            defaults with ``directory`` set to ``<output_dir>/aiockpt``.

    Raises:
        ConfigError: ``config`` is not a Config or a TOML path, or the file is bad.
    """

    def __init__(self, config: aiockpt.Config | str | os.PathLike[str] | None = None) -> None:
        self._config = None if config is None else resolve_config(config, "AiockptCallback")
        self._args: TrainingArguments | None = None
        self._checkpointer: aiockpt.SyncCheckpointer | None = None
        self._record = _TrainerStateRecord()
        # The step whose save the Trainer asked for, captured at the next step, epoch or
        # the end of training: by then the Trainer has logged and evaluated (evaluation
        # draws from the global generator, and ReduceLROnPlateau steps on its metric),
        # which is the state its own save would have held. The next step's batches are
        # fetched by then too, as on resume, where the Trainer fetches them before it puts
        # the generators back.
        self._due: int | None = None
        # The step and directory that resume_point() prepared, until training restores it.
        self._resume: tuple[int, Path] | None = None
        # The resume directory, removed once the Trainer has read its last file from it.
        self._consumed: Path | None = None

    @property
    def checkpointer(self) -> aiockpt.SyncCheckpointer | None:
        """The checkpointer of the training under way (its ``stats``, ``staging``,
        ``layout``), or None outside ``trainer.train()``."""
        return self._checkpointer

    def resume_point(self) -> str | None:
        """Prepare the newest valid checkpoint for ``trainer.train(resume_from_checkpoint=...)``.

        Writes the directory the Trainer reads on resume (model weights,
        ``trainer_state.json``, ``rng_state.pth``) as ``<output_dir>/aiockpt-resume``, from
        the newest checkpoint whose every byte passes its checksum (a corrupt one is
        skipped with a warning; the check reads the checkpoint once more, streaming). The
        callback restores the optimizer, scheduler and grad scaler of the same checkpoint
        when training begins, and removes the directory after the first step. Call it after
        the Trainer is built with this callback.

        Returns:
            The directory to pass as ``resume_from_checkpoint``, or None when there is no
            checkpoint yet (``resume_from_checkpoint=None`` starts from scratch).

        Raises:
            UsageError: the Trainer is not built yet, or uses a setting the callback
                cannot serve (``load_best_model_at_end``, several processes, ...).
            CorruptCheckpointError: every checkpoint fails its checks (each is named).
            MissingStateError: a checkpoint that this callback did not write.
            ConversionError: the model holds a dtype that the Trainer's weights file
                (safetensors) has no name for.
            RestoreError: the resume directory could not be written.
        """
        if self._args is None:
            raise aiockpt.UsageError(
                "resume_point() needs the Trainer's arguments: build the Trainer with "
                "callbacks=[this callback] first, then call it"
            )
        args = self._args
        _check_supported(args)
        config = self._config_for(args)
        failures: list[str] = []
        for info in reversed(aiockpt.list_checkpoints(config.directory)):
            # Every byte is checked before one is used: the Trainer has loaded the model
            # and skipped the data by the time the optimizer is restored, too late to fall
            # back to an older checkpoint then. The check streams, holding little memory.
            verdict = verify_checkpoints([info.path], threads=config.num_threads)[0]
            if not verdict.valid:
                reason = "; ".join(p.describe() for p in verdict.problems) or verdict.status
                logger.warning("skipping checkpoint %s for the resume: %s", info.path, reason)
                failures.append(f"{info.path}: {reason}")
                continue
            try:
                saved = aiockpt.load(info.path, keys=_FOR_THE_TRAINER)
            except aiockpt.MissingStateError as exc:
                raise aiockpt.MissingStateError(
                    f"{info.path} was not written by AiockptCallback (it lacks one of "
                    f"{list(_FOR_THE_TRAINER)}); give the callback a directory of its own"
                ) from exc
            directory = _write_resume_directory(
                _output_dir(args), info.path, saved, config.num_threads
            )
            self._resume = (info.step, directory)
            logger.info("resuming from %s (step %d) through %s", info.path, info.step, directory)
            return str(directory)
        if failures:
            raise aiockpt.CorruptCheckpointError(
                f"no checkpoint under {config.directory} can be resumed: " + "; ".join(failures)
            )
        return None

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Keep the Trainer's arguments, for resume_point()."""
        self._args = args

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Open a checkpointer on the Trainer's objects; restore the optimizer, scheduler
        and grad scaler of the checkpoint that resume_point() prepared.

        Raises:
            UsageError: a setting the callback cannot serve, or a prepared resume that was
                not passed to ``trainer.train(resume_from_checkpoint=...)``.
            RestoreError: the prepared checkpoint can no longer be read.
        """
        self._args = args
        _check_supported(args)
        config = self._config_for(args)
        _warn_about_unused_settings(args, config)
        if self._resume is not None and state.global_step != self._resume[0]:
            step, self._consumed = self._resume
            self._resume = None
            self._drop_resume_directory()
            raise aiockpt.UsageError(
                f"resume_point() prepared step {step}, but the Trainer starts at step "
                f"{state.global_step}: pass what it returned to "
                "trainer.train(resume_from_checkpoint=...)"
            )
        if self._checkpointer is not None:  # an earlier train() that raised
            self._checkpointer.close()
            self._checkpointer = None
        optimizer = kwargs["optimizer"]
        objects: dict[str, Any] = {
            "model": kwargs["model"],
            "optimizer": optimizer,
            "scheduler": kwargs["lr_scheduler"],
            "rng": aiockpt.RNGState(),
            "trainer_state": self._record,
        }
        # accelerate keeps the Trainer's GradScaler (fp16) on the optimizer it wraps.
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            objects["scaler"] = scaler
        self._due = None
        self._record.state = state
        self._checkpointer = aiockpt.SyncCheckpointer(config, **objects)
        if self._resume is not None:
            step, directory = self._resume
            self._resume = None
            self._checkpointer.restore(
                step=step, only=[name for name in _RESTORED_IN_PLACE if name in objects]
            )
            self._consumed = directory

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Capture the checkpoint the last step's save asked for."""
        self._capture_due(state)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Take over the save the Trainer's flow asks for at this step."""
        # The Trainer has read the generators' file by the end of the first step.
        self._drop_resume_directory()
        self._take_over_save(state, control)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Capture the checkpoint the last epoch's save asked for."""
        self._capture_due(state)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Take over the save the Trainer's flow asks for at the end of the epoch."""
        self._take_over_save(state, control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Capture the last checkpoint asked for, wait until every one is durable, and close.

        Raises:
            BackgroundError: a checkpoint failed in the background; ``__cause__`` holds the
                original exception, and the checkpoints before it are intact.
        """
        self._capture_due(state)
        self._drop_resume_directory()  # when no step was left to train
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.close()  # every checkpoint durable; a background failure raises

    def _take_over_save(self, state: TrainerState, control: TrainerControl) -> None:
        if control.should_save:
            # The Trainer's blocking save would write the same state a second time.
            control.should_save = False
            self._due = state.global_step

    def _drop_resume_directory(self) -> None:
        if self._consumed is not None:
            # Derived from a checkpoint that stays; left behind, the next resume replaces it.
            shutil.rmtree(self._consumed, ignore_errors=True)
            self._consumed = None

    def _capture_due(self, state: TrainerState) -> None:
        if self._due is None or self._checkpointer is None:
            return
        step, self._due = self._due, None
        self._record.state = state
        self._checkpointer.checkpoint(step)

    def _config_for(self, args: TrainingArguments) -> aiockpt.Config:
        if self._config is None:
            self._config = aiockpt.Config(directory=_output_dir(args) / "aiockpt")
        return self._config


def _output_dir(args: TrainingArguments) -> Path:
    if args.output_dir is None:
        raise aiockpt.UsageError(
            "TrainingArguments.output_dir is not set: AiockptCallback writes the resume "
            "directory (and, without a Config, its checkpoints) under it"
        )
    return Path(args.output_dir)


def _check_supported(args: TrainingArguments) -> None:
    """Refuse the Trainer settings whose checkpoints the callback cannot take or restore."""
    refused = []
    if args.load_best_model_at_end or args.save_strategy == "best":
        refused.append(
            "load_best_model_at_end / save_strategy='best' (the Trainer decides those saves "
            "after the callbacks have run, and reloads its own checkpoint-<N> directories)"
        )
    if args.world_size > 1:
        refused.append(f"{args.world_size} processes (the callback serves one)")
    if args.deepspeed or args.fsdp:
        refused.append("DeepSpeed or FSDP (the Trainer saves and loads their state itself)")
    if refused:
        raise aiockpt.UsageError(
            "AiockptCallback cannot serve " + "; ".join(refused) + ": use save_strategy "
            "'steps' or 'epoch' in one process, or leave the callback out"
        )


def _warn_about_unused_settings(args: TrainingArguments, config: aiockpt.Config) -> None:
    """Say which settings do not do what they would without the callback."""
    if args.save_strategy == "no":
        logger.warning(
            "save_strategy is 'no': AiockptCallback takes no checkpoint; set it to 'steps' "
            "(with save_steps) or 'epoch'"
        )
    intervals = [
        k
        for k in ("interval_steps", "interval_seconds", "max_overhead")
        if getattr(config, k) is not None
    ]
    if intervals:
        logger.warning(
            "AiockptCallback checkpoints when the Trainer's save_strategy says so; the "
            "Config's %s is not used",
            ", ".join(intervals),
        )
    if args.push_to_hub:
        logger.warning(
            "push_to_hub: the Trainer pushes the checkpoints it writes itself, and "
            "AiockptCallback takes their place, so none is pushed during training"
        )


def _write_resume_directory(
    output_dir: Path, checkpoint: Location, saved: dict[str, Any], threads: int
) -> Path:
    """Write what the Trainer reads on resume as ``output_dir/aiockpt-resume``, whole or
    not at all: it is built beside the target and renamed into place."""
    target = output_dir / _RESUME_DIR
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{_RESUME_DIR}-", dir=output_dir))
    except OSError as exc:
        raise aiockpt.RestoreError(
            f"cannot write the resume directory under {output_dir}: {exc}; make the "
            "Trainer's output_dir writable"
        ) from exc
    try:
        # The model's tensors under the module's own names, tied weights stored once each.
        export_checkpoint(
            checkpoint, "safetensors", staging / _WEIGHTS_FILE, keys=["model"], threads=threads
        )
        (staging / _TRAINER_STATE_FILE).write_text(saved["trainer_state"]["json"])
        torch.save(_trainer_rng_state(saved["rng"]), staging / _RNG_FILE)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except OSError as exc:
        raise aiockpt.RestoreError(
            f"cannot write the resume directory {target}: {exc}; free space or make the "
            "Trainer's output_dir writable"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed
    return target


def _trainer_rng_state(saved: dict[str, Any]) -> dict[str, Any]:
    """aiockpt.RNGState's saved state in the layout of the Trainer's rng_state.pth."""
    rng = {"python": saved["python"], "numpy": saved["numpy"], "cpu": saved["torch"]}
    cuda = saved.get("cuda")
    if cuda and torch.cuda.is_available():
        # In one process the Trainer keeps the generator of the current device alone.
        rng["cuda"] = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
    return rng
