"""The Stateful protocol, the random-number state that exact resume needs, how the
state of an object that shards it across ranks is taken whole, and how a compiled
module's state is named as its eager module's."""

from __future__ import annotations

import random
import sys
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "RNGState",
    "Stateful",
    "eager_name",
    "is_zero_optimizer",
    "live_names",
    "state_to_save",
    "uncompiled",
]

# The attribute under which torch.compile's OptimizedModule keeps the module it wraps, and
# so a segment of every state_dict key of a compiled module.
_COMPILED = "_orig_mod"


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: modules, optimizers,
    schedulers, GradScaler, samplers, and your own objects."""

    def state_dict(self) -> dict[str, Any]:
        """The object's state, to be saved.

        Returns:
            A nested dict of tensors and plain values (see the README's "What can be
            saved"); a checkpoint captures it at once, so the object may change after.
        """
        ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any:
        """Take back a state that :meth:`state_dict` returned.

        Args:
            state_dict: the saved state, with every value of its original type.

        Returns:
            Anything; aiockpt ignores it.
        """
        ...


def _numpy_random() -> Any | None:
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random


class RNGState:
    """Every global random generator that training draws from, as one Stateful.

    Covers torch's CPU generator, the generator of every visible CUDA device, numpy's
    legacy global generator (when numpy is installed) and Python's ``random``. Pass it to
    a Checkpointer as ``rng=aiockpt.RNGState()`` so dropout masks and data shuffles
    continue exactly where they were after a restore.
    """

    def state_dict(self) -> dict[str, Any]:
        """The state of every generator, now.

        Returns:
            ``{"torch", "python"}``, plus ``"cuda"`` (one state per visible device, once
            CUDA is initialised) and ``"numpy"`` (when numpy is installed).
        """
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        np_random = _numpy_random()
        if np_random is not None:
            state["numpy"] = np_random.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Put every generator back where :meth:`state_dict` found it.

        CUDA states are given to as many devices as were saved and are visible now; the
        numpy state is skipped when numpy is not installed or was not saved.

        Args:
            state_dict: what :meth:`state_dict` returned.
        """
        torch.set_rng_state(state_dict["torch"].cpu())
        random.setstate(_as_tuples(state_dict["python"]))
        cuda_states = state_dict.get("cuda")
        if cuda_states is not None and torch.cuda.is_available():
            count = min(len(cuda_states), torch.cuda.device_count())
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states[:count]])
        np_random = _numpy_random()
        if np_random is not None and "numpy" in state_dict:
            np_random.set_state(state_dict["numpy"])


def _as_tuples(value: Any) -> Any:
    # random.setstate insists on tuples all the way down.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def is_zero_optimizer(obj: object) -> bool:
    """Whether ``obj`` is a torch.distributed ZeroRedundancyOptimizer."""
    # Not imported here: a ZeroRedundancyOptimizer exists only if its module was loaded.
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    zero = getattr(module, "ZeroRedundancyOptimizer", None)
    return zero is not None and isinstance(obj, zero)


def state_to_save(obj: Any) -> Any:
    """What a checkpoint saves of ``obj``: its state_dict(), taken whole.

    A module compiled with torch.compile, or holding compiled submodules, is saved under
    the names of the eager module, so that its checkpoint restores into the module
    compiled or not (see :func:`live_names`).

    A ZeroRedundancyOptimizer holds only this rank's shard of the optimizer state, and its
    state_dict() refuses to answer until consolidate_state_dict() has gathered the shards
    on one rank. Following torch's recipe, the shards are consolidated on rank 0 of its
    group and the whole state is broadcast from there, so every rank saves (and later
    loads, each taking its own shard) the same full state. Both steps are collectives:
    every rank of the group takes part, as every rank calls checkpoint() at the same step.
    """
    if isinstance(obj, torch.nn.Module):
        return _eager_keys(uncompiled(obj).state_dict())
    if not is_zero_optimizer(obj):
        return obj.state_dict()
    import torch.distributed as dist

    group = obj.process_group
    obj.consolidate_state_dict(to=0)
    whole = [obj.state_dict() if dist.get_rank(group) == 0 else None]
    if dist.get_world_size(group) > 1:
        dist.broadcast_object_list(whole, src=dist.get_global_rank(group, 0), group=group)
    return whole[0]


def uncompiled(obj: Any) -> Any:
    """The module that torch.compile wrapped in ``obj``, or ``obj`` when it is no compiled
    module."""
    while isinstance(obj, torch.nn.Module) and isinstance(
        getattr(obj, _COMPILED, None), torch.nn.Module
    ):
        obj = getattr(obj, _COMPILED)
    return obj


def eager_name(key: str) -> str:
    """A module's state_dict key as the eager module names it: without the segments that
    compiled submodules add (``block._orig_mod.weight`` -> ``block.weight``)."""
    if _COMPILED not in key:
        return key
    return ".".join(part for part in key.split(".") if part != _COMPILED)


def _eager_keys(state: dict[str, Any]) -> dict[str, Any]:
    # The usual module holds no compiled submodule: its own state_dict, as it is.
    if not any(_COMPILED in key for key in state):
        return state
    return {eager_name(key): value for key, value in state.items()}


def live_names(module: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state``, a module state saved by any module of the same eager names, keyed as
    ``module``'s own load_state_dict expects: compiled submodules' segments are put in or
    taken out where ``module`` has (or lacks) them. Keys that ``module`` has no match for
    are kept as they are, for load_state_dict to report."""
    live = uncompiled(module).state_dict()
    if not any(_COMPILED in key for key in state) and not any(_COMPILED in key for key in live):
        return state
    by_eager_name = {eager_name(key): key for key in live}
    return {by_eager_name.get(eager_name(key), key): value for key, value in state.items()}
