"""Trainer and SyncTrainer: a training step with checkpoints by policy, and exact resume.

``train_step(batch)`` puts the model in train mode if it is not, runs forward (under
autocast when asked), backward (scaled by a GradScaler when there is one), gradient
accumulation, clipping, the optimizer and LR scheduler steps, and then asks the
interval policy whether to checkpoint. A checkpoint returns once captured; its handle is
kept, not awaited, and its numbers feed the policy once it is durable. Checkpoints are
only ever taken between optimizer steps: gradients of a half-done accumulation window
are not state a checkpoint holds.

The Checkpointer underneath saves, under these names: ``model``, ``optimizer``,
``scheduler`` and ``scaler`` (when given), ``rng`` (an aiockpt.RNGState: the one passed as
``rng=``, or one of its own), ``trainer`` (the step counter and the policy's measurements)
and every extra Stateful keyword argument.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Protocol

import torch

from .._util.bridge import Ready, drive
from ..checkpointer import (
    Checkpointer,
    CheckpointHandle,
    SyncCheckpointer,
    SyncCheckpointHandle,
)
from ..config import Config, resolve_config
from ..distributed.group import is_rank_zero, world_size
from ..errors import BackgroundError, CheckpointError, ConfigError, UsageError
from ..stateful import RNGState
from ..storage.local import CheckpointInfo
from .policy import BasePolicy, IntervalPolicy, policy_from_config

__all__ = ["SyncTrainer", "Trainer"]

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
Handle = CheckpointHandle | SyncCheckpointHandle
RESERVED = ("model", "optimizer", "scheduler", "scaler", "rng", "trainer")


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    # Models that compute their own loss: model(**batch).loss (Hugging Face style),
    # or a model whose output is the loss.
    output = model(**batch) if isinstance(batch, Mapping) else model(batch)
    if isinstance(output, torch.Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"the model returned {type(output).__name__} with no loss tensor; pass "
            "loss_fn=lambda model, batch: ... that returns a scalar loss"
        )
    return loss


def _device_type(model: torch.nn.Module) -> str:
    for tensor in model.parameters():
        return tensor.device.type
    return "cpu"


class _TrainerState:
    """The Trainer's own Stateful: the optimizer-step counter and the policy's numbers."""

    def __init__(self, engine: _Engine) -> None:
        self._engine = engine

    def state_dict(self) -> dict[str, Any]:
        policy = self._engine.policy
        saved = policy.state_dict() if hasattr(policy, "state_dict") else {}
        return {"step": self._engine.step, "policy": saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._engine.step = int(state["step"])
        policy = self._engine.policy
        if hasattr(policy, "load_state_dict"):
            policy.load_state_dict(state.get("policy", {}))


class _Engine:
    """Everything both Trainers share; the front-ends differ only in how they wait."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: LossFn | None,
        *,
        config: Config | str | os.PathLike[str] | None,
        optimizer_class: type[torch.optim.Optimizer] | None,
        optimizer_kwargs: Mapping[str, Any] | None,
        scheduler: Any,
        grad_scaler: torch.amp.GradScaler | None,
        amp: bool | torch.dtype,
        grad_accumulation_steps: int,
        max_grad_norm: float | None,
        policy: IntervalPolicy | None,
        clock: Callable[[], float],
        stateful: Mapping[str, Any],
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is None:
            if optimizer_class is None:
                raise TypeError(
                    "pass an optimizer, or optimizer_class (and optimizer_kwargs) to build one "
                    "over model.parameters()"
                )
            optimizer = optimizer_class(model.parameters(), **dict(optimizer_kwargs or {}))
        elif optimizer_class is not None or optimizer_kwargs:
            raise TypeError("pass either optimizer or optimizer_class/optimizer_kwargs, not both")
        if not isinstance(grad_accumulation_steps, int) or grad_accumulation_steps < 1:
            raise ValueError(
                f"grad_accumulation_steps={grad_accumulation_steps!r}: expected an integer >= 1"
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: expected a number > 0 or None")
        _check_extra_names(stateful)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn: LossFn = loss_fn or _default_loss
        self.config = resolve_config(config, "Trainer")
        self.scheduler = scheduler
        self.device_type = _device_type(model)
        self.autocast_dtype = self._autocast_dtype(amp)
        if grad_scaler is None and self.autocast_dtype is torch.float16 and amp is True:
            # fp16 gradients underflow without loss scaling; bf16 needs none.
            grad_scaler = torch.amp.GradScaler(self.device_type)
        self.scaler = grad_scaler
        self.accumulation = grad_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.policy: IntervalPolicy = policy or policy_from_config(self.config)
        if isinstance(self.policy, BasePolicy) and self.policy.decides_by_clock():
            _check_clock_policy_is_single_rank()
        if isinstance(self.policy, BasePolicy):
            self.policy.max_in_flight = self.config.max_async
        self.clock = clock
        self.step = 0
        self.micro_step = 0
        self.forced: bool | None = None
        self.last_handle: Handle | None = None
        self.pending: list[tuple[Handle, float]] = []
        self.stalls: list[float] = []
        self.skipped = 0
        self.mark: float | None = None  # when the current optimizer step began
        self.objects: dict[str, Any] = {"model": model, "optimizer": optimizer}
        if scheduler is not None:
            self.objects["scheduler"] = scheduler
        if self.scaler is not None:
            self.objects["scaler"] = self.scaler
        # An RNGState of the caller's own under `rng` takes the built-in one's place, so
        # the checkpoint holds the random state once.
        given_rng = stateful.get("rng")
        self.objects["rng"] = given_rng if isinstance(given_rng, RNGState) else RNGState()
        self.objects["trainer"] = _TrainerState(self)
        self.objects.update((k, v) for k, v in stateful.items() if k != "rng")

    def _autocast_dtype(self, amp: bool | torch.dtype) -> torch.dtype | None:
        if amp is False or amp is None:
            return None
        if amp is True:
            return torch.float16 if self.device_type == "cuda" else torch.bfloat16
        if isinstance(amp, torch.dtype):
            return amp
        raise TypeError(f"amp={amp!r}: expected True, False or a torch dtype (torch.bfloat16)")

    # -- the training step -----------------------------------------------------------------
    def compute(self, batch: Any, enable_checkpoint: bool | None) -> tuple[torch.Tensor, bool]:
        """One micro-step; returns the detached loss and whether to checkpoint now."""
        if self.mark is None:
            self.mark = self.clock()
        if enable_checkpoint is not None:
            self.forced = enable_checkpoint  # holds until the window's optimizer step
        if not self.model.training:
            self.model.train()
        with torch.autocast(
            self.device_type,
            dtype=self.autocast_dtype,
            enabled=self.autocast_dtype is not None,
        ):
            loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(
                f"loss_fn returned {type(loss).__name__}"
                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}: expected a "
                "scalar loss tensor"
            )
        scaled = loss / self.accumulation if self.accumulation > 1 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        self.micro_step += 1
        if self.micro_step < self.accumulation:
            return loss.detach(), False
        self._optimizer_step()
        now = self.clock()
        self.policy.record_step(now - self.mark)
        forced, self.forced = self.forced, None
        wanted = self.policy.should_checkpoint(self.step, now) if forced is None else forced
        return loss.detach(), wanted

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            if self.max_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_step = 0
        self.step += 1

    def end_step(self) -> None:
        # The next step's time starts after any checkpoint stall: the policy weighs the
        # stall against the training time, so it must not count it twice.
        self.mark = self.clock()

    # -- checkpoints -----------------------------------------------------------------------
    def check_between_steps(self) -> Handle | None:
        """Raise mid-accumulation; the handle if this step is already checkpointed."""
        if self.micro_step:
            raise CheckpointError(
                f"checkpoint() after {self.micro_step} of {self.accumulation} micro-batches "
                "of an accumulation window: the partial gradients are not saved, so the "
                "resume would not be exact. Checkpoint after the window's optimizer step "
                "(trainer.micro_step == 0), or pass enable_checkpoint=True to train_step"
            )
        last = self.last_handle
        if last is not None and last.step == self.step and not last.skipped:
            return last
        return None

    def taken(self, handle: Handle, stall: float) -> None:
        if handle.skipped:
            self.skipped += 1  # the policy asks again; the interval achieved shows in stats
            return
        self.last_handle = handle
        self.stalls.append(stall)
        if self.mark is not None:
            self.mark += stall  # an explicit checkpoint between steps is no training time
        self.pending.append((handle, stall))
        taken = getattr(self.policy, "checkpoint_taken", None)
        if taken is not None:
            taken(self.step, self.clock())

    def done_handles(self) -> list[tuple[Handle, float]]:
        # One done() per handle: one finishing between two looks would be lost.
        done: list[tuple[Handle, float]] = []
        still: list[tuple[Handle, float]] = []
        for item in self.pending:
            (done if item[0].done() else still).append(item)
        self.pending = still
        return done

    def finished(self, handle: Handle, stall: float, error: BackgroundError | None) -> None:
        if error is None:
            self.policy.record_checkpoint(stall, handle.metrics.persist_seconds)
            return
        reset = getattr(self.policy, "reset", None)
        if reset is not None:
            reset(self.step, self.clock())  # it will never report; count afresh
        if self.config.on_error == "raise":
            raise error

    def restored(self, step: int | None) -> int:
        # Gradients of a window begun before the resume belong to no checkpoint.
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_step, self.forced, self.mark = 0, None, None
        self.pending.clear()
        self.last_handle = None
        reset = getattr(self.policy, "reset", None)
        if reset is not None:
            reset(self.step, self.clock())
        if step is not None and is_rank_zero():
            logger.info("resumed at step %d from %s", step, self.config.directory)
        return self.step

    def log_summary(self) -> None:
        if not (self.stalls and is_rank_zero() and logger.isEnabledFor(logging.INFO)):
            return
        ms = sorted(s * 1e3 for s in self.stalls)
        logger.info(
            "%d checkpoints, %d skipped; stall median %.2f ms, max %.2f ms",
            len(ms),
            self.skipped,
            statistics.median(ms),
            ms[-1],
        )


class _Calls(Protocol):
    """The checkpointer's calls as awaitables: the one Trainer body awaits these.

    The async Trainer's are the Checkpointer's own coroutines; the SyncTrainer's run the
    SyncCheckpointer's blocking calls and hand back Ready values, so its body, driven on
    the caller's thread, never suspends.
    """

    def checkpoint(self, step: int) -> Awaitable[Handle]: ...
    def outcome(self, handle: Handle) -> Awaitable[CheckpointInfo | None]: ...
    def wait(self) -> Awaitable[None]: ...
    def restore(
        self, step: int | None, only: Iterable[str] | None, strict: bool
    ) -> Awaitable[int | None]: ...
    def close(self) -> Awaitable[None]: ...
    def let_pipeline_run(self) -> Awaitable[None]: ...
    def checkpoint_and_exit(self, step: int) -> Awaitable[None]: ...


class _AsyncCalls:
    """The Checkpointer's coroutines, awaited as they are."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def checkpoint(self, step: int) -> Awaitable[Handle]:
        return self.checkpointer.checkpoint(step)

    def outcome(self, handle: Handle) -> Awaitable[CheckpointInfo | None]:
        assert isinstance(handle, CheckpointHandle)
        return handle.wait()  # done already: returns without suspending

    def wait(self) -> Awaitable[None]:
        return self.checkpointer.wait()

    def restore(
        self, step: int | None, only: Iterable[str] | None, strict: bool
    ) -> Awaitable[int | None]:
        return self.checkpointer.restore(step, only=only, strict=strict)

    def close(self) -> Awaitable[None]:
        return self.checkpointer.close()

    def checkpoint_and_exit(self, step: int) -> Awaitable[None]:
        return self.checkpointer.checkpoint_and_exit(step)

    def let_pipeline_run(self) -> Awaitable[None]:
        # Without the monitor the pipeline runs on the caller's loop: let it move.
        if self.checkpointer.config.use_monitor:
            return Ready(None)
        return asyncio.sleep(0)


class _BlockingCalls:
    """The SyncCheckpointer's blocking calls, run at once, their values handed back Ready."""

    def __init__(self, checkpointer: SyncCheckpointer) -> None:
        self.checkpointer = checkpointer

    def checkpoint(self, step: int) -> Ready:
        return Ready(self.checkpointer.checkpoint(step))

    def outcome(self, handle: Handle) -> Ready:
        assert isinstance(handle, SyncCheckpointHandle)
        return Ready(handle.wait())

    def wait(self) -> Ready:
        self.checkpointer.wait()
        return Ready(None)

    def restore(self, step: int | None, only: Iterable[str] | None, strict: bool) -> Ready:
        return Ready(self.checkpointer.restore(step, only=only, strict=strict))

    def close(self) -> Ready:
        self.checkpointer.close()
        return Ready(None)

    def checkpoint_and_exit(self, step: int) -> Ready:
        self.checkpointer.checkpoint_and_exit(step)
        return Ready(None)

    def let_pipeline_run(self) -> Ready:
        return Ready(None)  # the pipeline has a loop of its own


class _TrainerBase:
    """What Trainer and SyncTrainer share: construction, the read-only properties, and the
    one body of every call, written against ``_Calls``."""

    _checkpointer_class: type[Checkpointer] | type[SyncCheckpointer]
    _calls: _Calls

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: LossFn | None = None,
        *,
        config: Config | str | os.PathLike[str] | None = None,
        optimizer_class: type[torch.optim.Optimizer] | None = None,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        scheduler: Any = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        amp: bool | torch.dtype = False,
        grad_accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        policy: IntervalPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        **stateful: Any,
    ) -> None:
        self._engine = _Engine(
            model,
            optimizer,
            loss_fn,
            config=config,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            scheduler=scheduler,
            grad_scaler=grad_scaler,
            amp=amp,
            grad_accumulation_steps=grad_accumulation_steps,
            max_grad_norm=max_grad_norm,
            policy=policy,
            clock=clock,
            stateful=stateful,
        )
        self.checkpointer = self._checkpointer_class(self._engine.config, **self._engine.objects)
        self._calls = self._calls_for(self.checkpointer)

    def _calls_for(self, checkpointer: Checkpointer | SyncCheckpointer) -> _Calls:
        """The checkpointer's calls as this front-end awaits them."""
        raise NotImplementedError

    # -- the bodies, one for both front-ends --------------------------------------------------
    async def _train_step(self, batch: Any, enable_checkpoint: bool | None) -> torch.Tensor:
        engine = self._engine
        await self._collect()
        await self._calls.let_pipeline_run()
        loss, wanted = engine.compute(batch, enable_checkpoint)
        if wanted:
            await self._checkpoint()
        if engine.micro_step == 0:
            engine.end_step()
            if self.checkpointer.preempted is not None:
                # Saves this step (unless just saved) and exits; under torch.distributed
                # it returns until the step the ranks agreed on.
                await self._calls.checkpoint_and_exit(engine.step)
        return loss

    async def _checkpoint(self) -> Handle:
        engine = self._engine
        existing = engine.check_between_steps()
        if existing is not None:
            return existing
        start = time.perf_counter()
        handle = await self._calls.checkpoint(engine.step)
        engine.taken(handle, time.perf_counter() - start)
        return handle

    async def _collect(self) -> None:
        for handle, stall in self._engine.done_handles():
            error = None
            try:
                await self._calls.outcome(handle)
            except BackgroundError as exc:
                error = exc
            self._engine.finished(handle, stall, error)

    async def _wait(self) -> None:
        await self._calls.wait()
        await self._collect()

    async def _resume(self, step: int | None, only: Iterable[str] | None, strict: bool) -> int:
        return self._engine.restored(await self._calls.restore(step, only, strict))

    async def _close(self) -> None:
        try:
            await self._calls.close()
        finally:
            self._engine.log_summary()

    @property
    def step(self) -> int:
        """Optimizer steps done (a resume sets it to the checkpoint's step)."""
        return self._engine.step

    @property
    def micro_step(self) -> int:
        """Micro-batches of the current accumulation window done so far."""
        return self._engine.micro_step

    @property
    def config(self) -> Config:
        """The settings in use (a TOML path given as ``config`` is read once)."""
        return self._engine.config

    @property
    def policy(self) -> IntervalPolicy:
        """The interval policy that decides when ``train_step`` checkpoints."""
        return self._engine.policy

    @property
    def model(self) -> torch.nn.Module:
        """The module being trained."""
        return self._engine.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer, given or built from ``optimizer_class``."""
        return self._engine.optimizer

    @property
    def scheduler(self) -> Any:
        """The LR scheduler, or None."""
        return self._engine.scheduler

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The GradScaler in use (given, or made for fp16 autocast on CUDA), or None."""
        return self._engine.scaler

    @property
    def stalls(self) -> list[float]:
        """Seconds training waited for each checkpoint taken (skipped ones excluded)."""
        return list(self._engine.stalls)

    @property
    def skipped(self) -> int:
        """Checkpoints dropped on backpressure (``on_backpressure = "skip"``)."""
        return self._engine.skipped

    @property
    def last_checkpoint(self) -> CheckpointHandle | SyncCheckpointHandle | None:
        """The handle of the newest checkpoint this trainer took (skipped ones excluded)."""
        return self._engine.last_handle


_INIT_DOC = """
    Args:
        model: the module to train.
        optimizer: its optimizer; or leave it out and give ``optimizer_class``.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss tensor (default: the
            model computes it: ``model(**batch).loss``, or its output is the loss).
        config: a :class:`~aiockpt.Config`, the path of a TOML file, or None for the
            defaults; its interval keys choose the checkpoint policy.
        optimizer_class: builds the optimizer over ``model.parameters()`` instead.
        optimizer_kwargs: keyword arguments for ``optimizer_class``.
        scheduler: an LR scheduler, stepped after every optimizer step and saved.
        grad_scaler: a ``torch.amp.GradScaler`` to scale the loss with, saved too.
        amp: True (or a dtype such as ``torch.bfloat16``) runs the forward under autocast,
            with a GradScaler for fp16 on CUDA unless ``grad_scaler`` is given.
        grad_accumulation_steps: micro-batches per optimizer step (>= 1).
        max_grad_norm: clip gradients to this norm before each optimizer step.
        policy: overrides the config's interval policy.
        clock: the time source the policy decides by (for tests).
        **stateful: more Stateful objects to save, e.g. ``sampler=sampler``, and
            ``rng=aiockpt.RNGState()`` in place of the Trainer's own.

    Raises:
        UsageError: an extra object under a name the Trainer saves itself.
        ConfigError: a wall-clock policy under torch.distributed with several ranks.
        TypeError: a model or optimizer of the wrong kind, or both an optimizer and
            ``optimizer_class``.
        ValueError: ``grad_accumulation_steps`` or ``max_grad_norm`` out of range.

    Attributes:
        checkpointer: the Checkpointer (or SyncCheckpointer) underneath, for ``stats``
            or a partial ``restore(only=...)``.
"""


class Trainer(_TrainerBase):
    """An async training step that checkpoints by policy and resumes exactly.

    >>> trainer = aiockpt.Trainer(model, opt, loss_fn, config="aiockpt.toml", sampler=sampler)
    >>> start = await trainer.resume()
    >>> loss = await trainer.train_step(batch)    # checkpoints when the policy says so
    """

    __doc__ = (__doc__ or "") + _INIT_DOC
    _checkpointer_class = Checkpointer
    checkpointer: Checkpointer

    def _calls_for(self, checkpointer: Checkpointer | SyncCheckpointer) -> _Calls:
        assert isinstance(checkpointer, Checkpointer)
        return _AsyncCalls(checkpointer)

    async def train_step(self, batch: Any, enable_checkpoint: bool | None = None) -> torch.Tensor:
        """Forward, backward, (every k-th call) the optimizer step and maybe a checkpoint.

        Args:
            batch: the micro-batch, passed to ``loss_fn(model, batch)``.
            enable_checkpoint: True/False forces the checkpoint decision for the optimizer
                step this call completes (or, mid-accumulation, the next one); None lets
                the policy decide.

        Returns:
            The loss of this micro-batch, detached.

        Raises:
            BackgroundError: an earlier checkpoint failed in the background (with
                ``on_error = "raise"``); ``__cause__`` holds the original exception.
            SystemExit: a signal of ``preemption_signals`` came: this step (under
                torch.distributed, the step the ranks agreed on) was saved if it could be
                durable within ``preemption_grace_s``; status 128 + the signal's number.
        """
        return await self._train_step(batch, enable_checkpoint)

    async def checkpoint(self) -> CheckpointHandle:
        """Checkpoint the current step; returns once captured (await the handle for durable).

        Returns:
            The checkpoint's handle (the existing one if this step is already saved).

        Raises:
            CheckpointError: called mid-accumulation, where the partial gradients would
                be lost.
        """
        handle = await self._checkpoint()
        assert isinstance(handle, CheckpointHandle)
        return handle

    async def wait(self) -> None:
        """Wait until every checkpoint in flight is durable; re-raise a background failure.

        Raises:
            BackgroundError: a checkpoint failed in the background; ``__cause__`` holds
                the original exception.
        """
        await self._wait()

    async def resume(
        self,
        step: int | None = None,
        *,
        only: Iterable[str] | None = None,
        strict: bool = True,
    ) -> int:
        """Restore the newest valid checkpoint (or ``step``) into every object.

        Args:
            step: restore this step rather than the newest valid one.
            only: the names of the objects to restore (e.g. ``["model", "trainer"]``;
                the Trainer saves ``model``, ``optimizer``, ``trainer`` and the others
                named in the README); the others keep their values.
            strict: with False, modules load with ``load_state_dict(strict=False)`` and
                objects the checkpoint lacks are skipped, as
                :meth:`aiockpt.Checkpointer.restore` describes.

        Returns:
            The step to go on from (0 when there is no checkpoint yet).

        Raises:
            NoCheckpointError: ``step`` was asked for and is not committed.
            CorruptCheckpointError: ``step`` was asked for and fails its checks, or every
                checkpoint does.
            MissingStateError: the checkpoint holds no state under a name asked for
                (with ``strict`` True).
            StateMismatchError: with ``strict`` True, saved keys differ from the objects'
                (nothing is loaded).
            ValueError: ``only`` names an object the Trainer does not save.
        """
        return await self._resume(step, only, strict)

    async def close(self) -> None:
        """Drain what is in flight and release the checkpointer.

        Raises:
            BackgroundError: a checkpoint in flight failed in the background.
        """
        await self._close()

    async def __aenter__(self) -> Trainer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class SyncTrainer(_TrainerBase):
    """The Trainer for plain scripts: the same arguments, blocking calls.

    >>> with aiockpt.SyncTrainer(model, opt, loss_fn, config=cfg) as trainer:
    ...     start = trainer.resume()
    ...     loss = trainer.train_step(batch)
    """

    __doc__ = (__doc__ or "") + _INIT_DOC
    _checkpointer_class = SyncCheckpointer
    checkpointer: SyncCheckpointer

    def _calls_for(self, checkpointer: Checkpointer | SyncCheckpointer) -> _Calls:
        assert isinstance(checkpointer, SyncCheckpointer)
        return _BlockingCalls(checkpointer)

    def train_step(self, batch: Any, enable_checkpoint: bool | None = None) -> torch.Tensor:
        """Forward, backward, (every k-th call) the optimizer step and maybe a checkpoint.

        Args:
            batch: the micro-batch, passed to ``loss_fn(model, batch)``.
            enable_checkpoint: True/False forces the checkpoint decision for the optimizer
                step this call completes (or, mid-accumulation, the next one); None lets
                the policy decide.

        Returns:
            The loss of this micro-batch, detached.

        Raises:
            BackgroundError: an earlier checkpoint failed in the background (with
                ``on_error = "raise"``); ``__cause__`` holds the original exception.
            SystemExit: a signal of ``preemption_signals`` came: this step (under
                torch.distributed, the step the ranks agreed on) was saved if it could be
                durable within ``preemption_grace_s``; status 128 + the signal's number.
        """
        return drive(self._train_step(batch, enable_checkpoint))

    def checkpoint(self) -> SyncCheckpointHandle:
        """Checkpoint the current step; returns once captured (``.wait()`` for durable).

        Returns:
            The checkpoint's handle (the existing one if this step is already saved).

        Raises:
            CheckpointError: called mid-accumulation, where the partial gradients would
                be lost.
        """
        handle = drive(self._checkpoint())
        assert isinstance(handle, SyncCheckpointHandle)
        return handle

    def wait(self) -> None:
        """Block until every checkpoint in flight is durable; re-raise a background failure.

        Raises:
            BackgroundError: a checkpoint failed in the background; ``__cause__`` holds
                the original exception.
        """
        drive(self._wait())

    def resume(
        self,
        step: int | None = None,
        *,
        only: Iterable[str] | None = None,
        strict: bool = True,
    ) -> int:
        """Restore the newest valid checkpoint (or ``step``) into every object.

        Args:
            step: restore this step rather than the newest valid one.
            only: the names of the objects to restore (e.g. ``["model", "trainer"]``;
                the Trainer saves ``model``, ``optimizer``, ``trainer`` and the others
                named in the README); the others keep their values.
            strict: with False, modules load with ``load_state_dict(strict=False)`` and
                objects the checkpoint lacks are skipped, as
                :meth:`aiockpt.Checkpointer.restore` describes.

        Returns:
            The step to go on from (0 when there is no checkpoint yet).

        Raises:
            NoCheckpointError: ``step`` was asked for and is not committed.
            CorruptCheckpointError: ``step`` was asked for and fails its checks, or every
                checkpoint does.
            MissingStateError: the checkpoint holds no state under a name asked for
                (with ``strict`` True).
            StateMismatchError: with ``strict`` True, saved keys differ from the objects'
                (nothing is loaded).
            ValueError: ``only`` names an object the Trainer does not save.
        """
        return drive(self._resume(step, only, strict))

    def close(self) -> None:
        """Drain what is in flight and release the checkpointer.

        Raises:
            BackgroundError: a checkpoint in flight failed in the background.
        """
        drive(self._close())

    def __enter__(self) -> SyncTrainer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_extra_names(stateful: Mapping[str, Any]) -> None:
    """Refuse extra objects that would collide with, or repeat, what the Trainer saves."""
    rng = stateful.get("rng")
    if rng is not None and not isinstance(rng, RNGState):
        raise UsageError(
            f"rng={type(rng).__name__}: under `rng` the Trainer saves the global random "
            "generators, so it takes an aiockpt.RNGState() (or nothing: it makes its own); "
            "pass a generator of your own under another keyword name"
        )
    taken = sorted(set(stateful) & set(RESERVED) - {"rng"})
    if taken:
        raise UsageError(
            f"{taken} are names the Trainer saves itself ({', '.join(RESERVED)}); "
            "pass your objects under other keyword names"
            + ("; a GradScaler goes in grad_scaler=" if "scaler" in taken else "")
        )
    doubled = [
        name for name, obj in stateful.items() if name != "rng" and isinstance(obj, RNGState)
    ]
    if doubled:
        raise UsageError(
            f"{doubled[0]}=aiockpt.RNGState(): the Trainer already saves the random "
            "generators under `rng`, so this would save them twice; pass it as rng= "
            "or leave it out"
        )


def _check_clock_policy_is_single_rank() -> None:
    if world_size() > 1:
        raise ConfigError(
            "interval_seconds and max_overhead decide from each rank's own clock, so the "
            f"{world_size()} ranks would checkpoint different steps; under torch.distributed "
            "use interval_steps (or call trainer.checkpoint() at the same step on every rank)"
        )
