"""Restore on many ranks: read only what this rank needs, and rebuild its DTensor shards.

A checkpoint saved by some number of ranks restores onto any other number:

- replicated tensors: every rank reads them whole;
- state saved per rank: rank r reads what rank r saved (WorldSizeError if none did);
- DTensors: each rank reads the saved shards that overlap its own shard (as its live
  object shards it now) and copies the overlapping parts into place. An optimizer with
  no state yet takes the sharding of the parameter that the state belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._format.manifest import Manifest, TensorRecord
from .._format.skeleton import SavedShards
from .._format.tags import DTENSOR_TAG, RANKS_TAG, TENSOR_TAG
from ..distributed.sharding import (
    dtensor_type,
    holds_dtensors,
    optimizer_parameters,
    overlap,
    shard_box,
)
from ..errors import RestoreError
from ..stateful import state_to_save
from .capture import flatten_state

__all__ = ["RankSelection", "place_shards"]

_OWNED = re.compile(r"(?P<name>.*)@rank(?P<rank>\d+)")
_OPTIMIZER_STATE = re.compile(r"state/(?P<index>\d+)/[^/]+")


class RankSelection:
    """Which tensors of a checkpoint one rank reads."""

    def __init__(self, objects: Mapping[str, Any], rank: int) -> None:
        self.rank = rank
        # Where each live DTensor's shard lies: (offset, local shape) by its state path.
        self.boxes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        if any(holds_dtensors(obj) for obj in objects.values()):
            live = flatten_state({key: state_to_save(obj) for key, obj in objects.items()})
            for index, info in live.shards.items():
                local = tuple(live.tensors[index].shape)
                self.boxes[live.names[index]] = (info.offset, local)

    def filter(
        self, manifest: Manifest, also: Callable[[TensorRecord], bool] | None = None
    ) -> Callable[[TensorRecord], bool]:
        """Accept what this rank needs of ``manifest`` (and ``also`` accepts)."""
        offsets = _shard_offsets(manifest.state)
        index_of = {id(record): i for i, record in enumerate(manifest.tensors)}
        per_rank = {key for key, node in manifest.state.items() if _saved_per_rank(node)}

        def accept(record: TensorRecord) -> bool:
            return (also is None or also(record)) and needed(record)

        def needed(record: TensorRecord) -> bool:
            owned = _OWNED.fullmatch(record.name)
            if owned is None:
                return True  # replicated: every rank needs it
            name = owned["name"]
            if name.split("/", 1)[0] in per_rank:
                return int(owned["rank"]) == self.rank
            box = self.boxes.get(name)
            offset = offsets.get(index_of[id(record)])
            if box is None or offset is None:
                return True  # nothing live to compare with: read every shard
            return overlap(box[0], box[1], offset, record.shape) is not None

        return accept


def _saved_per_rank(node: Any) -> bool:
    return isinstance(node, dict) and RANKS_TAG in node


def _shard_offsets(state: Any) -> dict[int, tuple[int, ...]]:
    """The offset of every saved DTensor shard, by tensor index."""
    found: dict[int, tuple[int, ...]] = {}
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            payload = node.get(DTENSOR_TAG)
            if isinstance(payload, dict):
                for shard in payload.get("shards", []):
                    found[shard["data"][TENSOR_TAG]] = tuple(shard["offset"])
            else:
                stack.extend(node.values())
    return found


def place_shards(state: Any, obj: Any) -> Any:
    """Turn the SavedShards in ``state`` (decoded for ``obj``) into what ``obj`` holds now:
    DTensors sharded as its live ones are, or whole tensors where it has plain ones."""
    live = state_to_save(obj)  # named as saved (a compiled module's under eager names)
    params = _optimizer_params(obj)
    return _place(state, live, "", params)


def _optimizer_params(obj: Any) -> list[Any]:
    # state_dict() numbers an optimizer's parameters in param_groups order.
    if isinstance(obj, torch.optim.Optimizer):
        return optimizer_parameters(obj)
    return []


def _place(node: Any, live: Any, path: str, params: list[Any]) -> Any:
    if isinstance(node, SavedShards):
        return _as_live(node, live, path, params)
    if (
        isinstance(node, torch.Tensor)
        and _dtensor_target(live, path, params, node.shape) is not None
    ):
        # A whole tensor (saved by one process, or imported) restored into a DTensor.
        whole = SavedShards(tuple(node.shape), [((0,) * node.dim(), node)])
        return _as_live(whole, live, path, params)
    if isinstance(node, dict):
        for key in list(node):  # in place: keeps OrderedDict and its _metadata
            inner = live.get(key) if isinstance(live, Mapping) else None
            node[key] = _place(node[key], inner, f"{path}/{key}" if path else str(key), params)
        return node
    if isinstance(node, list):
        for i, value in enumerate(node):
            inner = live[i] if isinstance(live, list) and i < len(live) else None
            node[i] = _place(value, inner, f"{path}/{i}", params)
        return node
    return node


def _dtensor_target(live: Any, path: str, params: list[Any], shape: Any) -> Any:
    """The live DTensor a saved value at ``path`` goes into, or None for a plain tensor:
    the live value itself, or for optimizer state not created yet, its parameter."""
    dtensor = dtensor_type()
    if dtensor is None:
        return None
    if isinstance(live, dtensor):
        return live
    match = _OPTIMIZER_STATE.fullmatch(path)
    if live is None and match and int(match["index"]) < len(params):
        param = params[int(match["index"])]
        if isinstance(param, dtensor) and tuple(param.shape) == tuple(shape):
            return param
    return None


def _as_live(saved: SavedShards, live: Any, path: str, params: list[Any]) -> Any:
    dtensor = dtensor_type()
    target = _dtensor_target(live, path, params, saved.shape)
    if target is None:
        return saved.assemble()
    if tuple(target.shape) != saved.shape:
        raise RestoreError(
            f"{path}: saved with shape {list(saved.shape)}, but it has shape "
            f"{list(target.shape)} now; restore into a model built like the saved one"
        )
    return _local_dtensor(saved, target, dtensor)


def _local_dtensor(saved: SavedShards, target: Any, dtensor: Any) -> Any:
    mesh = target.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise RestoreError("this rank is not part of the DTensor's device mesh")
    offset, shape = shard_box(saved.shape, tuple(mesh.shape), target.placements, coordinate)
    read = [(o, t) for o, t in saved.shards if isinstance(t, torch.Tensor)]
    dtype = read[0][1].dtype if read else target.dtype
    local = torch.empty(shape, dtype=dtype)
    filled = 0
    for shard_offset, tensor in read:
        common = overlap(offset, shape, shard_offset, tuple(tensor.shape))
        if common is not None:
            mine, theirs = common
            local[mine].copy_(tensor[theirs])
            filled += local[mine].numel()
    if filled != local.numel():
        raise RestoreError(
            f"the saved shards cover {filled} of the {local.numel()} elements this rank "
            f"holds of a tensor of shape {list(saved.shape)} (offset {list(offset)})"
        )
    local = local.to(target.to_local().device)
    return dtensor.from_local(
        local,
        mesh,
        target.placements,
        run_check=False,
        shape=target.shape,
        stride=target.stride(),
    )
