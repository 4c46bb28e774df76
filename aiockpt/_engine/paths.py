"""Saving one state to one path: the engine under the step manager.

``SaveEngine`` is everything a save needs except where it goes: capture (``Saver``), the
background pipeline, the staging memory it reuses, and the failure bookkeeping. Where a
checkpoint goes is a storage object:

- a path-level save (``PathEngine.save``) gives each save its own ``PathStorage``: the
  path the caller names, committed by the commit primitive, nothing else;
- the step manager (``core.Core``, under ``Checkpointer`` and ``Trainer``) gives its
  engine one ``CheckpointStore``: the same primitive committing ``step-<N>``, then
  ``latest``, retention and the directory lock around it.

``PathEngine`` owns one ``SaveEngine`` on a background loop of its own. Its staging
memory and layout are kept between saves and reused while the state keeps its structure
(frameworks save every N steps, each time to a new path); ``close`` releases them. Saves
still in flight when the interpreter exits are finished first (``shutdown``), and a
failure nobody waited for is logged as an error then.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._util.bridge import Bridge
from .._util.location import Location
from .._util.text import shown
from ..config import Config
from ..distributed.group import RankGroup
from ..errors import AiockptError, CheckpointError, ConfigError, UsageError
from ..metrics import CheckpointerStats, CheckpointMetrics
from ..stateful import Stateful
from ..storage.base import CheckpointStorage
from ..storage.local import parse_step_dir
from ..storage.paths import PathStorage
from . import shutdown
from .capture import check_state_name
from .failures import AnyFuture, FailureLog
from .memory import StagingMemory
from .pipeline import Pipeline
from .runtime import MonitorLoop, Runtime
from .saver import Saver, checkpoint

__all__ = ["PathEngine", "SaveEngine", "as_saved_objects", "path_of"]

logger = logging.getLogger(__name__)


class SaveEngine:
    """Capture, pipeline, staging memory and failures: a save's all but its destination.

    ``store`` is where saves go unless a save names its own (None: every save does);
    ``stats`` the totals to keep (shared with the tiers), new ones when None.
    """

    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        objects: dict[str, Any],
        kinds: dict[str, str],
        ranks: RankGroup | None,
        store: CheckpointStorage | None,
        *,
        stats: CheckpointerStats | None = None,
        pipeline_config: Config | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.memory = StagingMemory(max_async=config.max_async)
        # pipeline_config: the pipeline's own settings where they differ (with tiers, the
        # tiers keep retention, not the pipeline).
        self.pipeline = Pipeline(pipeline_config or config, store, self.memory, ranks)
        self.stats = CheckpointerStats() if stats is None else stats
        self.failures = FailureLog(self.stats, on_error=config.on_error)
        self.saver = Saver(
            config,
            objects,
            kinds,
            ranks,
            runtime,
            self.memory,
            self.pipeline,
            self.failures,
            self.stats,
        )

    def release(self) -> None:
        """Refuse further saves; stop the writer threads; free the staging memory."""
        self.saver.release()
        self.pipeline.close()
        self.memory.release()


class _PlainState:
    """Plain state (nested dicts and lists of tensors and values) saved as it is."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        self.value = state


def as_saved_objects(state: object) -> dict[str, Any]:
    """``{name: object}`` for capture: Stateful values as they are, anything else as plain
    state (its tensors and values are captured; capture refuses what it cannot store).

    Raises:
        UsageError: ``state`` is not a mapping of names.
        UnsupportedStateError: a name cannot be saved (not a string, ``/`` in it, ...).
    """
    if not isinstance(state, Mapping) or not state:
        raise UsageError(
            "save() takes a non-empty mapping of names to state, e.g. "
            f"{{'model': model, 'step': 3}}; got {shown(state, limit=80, keep=60)}"
        )
    objects: dict[str, Any] = {}
    for name, value in state.items():
        check_state_name(name)
        objects[name] = value if isinstance(value, Stateful) else _PlainState(value)
    return objects


def path_of(path: object) -> Path:
    """``path`` as an absolute Path; a ConfigError for anything else."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise ConfigError(
            f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__} "
            f"{path!r}; pass e.g. 'runs/one'"
        )
    text = os.fspath(path)
    if not text:
        raise ConfigError("a checkpoint path must not be empty; pass e.g. 'runs/one'")
    return Path(os.path.abspath(text))


def step_for(path: Path, step: int | None) -> int:
    """The step a save to ``path`` records: ``step``; by default the one a ``step-<N>``
    name says (readers check the two agree), else 0."""
    named = parse_step_dir(path.name)
    if step is None:
        return 0 if named is None else named
    if named is not None and named != step:
        raise ConfigError(
            f"cannot save step {step} to {path}: a directory named step-<N> must hold step "
            f"{named} (readers refuse it otherwise); pass step={named} or another path"
        )
    return step


class PathEngine:
    """Path-level saves of one owner (a process, or a framework plugin): one background
    loop, one ``SaveEngine`` whose memory and layout are reused from save to save."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime = MonitorLoop(name="aiockpt-saves")
        try:
            self.engine = SaveEngine(config, self.runtime, {}, {}, None, None)
        except BaseException:
            self.runtime.close()
            raise
        # One capture at a time: capture reads and updates the engine's layout and memory.
        self.lock = threading.RLock()
        self.pid = os.getpid()
        shutdown.track(self)

    @property
    def stats(self) -> CheckpointerStats:
        return self.engine.stats

    @property
    def closed(self) -> bool:
        return self.engine.saver.closed

    def prepare(self, state: object, path: object, step: int | None) -> _Request:
        """Everything a save checks before anything is captured or written."""
        if self.closed:
            raise CheckpointError("this saver is closed; create a new one")
        final = path_of(path)
        request = _Request(
            objects=as_saved_objects(state),
            destination=PathStorage(final, durable=self.config.durable),
            step=step_for(final, step),
        )
        request.destination.open()  # refuses a path it must not replace, before capture
        return request

    async def save(self, request: _Request, bridge: Bridge) -> tuple[CheckpointMetrics, AnyFuture]:
        """Capture ``request``'s state and start writing it; its metrics and future."""
        saver = self.engine.saver
        saver.objects = request.objects  # this save's objects; the layout is kept if it fits
        try:
            metrics, future = await checkpoint(
                saver,
                request.step,
                None,
                bridge,
                destination=request.destination,
                what=f"save to {request.destination.final}",
            )
        finally:
            saver.objects = {}  # the engine keeps no reference to the caller's state
        # Host staging copies GPU tensors on a side stream. The step manager's hooks make
        # the next optimizer step wait for them; a path-level state is often plain tensors
        # (a framework's checkpoint dict) with no optimizer to hook, so the caller's stream
        # waits for the copies, on the GPU, before whatever it runs next.
        saver.guard.hold_current_stream()
        if future is None:  # on_backpressure = "skip" dropped it
            return metrics, _skipped()
        # Captured, so the save will be written: its directory's parents exist from here on.
        with contextlib.suppress(OSError):  # else the write fails, and its handle says why
            request.destination.make_parents()
        return metrics, future

    def wait(self) -> None:
        """Block until every save in flight is over; re-raise the first unreported failure."""
        self.runtime.run_sync(self.engine.pipeline.drain())
        self.engine.failures.raise_failures()

    async def wait_async(self) -> None:
        await self.runtime.run(self.engine.pipeline.drain())
        self.engine.failures.raise_failures()

    def close(self) -> None:
        """Finish what is in flight, then free the memory and threads; re-raise a failure
        nobody has seen."""
        if self.closed:
            return
        try:
            self.runtime.run_sync(self.engine.pipeline.drain())
        finally:
            self._release()
        self.engine.failures.raise_failures()

    def _release(self) -> None:
        shutdown.forget(self)
        self.engine.release()
        self.runtime.close()

    def finish_at_exit(self) -> None:
        """Let saves in flight commit when the interpreter exits; say what failed."""
        if self.closed or self.pid != os.getpid():
            return
        try:
            self.close()
        except AiockptError as exc:
            # Nobody is left to raise it to: said as an error, with the original cause.
            logger.error("%s", exc, exc_info=exc)


@dataclass(frozen=True)
class _Request:
    """One save, checked: what to capture, where it goes, the step it records."""

    objects: dict[str, Any]
    destination: PathStorage
    step: int


def _skipped() -> AnyFuture:
    future: concurrent.futures.Future[Location | None] = concurrent.futures.Future()
    future.set_result(None)
    return future
