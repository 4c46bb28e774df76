"""The reader's limits, applied by the writer before a checkpoint is admitted.

A committed checkpoint that readers refuse is worse than none: restore skips it as
corrupt and quietly resumes from an older one. So capture checks the flattened state
against every limit of docs/FORMAT.md section 8 that the state decides (tensor count,
dimensions, sizes, dtypes, nesting, tag payloads) and refuses it with
UnsupportedStateError naming the path, before anything is admitted or written; the layout
is checked for the number and size of files. What only the serialized manifest decides
(its size and its number of JSON containers) is checked by Manifest.to_json, before
commit.

The limits are read from ``manifest`` at each check, so the writer can never drift from
the reader. Steady state costs next to nothing: the tensor table is checked once per
structure of the state (the flatten plan's), and the skeleton only where its containers
changed since the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..._format import manifest
from ..._format.tags import dtype_from_name, dtype_name
from ...errors import UnsupportedStateError
from ..layout import Layout
from . import flatten_state
from .flatten import FlatState
from .replay import FlattenCache

__all__ = ["StateLimits", "check_layout", "check_tensors"]


class StateLimits:
    """Flattens state for capture and refuses what a reader would refuse."""

    def __init__(self) -> None:
        self._structure: object | None = None
        # Skeleton containers checked at the last capture: id -> (container, depth).
        self._checked: dict[int, tuple[Any, int]] = {}

    def flatten(
        self, states: Mapping[str, Any], plans: FlattenCache | None, *, complete: bool = True
    ) -> FlatState:
        """``flatten_state`` of ``states``, checked against the format's limits.

        ``complete`` is False on a rank of several, whose DTensors hold only its shards.
        """
        try:
            flat = flatten_state(states, plans)
        except RecursionError as exc:
            raise UnsupportedStateError(
                "the state nests too deeply to be saved (or holds itself); a checkpoint "
                f"holds state nested at most {manifest.MAX_SKELETON_DEPTH} levels: "
                "flatten it in state_dict()"
            ) from exc
        self.check(flat, complete=complete)
        return flat

    def check(self, flat: FlatState, *, complete: bool = True) -> None:
        if flat.structure is None or flat.structure is not self._structure:
            check_tensors(flat)
            known: dict[int, tuple[Any, int]] = {}  # other tensors: check everything
        else:
            known = self._checked
        checked: dict[int, tuple[Any, int]] = {}
        try:
            manifest.check_skeleton(
                flat.skeleton, flat.tensors, complete=complete, known=known, checked=checked
            )
        except manifest.SkeletonError as exc:
            self._structure, self._checked = None, {}
            where = _path_of(flat.skeleton, exc.node) if exc.node is not None else None
            raise UnsupportedStateError(
                f"{where or 'the state'}: {exc}; a checkpoint holding it would be refused "
                "by every reader (docs/FORMAT.md sections 4 and 8): change or leave out "
                "this value in state_dict()"
            ) from None
        self._structure, self._checked = flat.structure, checked


def check_tensors(flat: FlatState) -> None:
    """Count, dimensions, size and dtype of every tensor against the format's limits."""
    if len(flat.tensors) > manifest.MAX_TENSORS:
        raise UnsupportedStateError(
            f"the state holds {len(flat.tensors)} tensors, over the {manifest.MAX_TENSORS} "
            "a checkpoint may hold: merge small tensors into larger ones in state_dict()"
        )
    for name, tensor in zip(flat.names, flat.tensors, strict=True):
        if tensor.dim() > manifest.MAX_NDIM:
            raise UnsupportedStateError(
                f"{name}: a tensor of {tensor.dim()} dimensions; a checkpoint holds at most "
                f"{manifest.MAX_NDIM}: reshape it in state_dict()"
            )
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > manifest.MAX_TENSOR_BYTES:
            raise UnsupportedStateError(
                f"{name}: a tensor of {nbytes} bytes, over the {manifest.MAX_TENSOR_BYTES} "
                "a checkpoint holds in one tensor: split it in state_dict()"
            )
        if dtype_from_name(dtype_name(tensor.dtype)) is None:
            raise UnsupportedStateError(
                f"{name}: dtype {tensor.dtype} has no name a reader could look up"
            )


def check_layout(layout: Layout) -> None:
    """The data files a layout makes: their number and sizes against the format's limits."""
    if len(layout.chunks) > manifest.MAX_FILES:
        raise UnsupportedStateError(
            f"the state would be written as {len(layout.chunks)} data files, over the "
            f"{manifest.MAX_FILES} a checkpoint may have: raise chunk_size_mb"
        )
    largest = max((c.nbytes for c in layout.chunks), default=0)
    if largest > manifest.MAX_TENSOR_BYTES:
        raise UnsupportedStateError(
            f"a data file of {largest} bytes, over the {manifest.MAX_TENSOR_BYTES} a file "
            "may hold: lower chunk_size_mb"
        )


def _path_of(skeleton: Mapping[str, Any], target: Any) -> str | None:
    """The state path (``optimizer/param_groups/0/lr``) of the container ``target``."""
    pending: list[tuple[Any, str]] = [(v, k) for k, v in skeleton.items()]
    while pending:
        node, path = pending.pop()
        if node is target:
            return path
        if isinstance(node, list):
            pending.extend((v, f"{path}/{i}") for i, v in enumerate(node))
        elif isinstance(node, dict):
            tag = next(iter(node), None)
            if tag == "$dict" and isinstance(node[tag], list):
                for pair in node[tag]:
                    if isinstance(pair, list) and len(pair) == 2:
                        pending.append((pair[1], f"{path}/{pair[0]}"))
            elif isinstance(tag, str) and tag.startswith("$"):
                pending.extend((v, path) for v in node.values())  # a tag adds no level
            else:
                pending.extend((v, f"{path}/{k}") for k, v in node.items())
    return None
