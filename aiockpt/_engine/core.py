"""What one Checkpointer holds open, and the operations both front-ends share.

``Core`` is the step manager: the path-level save engine (``paths.SaveEngine``: capture,
staging memory, pipeline, failure bookkeeping) given one ``CheckpointStore``, which names
each checkpoint ``step-<N>``, commits it with the same primitive a path-level save uses,
then moves ``latest``, runs retention and holds the directory lock. ``Core`` validates
the objects, opens the directory (agreed across ranks), and adds the restore side
(``Restorer``) and the runtime. ``wait`` and
``close`` are the one body of both front-ends' calls of those names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from .._util.bridge import Bridge
from ..config import Config
from ..distributed.group import RankGroup
from ..distributed.sharding import Replicated, object_kinds
from ..errors import CheckpointError, UsageError
from ..metrics import CheckpointerStats, CheckpointMetrics
from ..stateful import Stateful, is_zero_optimizer, uncompiled
from ..storage import CheckpointStorage, open_storage
from . import shutdown
from .capture import check_state_name
from .failures import FailureLog
from .memory import StagingMemory
from .paths import SaveEngine
from .pipeline import Pipeline
from .preemption import Preemption, check_can_install
from .restore import Restorer
from .runtime import MonitorLoop, Runtime
from .saver import Saver
from .tiers import open_tiers

__all__ = ["Core", "close", "wait"]

logger = logging.getLogger(__name__)


class Core:
    """State shared by both front-ends; every method runs on the caller's thread."""

    def __init__(self, config: Config, stateful: Mapping[str, Any], runtime: Runtime) -> None:
        if not stateful:
            raise UsageError(
                "Checkpointer needs at least one object to save, e.g. "
                "Checkpointer(config, model=model, optimizer=optimizer)"
            )
        for name, obj in stateful.items():
            check_state_name(name)
            if not isinstance(obj, Stateful):
                raise UsageError(
                    f"{name}={type(obj).__name__} has no state_dict()/load_state_dict(); pass "
                    "modules, optimizers, schedulers, aiockpt.RNGState() or your own Stateful"
                )
        # A compiled module is checkpointed as the module it wraps: the same tensors,
        # under the names the eager module gives them.
        stateful = {name: uncompiled(obj) for name, obj in stateful.items()}
        self.config = config
        check_can_install(config)  # before anything is opened that would need closing
        # A ZeRO optimizer's state is saved whole, the same on every rank (state_to_save).
        self.kinds = object_kinds(
            {
                name: Replicated(obj) if is_zero_optimizer(obj) else obj
                for name, obj in stateful.items()
            }
        )
        self.objects = {
            name: obj.wrapped if isinstance(obj, Replicated) else obj
            for name, obj in stateful.items()
        }
        self.runtime = runtime
        self.ranks = RankGroup.current(config.rank_timeout_s)
        self.store: CheckpointStorage = open_storage(
            config.directory,
            durable=config.durable,
            lead=self.ranks is None or self.ranks.is_zero,
        )
        self._open_store()
        stats = CheckpointerStats()
        try:
            self.tiers = open_tiers(config, self.store, stats, ranked=self.ranks is not None)
        except BaseException:
            self.store.close()
            raise
        # With tiers, the pipeline writes to the entry tier and the tiers keep retention
        # (a checkpoint still to be copied out of a tier must not be deleted).
        self.engine = SaveEngine(
            config,
            runtime,
            self.objects,
            self.kinds,
            self.ranks,
            self.tiers.entry.store if self.tiers else self.store,
            stats=stats,
            pipeline_config=config.replace(keep_last=None) if self.tiers else None,
        )
        self.memory: StagingMemory = self.engine.memory
        self.pipeline: Pipeline = self.engine.pipeline
        self.stats: CheckpointerStats = self.engine.stats
        self.failures: FailureLog = self.engine.failures
        self.saver: Saver = self.engine.saver
        self.saver.plan_pool_early()  # pins in the background while the user sets up
        self.restorer = Restorer(
            config, self.objects, self.ranks, self.store, self.memory, self.pipeline, self.stats
        )
        self.restorer.tiers = self.tiers
        self.preemption = Preemption(config, self.ranks)
        self.failures.commit_listeners.append(self._record_persist)
        self.pid = os.getpid()
        shutdown.track(self)

    def _open_store(self) -> None:
        if self.ranks is None:
            self.store.open()
            return
        # Rank 0 takes the lock and clears a dead run's leftovers before any rank writes;
        # every rank learns whether that worked, so none is left waiting for the others.
        problem = None
        try:
            self.store.open()
        except Exception as exc:
            problem = exc
        problems = self.ranks.all_gather(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        failed = [f"rank {rank}: {p}" for rank, p in enumerate(problems) if p is not None]
        if failed:
            self.store.close()
            raise CheckpointError(f"another rank could not open {self.config.directory}: {failed}")

    @property
    def closed(self) -> bool:
        return self.saver.closed

    def _record_persist(self, metrics: CheckpointMetrics) -> None:
        self.preemption.tiers[0].history.record(metrics.nbytes, metrics.persist_seconds)

    def close_resources(self) -> None:
        shutdown.forget(self)
        self.engine.release()
        if self.tiers is not None:
            self.tiers.close()
        self.store.close()
        self.runtime.close()
        if self.ranks is not None:
            self.ranks.destroy()
        # Last: a signal that came and was not acted on is raised again here, and its
        # default action ends the process.
        self.preemption.close()

    def finish_at_exit(self) -> None:
        """Let checkpoints in flight commit when the interpreter exits without close()."""
        if self.closed or self.pid != os.getpid() or not isinstance(self.runtime, MonitorLoop):
            return
        try:
            self.runtime.run_sync(self.pipeline.drain())
        except Exception:  # exiting anyway; the next open cleans up
            logger.exception("could not finish checkpoints at exit")
        finally:
            self.close_resources()


async def wait(core: Core, bridge: Bridge) -> None:
    await bridge(core.pipeline.drain())
    if core.tiers is not None:
        await bridge(core.tiers.drain())  # the copies to slower tiers too
    core.failures.raise_failures()


async def close(core: Core, bridge: Bridge, cancel: bool) -> None:
    if core.closed:
        return
    try:
        await bridge(core.pipeline.drain(cancel=cancel))
        if core.tiers is not None:
            await bridge(core.tiers.drain())
            if not cancel:
                core.tiers.finish()  # frees the memory tier once the primary has caught up
    finally:
        core.close_resources()
    core.failures.raise_failures()
