"""Which rank writes which tensor, and where a DTensor's local shard sits in the whole.

Three kinds of state meet in a run on many ranks:

- **replicated**: every rank holds the same tensors (a DistributedDataParallel model and
  its optimizer). One copy is written, split across ranks so each writes about 1/world
  of the bytes (``assign_owners``).
- **sharded**: DTensors (FSDP2, tensor parallel). Each distinct shard is written once, by
  the rank at coordinate 0 of every mesh dimension the tensor is replicated over, with its
  offset in the global tensor (``shard_box``), so that any world size can read it back.
- **per-rank**: everything else (RNG states, a plain module each rank trains on its own):
  each rank writes its own, and gets its own back.

A whole object is replicated when it is a DistributedDataParallel module, an optimizer
over such a module's parameters, an object holding DTensors (the plain tensors beside
them, such as step counters and buffers, are the same on every rank), or is wrapped in
``aiockpt.Replicated``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .group import RankGroup

__all__ = [
    "REPLICATED",
    "PER_RANK",
    "RankShare",
    "Replicated",
    "ShardInfo",
    "assign_owners",
    "dtensor_type",
    "object_kinds",
    "shard_box",
]

REPLICATED = "replicated"
PER_RANK = "per-rank"


class Replicated:
    """Marks a Stateful whose state is the same on every rank: written once, split
    across ranks, and read back by every rank whatever the world size.

    >>> ckpt = aiockpt.Checkpointer(cfg, model=aiockpt.Replicated(model), ...)

    Args:
        obj: the Stateful to wrap.

    Raises:
        TypeError: ``obj`` has no ``state_dict()``/``load_state_dict()``.
    """

    def __init__(self, obj: Any) -> None:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"Replicated() needs a Stateful object, not {type(obj).__name__}")
        self.wrapped = obj

    def state_dict(self) -> dict[str, Any]:
        """The wrapped object's state.

        Returns:
            ``obj.state_dict()``.
        """
        return self.wrapped.state_dict()  # type: ignore[no-any-return]

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        """Load ``state_dict`` into the wrapped object.

        Args:
            state_dict: the saved state.
            *args: passed on to ``obj.load_state_dict``.
            **kwargs: passed on to ``obj.load_state_dict``.

        Returns:
            What ``obj.load_state_dict`` returns.
        """
        return self.wrapped.load_state_dict(state_dict, *args, **kwargs)


def dtensor_type() -> Any:
    """torch's DTensor class, or None where this torch has none."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 kept it private
        try:
            from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
        except ImportError:
            return None
    return DTensor  # type: ignore[no-any-return]


def object_kinds(objects: Mapping[str, Any]) -> dict[str, str]:
    """REPLICATED or PER_RANK for every object given to a Checkpointer."""
    ddp_params: set[int] = set()
    kinds = {}
    for name, obj in objects.items():
        if isinstance(obj, Replicated) or _is_ddp(obj) or holds_dtensors(obj):
            kinds[name] = REPLICATED
            if _is_ddp(obj):
                ddp_params.update(id(p) for p in obj.parameters())
        else:
            kinds[name] = PER_RANK
    for name, obj in objects.items():
        if kinds[name] == PER_RANK and isinstance(obj, torch.optim.Optimizer):
            params = optimizer_parameters(obj)
            if params and all(id(p) in ddp_params for p in params):
                kinds[name] = REPLICATED
    return kinds


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[Any]:
    """An optimizer's parameters in param_groups order: the order in which its
    state_dict() numbers them (``state/<i>/...``)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _is_ddp(obj: Any) -> bool:
    return isinstance(obj, torch.nn.parallel.DistributedDataParallel)


def holds_dtensors(obj: Any) -> bool:
    """Whether a module's parameters or an optimizer's are DTensors."""
    dtensor = dtensor_type()
    if dtensor is None:
        return False
    if isinstance(obj, torch.nn.Module):
        return any(isinstance(p, dtensor) for p in obj.parameters())
    if isinstance(obj, torch.optim.Optimizer):
        return any(isinstance(p, dtensor) for p in optimizer_parameters(obj))
    return False


def assign_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """A rank for each tensor so that every rank writes about the same number of bytes.

    Largest first onto the least-loaded rank (ties to the lower rank): deterministic, so
    every rank computes the same answer from the same sizes without talking to the others.
    """
    owners = [0] * len(sizes)
    loads = [(0, rank) for rank in range(world_size)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + sizes[index], rank))
    return owners


@dataclass(frozen=True)
class ShardInfo:
    """Where a DTensor's local shard lies in the global tensor, and whether this rank is
    the one that writes it (the others hold replicas of the same shard)."""

    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    writer: bool


def shard_box(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Sequence[Any],
    coordinate: Sequence[int],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, local shape) of the shard at ``coordinate`` of a mesh.

    Shard(d) splits dimension d the way torch.chunk does (pieces of ceil(n / parts), the
    last ones shorter or empty), mesh dimension by mesh dimension; Replicate keeps it whole.
    """
    offset = [0] * len(global_shape)
    shape = list(global_shape)
    for mesh_dim, placement in enumerate(placements):
        if _is_replicate(placement):
            continue
        dim = _shard_dim(placement)
        if dim is None:
            raise ValueError(
                f"DTensor placement {placement} cannot be checkpointed; only Shard and "
                "Replicate placements can (reduce a Partial tensor first)"
            )
        dim = dim % max(len(global_shape), 1)
        parts = mesh_shape[mesh_dim]
        step = math.ceil(shape[dim] / parts) if shape[dim] else 0
        start = min(step * coordinate[mesh_dim], shape[dim])
        length = max(min(step, shape[dim] - start), 0)
        offset[dim] += start
        shape[dim] = length
    return tuple(offset), tuple(shape)


def _is_replicate(placement: Any) -> bool:
    return bool(getattr(placement, "is_replicate", lambda: False)())


def _shard_dim(placement: Any) -> int | None:
    # _StridedShard (FSDP2 combined with tensor parallel) also says is_shard(), but its
    # pieces are interleaved: refuse it rather than write the wrong offsets.
    if type(placement).__name__ != "Shard" or not placement.is_shard():
        return None
    return int(placement.dim)


def shard_info(tensor: Any) -> ShardInfo:
    """The ShardInfo of a DTensor on this rank."""
    # Memoized: asking a DeviceMesh for its shape and coordinate costs ~100 us of Python,
    # and capture asks for every DTensor of the state at every checkpoint.
    mesh, placements = tensor.device_mesh, tensor.placements
    key = (id(mesh), placements, tensor.shape)
    known = _SHARD_INFO.get(key)
    if known is not None and known[0] is mesh:
        return known[1]
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("this rank is not part of the DTensor's device mesh")
    offset, _ = shard_box(tuple(tensor.shape), tuple(mesh.shape), placements, coordinate)
    writer = all(coordinate[d] == 0 for d, p in enumerate(placements) if _is_replicate(p))
    info = ShardInfo(tuple(tensor.shape), offset, writer)
    if len(_SHARD_INFO) > 65536:
        _SHARD_INFO.clear()
    _SHARD_INFO[key] = (mesh, info)  # the mesh is kept so its id is never reused
    return info


_SHARD_INFO: dict[tuple[Any, ...], tuple[Any, ShardInfo]] = {}


def local_shard(tensor: Any) -> torch.Tensor:
    """A DTensor's local tensor, without to_local()'s autograd bookkeeping."""
    local = getattr(tensor, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        return local
    return tensor.to_local()  # type: ignore[no-any-return]


def overlap(
    a_offset: Sequence[int], a_shape: Sequence[int], b_offset: Sequence[int], b_shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices of box a and of box b that cover their intersection, or None if disjoint."""
    in_a, in_b = [], []
    for ao, al, bo, bl in zip(a_offset, a_shape, b_offset, b_shape, strict=True):
        start, end = max(ao, bo), min(ao + al, bo + bl)
        if end <= start:
            return None
        in_a.append(slice(start - ao, end - ao))
        in_b.append(slice(start - bo, end - bo))
    return tuple(in_a), tuple(in_b)


@dataclass(frozen=True)
class RankShare:
    """Which tensors of the full state this rank writes: all of its per-rank objects'
    tensors, the replicated tensors assigned to it, and the DTensor shards it leads."""

    written: list[int]
    shard_offsets: dict[int, list[int]]

    @classmethod
    def plan(
        cls,
        tensors: Sequence[torch.Tensor],
        names: Sequence[str],
        shards: Mapping[int, ShardInfo],
        kinds: Mapping[str, str],
        ranks: RankGroup,
    ) -> RankShare:
        per_rank = [kinds.get(name.split("/", 1)[0]) == PER_RANK for name in names]
        plain = [i for i in range(len(names)) if not per_rank[i] and i not in shards]
        owners = assign_owners(
            [tensors[i].numel() * tensors[i].element_size() for i in plain], ranks.world_size
        )
        mine = {i for i, owner in zip(plain, owners, strict=True) if owner == ranks.rank}
        written = [
            i
            for i in range(len(names))
            if per_rank[i] or i in mine or (i in shards and shards[i].writer)
        ]
        offsets = {i: list(shards[i].offset) for i in written if i in shards}
        return cls(written, offsets)

    def fields(self, full_names: Sequence[str]) -> dict[str, Any]:
        """This share as the RankPart fields that describe it."""
        return {
            "written": self.written,
            "full_names": list(full_names),
            "shard_offsets": self.shard_offsets,
        }
