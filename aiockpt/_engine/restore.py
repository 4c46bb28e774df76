"""The restore side of a Checkpointer: which checkpoint to load, reading it, loading it.

Candidates are tried newest first; a corrupt one is skipped (logged) for the next, unless
a step was asked for. Under torch.distributed every rank tries the same list (rank 0's)
and agrees after each read, so all ranks load the same step or none. ``restore`` is the
one body of both front-ends' ``restore()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .._format.manifest import Manifest, TensorRecord
from .._format.skeleton import adopt_live_types
from .._util.bridge import Bridge
from ..config import Config
from ..distributed.group import RankGroup
from ..distributed.sharding import optimizer_parameters
from ..errors import (
    CorruptCheckpointError,
    MissingStateError,
    NoCheckpointError,
    StateMismatchError,
    UnsupportedStateError,
    WorldSizeError,
)
from ..metrics import CheckpointerStats
from ..stateful import is_zero_optimizer, live_names, state_to_save, uncompiled
from ..storage import CheckpointStorage
from ..storage.base import CheckpointInfo
from .capture import flatten_state
from .memory import StagingMemory
from .pipeline import Pipeline
from .reader import Placement, TensorFilter, read_checkpoint, tensor_filter
from .reshard import RankSelection, place_shards

if TYPE_CHECKING:
    from .tiers import TierSet

__all__ = ["RestoreRequest", "Restorer", "restore"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreRequest:
    """Which objects a restore loads, which of them only in part (by layer), and whether
    every key must match (``strict``)."""

    names: list[str]
    partial: set[str]
    layers: str | None
    strict: bool = True

    def select(self) -> TensorFilter | None:
        # Non-module objects are restored whole, whatever the layer pattern.
        return tensor_filter(self.names, self.layers, layered=self.partial)


class Restorer:
    """Plans, reads and applies restores for one Checkpointer's objects."""

    def __init__(
        self,
        config: Config,
        objects: dict[str, Any],
        ranks: RankGroup | None,
        store: CheckpointStorage,
        memory: StagingMemory,
        pipeline: Pipeline,
        stats: CheckpointerStats,
    ) -> None:
        self.config = config
        self.objects = objects
        self.ranks = ranks
        self.store = store
        self.memory = memory
        # Restore drains the pipeline first, and runs the rank group's collectives on its
        # coordinator thread, in order with the pipeline's own.
        self.pipeline = pipeline
        # The manifest of the checkpoint read last.
        self.loaded_manifest: Manifest | None = None
        self.stats = stats
        # The memory and remote tiers, when configured: restore looks in every tier.
        self.tiers: TierSet | None = None

    def request(
        self, only: Iterable[str] | None, layers: str | None, strict: bool = True
    ) -> RestoreRequest:
        names = list(self.objects) if only is None else list(only)
        unknown = [name for name in names if name not in self.objects]
        if unknown:
            raise ValueError(f"restore(only=...) names {unknown}; known: {list(self.objects)}")
        modules = {n for n in names if isinstance(self.objects[n], torch.nn.Module)}
        if layers is not None and not modules:
            raise ValueError("restore(layers=...) needs a module among the restored objects")
        return RestoreRequest(names, modules if layers is not None else set(), layers, strict)

    # -- which checkpoint ----------------------------------------------------------------
    def candidates(self, step: int | None) -> list[CheckpointInfo]:
        if self.tiers is not None:
            found = self.tiers.candidates(step, str(self.config.directory))
            return [info for _, info in found]
        committed = self.store.list_committed()
        if step is None:
            return committed[::-1]
        chosen = [info for info in committed if info.step == step]
        if not chosen:
            steps = [info.step for info in committed]
            raise NoCheckpointError(
                f"no committed checkpoint of step {step} in {self.config.directory} "
                f"(committed steps: {steps or 'none'})"
            )
        return chosen

    async def agreed_candidates(self, step: int | None) -> list[CheckpointInfo]:
        """The checkpoints to try, newest first: rank 0's list, on every rank."""
        if self.ranks is None:
            return self.candidates(step)
        ranks = self.ranks
        loop = asyncio.get_running_loop()
        mine: list[CheckpointInfo] | BaseException
        try:
            mine = self.candidates(step)
        except NoCheckpointError as exc:
            mine = exc
        chosen = await loop.run_in_executor(self.pipeline.coordinator, ranks.broadcast, mine)
        if isinstance(chosen, BaseException):
            raise chosen
        return [
            info
            if isinstance(mine, BaseException)
            else next((m for m in mine if m.step == info.step), info)
            for info in chosen
        ]

    async def agree_on_read(
        self, info: CheckpointInfo, error: BaseException | None
    ) -> BaseException | None:
        """This rank's read error, or the first other rank's; None when all read well."""
        if self.ranks is None:
            return error
        loop = asyncio.get_running_loop()
        vote = None if error is None else (type(error).__name__, str(error))
        votes = await loop.run_in_executor(self.pipeline.coordinator, self.ranks.all_gather, vote)
        if error is not None:
            return error
        for rank, other in enumerate(votes):
            if other is not None:
                kind = WorldSizeError if other[0] == "WorldSizeError" else CorruptCheckpointError
                return kind(f"rank {rank} could not read {info.path}: {other[1]}")
        return None

    def corrupt(
        self, info: CheckpointInfo, error: CorruptCheckpointError, tried: list[str]
    ) -> None:
        tried.append(f"step {info.step}: {error}")
        logger.warning("skipping corrupt checkpoint %s: %s", info.path, error)

    # -- reading it ------------------------------------------------------------------------
    async def read(
        self, info: CheckpointInfo, request: RestoreRequest, place: Placement | None
    ) -> dict[str, Any]:
        """Read, verify and decode one checkpoint off the loop; corrupt ones raise here."""
        loop = asyncio.get_running_loop()
        # With nothing in flight (restore drained) the staging pool's pinned buffers are
        # idle: reads to the GPU borrow them instead of pinning a ring of their own.
        lent = self.memory.lend_pinned() if place is not None else []
        work = loop.run_in_executor(
            None, self._read_state, info, request, place, [b.data for b in lent]
        )
        try:
            return await asyncio.shield(work)
        finally:
            if lent:
                # A cancelled restore's reads still run: the buffers go back when they end.
                await asyncio.wait([work])
                await self.memory.give_back(lent)

    def _read_state(
        self,
        info: CheckpointInfo,
        request: RestoreRequest,
        place: Placement | None,
        pinned: list[torch.Tensor],
    ) -> dict[str, Any]:
        # The manifest is read once, inside read_checkpoint; a missing key reads nothing
        # for that key, so checking after the read costs no extra I/O.
        rank = 0 if self.ranks is None else self.ranks.rank
        # RankSelection and place_shards read the live state_dict() for DTensors, which a
        # ZeRO optimizer never holds (and whose state_dict() is a collective).
        live = [n for n in request.names if not is_zero_optimizer(self.objects[n])]
        selection = RankSelection({n: self.objects[n] for n in live}, rank)
        loaded = read_checkpoint(
            info.path,
            select=request.select(),
            threads=self.config.num_threads,
            rank_select=selection.filter,
            place=place,
            pinned=pinned,
        )
        missing = [name for name in request.names if name not in loaded.manifest.state]
        if missing and not request.strict:
            # Not strict: the objects the checkpoint lacks keep their values.
            self.stats.last_restore_skipped = missing
            logger.warning("%s has no state for %s; they keep their values", info.path, missing)
        elif missing:
            raise MissingStateError(
                f"{info.path} has no state for {missing} (it holds "
                f"{sorted(loaded.manifest.state)}); pass the same keyword names that saved it"
            )
        self.stats.last_restore_bytes = loaded.bytes_read
        self.loaded_manifest = loaded.manifest
        present = [name for name in request.names if name not in missing]
        state = loaded.state(None, keys=present, rank=rank, dtensor=lambda saved: saved)
        # DTensors come back sharded as the live objects shard them now.
        return {
            name: place_shards(state[name], self.objects[name]) if name in live else state[name]
            for name in state
        }

    def placement(self, request: RestoreRequest) -> Placement | None:
        """Where each restored tensor should be read to (None: all to host memory).

        A tensor goes where the object keeps the tensor of the same name now: modules'
        parameters and buffers on their device, so load_state_dict copies device to
        device. Optimizer state an optimizer does not hold yet follows its parameter,
        where load_state_dict would move it anyway (all but "step", which stays where it
        is loaded, as torch keeps it).
        """
        if not torch.cuda.is_available():
            return None
        devices: dict[str, torch.device] = {}
        for name in request.names:
            obj = self.objects[name]
            if is_zero_optimizer(obj):
                # Its state_dict() is a collective (and refused before one): its
                # parameters alone say where its state goes.
                params = optimizer_parameters(obj)
                devices.update(
                    (f"{name}/state/{i}", p.device) for i, p in enumerate(params) if p.is_cuda
                )
                continue
            try:
                # Named as saved: a compiled module's tensors under its eager names.
                flat = flatten_state({name: state_to_save(obj)})
            except UnsupportedStateError:  # restore never needed to save it: read to host
                continue
            devices.update(
                (n, t.device) for n, t in zip(flat.names, flat.tensors, strict=True) if t.is_cuda
            )
            if isinstance(obj, torch.optim.Optimizer):
                params = optimizer_parameters(obj)
                devices.update(
                    (f"{name}/state/{i}", p.device) for i, p in enumerate(params) if p.is_cuda
                )
        if not devices:
            return None
        cpu = torch.device("cpu")

        def place(record: TensorRecord) -> torch.device:
            device = devices.get(record.name)
            if device is None:
                owner, _, key = record.name.rpartition("/")
                device = devices.get(owner) if key != "step" else None
            return device or cpu

        return place

    # -- loading it ------------------------------------------------------------------------
    def apply(self, state: dict[str, Any], request: RestoreRequest) -> None:
        if request.strict:
            # Checked for every object before any is loaded: a mismatch found by the
            # second object's load_state_dict would leave the first one restored and the
            # rest not, a state that no step ever had.
            self.check_keys(state, request)
        for name in request.names:
            if name not in state:  # not strict, and the checkpoint lacks it
                continue
            obj = self.objects[name]
            # Namedtuples and IntEnums come back as the classes the object uses now.
            state[name] = adopt_live_types(state[name], obj.state_dict)
            if not isinstance(obj, torch.nn.Module):
                obj.load_state_dict(state[name])
                continue
            # Saved under eager names; loaded under the names the module has now, compiled
            # (whole or in parts) or not.
            module = uncompiled(obj)
            module_state = live_names(module, state[name])
            if name in request.partial:
                # Only the matching layers were read; the rest of the module keeps its values.
                module.load_state_dict(module_state, strict=False)
            elif request.strict:
                module.load_state_dict(module_state)
            else:
                result = module.load_state_dict(module_state, strict=False)
                self.mismatch(name, result.missing_keys, result.unexpected_keys)

    def check_keys(self, state: dict[str, Any], request: RestoreRequest) -> None:
        """Refuse a strict restore whose saved keys do not match the live objects', before
        anything is loaded: modules by their state_dict keys, optimizers by their parameter
        groups (what torch's own load_state_dict checks, one object at a time)."""
        problems: list[str] = []
        for name in request.names:
            if name not in state or name in request.partial:
                continue
            obj = self.objects[name]
            saved = state[name]
            if isinstance(obj, torch.nn.Module):
                module = uncompiled(obj)
                live_keys = set(module.state_dict())
                saved_keys = set(live_names(module, saved)) if isinstance(saved, dict) else set()
                missing = sorted(live_keys - saved_keys)
                unexpected = sorted(saved_keys - live_keys)
                if missing or unexpected:
                    problems.append(
                        f"{name}: missing keys {shown_keys(missing)}, "
                        f"unexpected keys {shown_keys(unexpected)}"
                    )
            elif isinstance(obj, torch.optim.Optimizer) and not is_zero_optimizer(obj):
                live_groups = [len(g["params"]) for g in obj.param_groups]
                groups = saved.get("param_groups") if isinstance(saved, dict) else None
                saved_groups = (
                    [len(g.get("params", ())) for g in groups if isinstance(g, dict)]
                    if isinstance(groups, list)
                    else None
                )
                if saved_groups != live_groups:
                    problems.append(
                        f"{name}: parameter groups of sizes {saved_groups} saved, "
                        f"{live_groups} live"
                    )
        if problems:
            raise StateMismatchError(
                "the checkpoint's state does not match the objects given (nothing was "
                "loaded):\n  " + "\n  ".join(problems) + "\npass strict=False to load the "
                "keys that match and keep the rest (reported in stats), or build the objects "
                "as they were when the checkpoint was saved"
            )

    def mismatch(self, name: str, missing: list[str], unexpected: list[str]) -> None:
        """Record (in stats) and log the keys a ``strict=False`` load could not match."""
        if missing:
            self.stats.last_restore_missing[name] = list(missing)
        if unexpected:
            self.stats.last_restore_unexpected[name] = list(unexpected)
        if missing or unexpected:
            logger.warning(
                "restored %s with strict=False: missing keys (kept their values) %s, "
                "unexpected keys (not loaded) %s",
                name,
                missing,
                unexpected,
            )


def shown_keys(keys: list[str], limit: int = 8) -> str:
    """At most ``limit`` keys of a long list, and how many more there are."""
    if len(keys) <= limit:
        return str(keys)
    return f"{keys[:limit]} and {len(keys) - limit} more"


async def restore(
    restorer: Restorer,
    step: int | None,
    only: Iterable[str] | None,
    layers: str | None,
    bridge: Bridge,
    strict: bool = True,
) -> int | None:
    """Load the newest valid checkpoint (or ``step``); its step, or None when there is none."""
    request = restorer.request(only, layers, strict)
    stats = restorer.stats
    # The report describes the last restore alone.
    stats.last_restore_missing, stats.last_restore_unexpected = {}, {}
    stats.last_restore_skipped = []
    await bridge(restorer.pipeline.drain())  # what is in flight commits first
    if restorer.tiers is not None:
        await bridge(restorer.tiers.drain())
    tried: list[str] = []
    place = restorer.placement(request)  # on the caller's thread, like checkpoint()'s state_dict()
    candidates = await bridge(restorer.agreed_candidates(step))
    for index, info in enumerate(candidates):
        error: BaseException | None = None
        try:
            state = await bridge(restorer.read(info, request, place))
        except (CorruptCheckpointError, WorldSizeError) as exc:
            error = exc
        # Ranks load the same step or none: each rank reads only its own bytes, so a
        # corrupt file is seen by some ranks alone.
        error = await bridge(restorer.agree_on_read(info, error))
        if isinstance(error, CorruptCheckpointError):
            # A step asked for may still be read from another tier's copy of it.
            if step is not None and index == len(candidates) - 1:
                raise error
            restorer.corrupt(info, error, tried)
            continue
        if error is not None:
            raise error
        restorer.apply(state, request)
        if restorer.loaded_manifest is not None:  # incremental: compare with what was loaded
            restorer.pipeline.restored(info.path, restorer.loaded_manifest)
        # The run goes on from here: its next commit supersedes the steps above this one.
        if restorer.tiers is not None:
            restorer.tiers.resumed_from(info.step)
            stats.last_restore_tier = restorer.tiers.tier_of(info)
        else:
            restorer.store.resumed_from(info.step)
        return info.step
    if tried:
        raise CorruptCheckpointError(
            f"every checkpoint in {restorer.config.directory} failed verification:\n  "
            + "\n  ".join(tried)
        )
    return None
