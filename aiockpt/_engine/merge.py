"""One manifest from the parts that the ranks of a run wrote.

Each rank writes its own data files and describes them in a ``RankPart``: the records of
the tensors it wrote (indices into its own tensor table) and its skeleton. Rank 0 merges
the parts into the checkpoint's one manifest:

- a replicated object keeps rank 0's skeleton; each tensor points at the copy written by
  its owner (found by name: every rank names a replicated tensor alike), and each DTensor
  lists the shards written by all ranks;
- a per-rank object becomes ``{"$ranks": [skeleton of rank 0, of rank 1, ...]}`` and its
  tensors are named ``<name>@rank<r>``, as are DTensor shards (each written by one rank).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._format.manifest import FileRecord, Manifest, TensorRecord
from ..distributed.sharding import PER_RANK
from .capture.flatten import DTENSOR_TAG, RANKS_TAG, TENSOR_TAG

__all__ = ["RankPart", "merge_parts"]

OK, FAILED, SKIPPED = "ok", "failed", "skipped"


@dataclass
class RankPart:
    """What one rank reports for one checkpoint: its vote, and what it wrote."""

    rank: int
    step: int
    status: str  # OK, FAILED or SKIPPED
    error: str | None = None
    manifest: Manifest | None = None  # tensors in the order this rank wrote them
    written: list[int] = field(default_factory=list)  # index in full_names per record
    full_names: list[str] = field(default_factory=list)
    shard_offsets: dict[int, list[int]] = field(default_factory=dict)  # written shards


def _owner_name(name: str, rank: int) -> str:
    return f"{name}@rank{rank}"


def merge_parts(
    parts: list[RankPart],
    kinds: dict[str, str],
    *,
    step: int,
    created: float,
    versions: dict[str, str],
) -> Manifest:
    """The checkpoint's manifest; every part must have status OK."""
    records: list[TensorRecord] = []
    files: list[FileRecord] = []
    placed: dict[tuple[int, int], int] = {}  # (rank, index in its table) -> record
    replicated: dict[str, int] = {}  # name -> record of its one written copy
    shards: dict[str, list[dict[str, Any]]] = {}  # DTensor name -> its written shards
    for part in parts:
        assert part.manifest is not None and part.status == OK
        files.extend(part.manifest.files)
        for local, index in enumerate(part.written):
            record = part.manifest.tensors[local]
            name = part.full_names[index]
            number = len(records)
            if kinds.get(name.split("/", 1)[0]) == PER_RANK or index in part.shard_offsets:
                record = dataclasses.replace(record, name=_owner_name(name, part.rank))
            else:
                replicated[name] = number
            if index in part.shard_offsets:
                shard = {"offset": part.shard_offsets[index], "data": {TENSOR_TAG: number}}
                shards.setdefault(name, []).append(shard)
            placed[(part.rank, index)] = number
            records.append(record)

    def per_rank(part: RankPart) -> Callable[[int], int]:
        return lambda index: placed[(part.rank, index)]

    first = parts[0]
    state: dict[str, Any] = {}
    for key, skeleton in first.manifest.state.items():  # type: ignore[union-attr]
        if kinds.get(key) == PER_RANK:
            state[key] = {
                RANKS_TAG: [
                    _remap(part.manifest.state[key], per_rank(part))  # type: ignore[union-attr]
                    for part in parts
                ]
            }
        else:
            state[key] = _remap(
                skeleton,
                lambda index: replicated[first.full_names[index]],
                lambda index: shards[first.full_names[index]],
            )
    return Manifest(
        step=step,
        created=created,
        world_size=len(parts),
        versions=versions,
        checksum_algorithm="crc32c",
        files=tuple(files),
        tensors=tuple(records),
        state=state,
    )


def _remap(
    node: Any,
    tensor: Callable[[int], int],
    dtensor_shards: Callable[[int], list[dict[str, Any]]] | None = None,
) -> Any:
    """A copy of a skeleton with its tensor references renumbered."""
    if isinstance(node, list):
        return [_remap(v, tensor, dtensor_shards) for v in node]
    if not isinstance(node, dict):
        return node
    tag = next(iter(node), None)
    if tag in (TENSOR_TAG, "$ndarray"):
        return {tag: tensor(node[tag])}
    if tag == DTENSOR_TAG and dtensor_shards is not None:
        own = node[tag]["shards"][0]["data"][TENSOR_TAG]
        return {DTENSOR_TAG: {"shape": node[tag]["shape"], "shards": dtensor_shards(own)}}
    return {k: _remap(v, tensor, dtensor_shards) for k, v in node.items()}
