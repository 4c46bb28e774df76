"""Replay the last flattening when a state has the same structure (the usual case).

Every checkpoint of a training run flattens state of one shape: the same keys, the same
container types, the same tensors (new values, often new tensor objects) with the same
dtype, shape and device. The full encoder (``flatten._Flattener``) rediscovers that shape
at every call: a path, a name and a new JSON container for every node, on the training
thread. A ``StatePlan``, compiled from one full flattening, walks a new state in one tight
pass that checks, rather than rebuilds:

- every container's exact type and keys (in order, key types included where they show in
  the JSON), and which values are tensors, leaves or containers;
- every tensor's dtype, shape, device and requires_grad, and the aliasing between tensors
  (which occurrences share a view), so the tensor table and its indices come out the same.

It returns exactly what the full encoder would: the tensors read from the new state, the
leaves read from the new state (immutable values, so reading them is copying them), the
names and indices of the plan. JSON containers whose content is unchanged are reused from
the previous result, so skeletons are shared between snapshots and must stay read-only;
that is also what keeps a checkpoint from allocating thousands of objects that the garbage
collector would have to promote (and later scan in a full pass) while they are in flight.

A subtree without tensors is encoded on the spot by the full encoder when it changes (its
JSON depends on nothing else), so a growing list of losses does not defeat the plan. Any
other difference, and any error, abandons the replay: the caller runs the full encoder,
which compiles a new plan (or reports the error with its path).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from itertools import chain
from operator import attrgetter, is_
from typing import Any

import torch

from .flatten import _PLAIN_LEAVES, TENSOR_TAG, FlatState, _Flattener, ndarray_tensor

__all__ = ["FlattenCache", "StatePlan"]

_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_ROW_TYPES = frozenset({dict})
_PLAIN_KINDS = frozenset(_PLAIN_LEAVES)
_NUMBER_KINDS = _PLAIN_KINDS | {float}
_META = attrgetter("dtype", "shape", "device", "requires_grad")
_data_ptr = torch.Tensor.data_ptr


class _Miss(Exception):
    """The new state does not have the structure of the plan."""


class _Uncompilable(Exception):
    """The state holds something the plan cannot check cheaply (it stays on the full path)."""


_MISS = _Miss()


def _is_plain(value: Any) -> bool:
    kind = type(value)
    return kind in _PLAIN_KINDS or (kind is float and math.isfinite(value))


def _plain_items(values: list[Any]) -> set[type] | None:
    """The types of ``values`` when every one of them encodes as itself, else None."""
    kinds = set(map(type, values))
    if kinds <= _PLAIN_KINDS:
        return kinds
    if not kinds <= _NUMBER_KINDS:
        return None
    floats = values if len(kinds) == 1 else [v for v in values if type(v) is float]
    # A NaN or an infinity anywhere makes the sum non-finite (as does an overflow, which
    # merely sends the list down the full encoder).
    return kinds if math.isfinite(sum(floats)) else None


def _encode_alone(value: Any) -> Any:
    """The full encoding of a subtree that holds no tensor (its JSON needs no context)."""
    flattener = _Flattener()
    encoded = flattener.encode(value, "")
    if flattener.tensors:
        raise _MISS  # a tensor appeared where there was none: indices would shift
    return encoded


class _Node:
    __slots__ = ()

    def replay(self, value: Any, tensors: list[torch.Tensor]) -> Any:
        raise NotImplementedError


class _TensorNode(_Node):
    __slots__ = ("encoded",)

    def __init__(self, encoded: dict[str, int]) -> None:
        self.encoded = encoded

    def replay(self, value: Any, tensors: list[torch.Tensor]) -> Any:
        if type(value) not in _TENSOR_TYPES:
            raise _MISS
        tensors.append(value)
        return self.encoded  # the index is checked with the aliasing, after the walk


class _ArrayNode(_Node):
    """A numpy array: stored as a copy taken now, like the full encoder does."""

    __slots__ = ("encoded", "path")

    def __init__(self, encoded: dict[str, int], path: str) -> None:
        self.encoded = encoded
        self.path = path

    def replay(self, value: Any, tensors: list[torch.Tensor]) -> Any:
        import numpy as np

        if type(value) is not np.ndarray:
            raise _MISS
        tensors.append(ndarray_tensor(value, self.path))
        return self.encoded


class _FreeNode(_Node):
    """A subtree without tensors: replayed by ``inner`` when it has one, else (and when its
    structure changed) encoded on the spot."""

    __slots__ = ("inner", "last_items", "last_kinds", "last_out")

    def __init__(self, inner: _Node | None) -> None:
        self.inner = inner
        self.last_items: list[Any] | None = None
        self.last_kinds: set[type] | None = None
        self.last_out: Any = None

    def replay(self, value: Any, tensors: list[torch.Tensor]) -> Any:
        kind = type(value)
        if kind in _PLAIN_KINDS or (kind is float and math.isfinite(value)):
            return value
        if self.inner is not None:
            try:
                return self.inner.replay(value, tensors)
            except _Miss:
                pass
        if kind is list or kind is tuple:
            return self._sequence(value, kind)
        return _encode_alone(value)

    def _sequence(self, value: list[Any] | tuple[Any, ...], kind: type) -> Any:
        # Lists of numbers or strings (histories, the params of a param group, Python's
        # random state): typed in bulk instead of element by element.
        items = list(value)
        kinds = _plain_items(items)
        if kinds is None:
            return _encode_alone(value)
        # Equal lists of one non-float type encode alike (1 == 1.0 == True and
        # 0.0 == -0.0 are why mixed and float lists are rebuilt instead).
        if (
            len(kinds) <= 1
            and float not in kinds
            and kinds == self.last_kinds
            and self.last_items is not None
            and items == self.last_items
            and (kind is list) == (type(self.last_out) is list)
        ):
            return self.last_out
        out: Any = items if kind is list else {"$tuple": items}
        self.last_items, self.last_kinds, self.last_out = items, kinds, out
        return out


class _SequenceNode(_Node):
    __slots__ = ("children", "kind", "out", "outs", "tensor_only")

    def __init__(self, kind: Any, children: list[_Node], out: Any, outs: list[Any]) -> None:
        self.kind = kind
        self.children = children
        self.tensor_only = bool(children) and all(type(c) is _TensorNode for c in children)
        self.outs = outs
        self.out = out

    def replay(self, value: Any, tensors: list[torch.Tensor]) -> Any:
        if type(value) is not self.kind or len(value) != len(self.children):
            raise _MISS
        if self.tensor_only:
            if not set(map(type, value)) <= _TENSOR_TYPES:
                raise _MISS
            tensors.extend(value)
            return self.out
        outs = [child.replay(v, tensors) for child, v in zip(self.children, value, strict=True)]
        if all(map(is_, outs, self.outs)):
            return self.out
        self.outs = outs
        self.out = outs if issubclass(self.kind, list) else {"$tuple": outs}
        return self.out


# How a mapping's values are checked: one node each, or in bulk when they are all tensors,
# or all dicts of one key set holding only tensors (optimizer state) or only plain leaves
# (a module state_dict's per-module metadata).
_GENERIC, _TENSORS, _TENSOR_ROWS, _PLAIN_ROWS = range(4)


class _MappingNode(_Node):
    __slots__ = (
        "children",
        "inner",
        "key_reprs",
        "key_types",
        "keys",
        "kind",
        "meta",
        "meta_out",
        "mode",
        "out",
        "outs",
        "row_items",
        "row_keys",
        "row_kinds",
        "tagged",
    )

    def __init__(
        self,
        value: Mapping[Any, Any],
        encoded: Any,
        children: list[_Node],
        meta: _Node | None,
    ) -> None:
        self.kind: Any = type(value)
        self.keys = tuple(value)
        self.meta = meta
        self.out = encoded
        if meta is not None:
            inner, self.meta_out = encoded["$odict"], encoded["meta"]
        else:
            inner, self.meta_out = encoded, None
        self.inner = inner
        # "$dict" pairs show the keys' own JSON (1 and True differ there); plain keys are
        # strings, compared in full by the key tuple.
        self.tagged = type(inner) is dict and next(iter(inner), None) == "$dict"
        self.key_types = list(map(type, self.keys)) if self.tagged else None
        # Float keys equal as numbers can still differ in JSON (0.0 and -0.0).
        float_keys = self.key_types is not None and float in self.key_types
        self.key_reprs = list(map(repr, self.keys)) if float_keys else None
        self.children = children
        values = list(value.values())
        self.outs = [pair[1] for pair in inner["$dict"]] if self.tagged else list(inner.values())
        self.row_keys: tuple[Any, ...] = ()
        self.row_items: list[Any] | None = None
        self.row_kinds: list[type] | None = None
        self.mode = _GENERIC
        if children and all(type(c) is _TensorNode for c in children):
            self.mode = _TENSORS
        elif values and set(map(type, values)) == {dict}:
            row_keys = tuple(values[0])
            plain_keys = all(type(k) is str and not k.startswith("$") for k in row_keys)
            if row_keys and plain_keys and all(tuple(v) == row_keys for v in values):
                items = list(chain.from_iterable(v.values() for v in values))
                if set(map(type, items)) <= _TENSOR_TYPES:
                    self.mode, self.row_keys = _TENSOR_ROWS, row_keys
                elif _plain_items(items) is not None:
                    self.mode, self.row_keys = _PLAIN_ROWS, row_keys
                    self.row_items, self.row_kinds = items, list(map(type, items))

    def replay(self, value: Any, tensors: list[torch.Tensor]) -> Any:
        if type(value) is not self.kind:
            raise _MISS
        keys = tuple(value)
        if keys != self.keys:
            raise _MISS
        if self.key_types is not None and list(map(type, keys)) != self.key_types:
            raise _MISS
        if self.key_reprs is not None and list(map(repr, keys)) != self.key_reprs:
            raise _MISS
        mode = self.mode
        if mode == _TENSORS:
            values = list(value.values())
            if not set(map(type, values)) <= _TENSOR_TYPES:
                raise _MISS
            tensors.extend(values)
            inner = self.inner
        elif mode == _TENSOR_ROWS:
            items = self._row_items(value)
            if not set(map(type, items)) <= _TENSOR_TYPES:
                raise _MISS
            tensors.extend(items)
            inner = self.inner
        elif mode == _PLAIN_ROWS:
            inner = self._plain_rows(self._row_items(value))
        else:
            values = value.values()
            outs = [
                child.replay(v, tensors) for child, v in zip(self.children, values, strict=True)
            ]
            inner = self.inner if all(map(is_, outs, self.outs)) else self._build(outs)
        return self._wrap(value, inner, tensors)

    def _row_items(self, value: Any) -> list[Any]:
        rows = list(value.values())
        if not set(map(type, rows)) <= _ROW_TYPES:
            raise _MISS
        if not all(map(self.row_keys.__eq__, map(tuple, rows))):
            raise _MISS
        return list(chain.from_iterable(map(dict.values, rows)))

    def _plain_rows(self, items: list[Any]) -> Any:
        kinds = list(map(type, items))
        if kinds == self.row_kinds and float not in kinds and items == self.row_items:
            return self.inner  # same types, equal values, no float: the same JSON
        if _plain_items(items) is None:
            raise _MISS
        width = len(self.row_keys)
        rows = [items[i : i + width] for i in range(0, len(items), width)]
        outs = [dict(zip(self.row_keys, row, strict=True)) for row in rows]
        self.row_items, self.row_kinds = items, kinds
        return self._build(outs)

    def _build(self, outs: list[Any]) -> Any:
        self.outs = outs
        if self.tagged:
            self.inner = {"$dict": [[k, o] for k, o in zip(self.keys, outs, strict=True)]}
        else:
            self.inner = dict(zip(self.keys, outs, strict=True))
        return self.inner

    def _wrap(self, value: Any, inner: Any, tensors: list[torch.Tensor]) -> Any:
        metadata = getattr(value, "_metadata", None)
        has_meta = isinstance(value, OrderedDict) and isinstance(metadata, Mapping)
        if has_meta != (self.meta is not None):
            raise _MISS
        if self.meta is None:
            self.out = inner
            return inner
        meta_out = self.meta.replay(dict(metadata), tensors)  # type: ignore[arg-type]
        if inner is not self.out["$odict"] or meta_out is not self.meta_out:
            self.meta_out = meta_out
            self.out = {"$odict": inner, "meta": meta_out}
        return self.out


def _compile(value: Any, encoded: Any, path: str) -> tuple[_Node, bool]:
    """The node replaying ``value`` (encoded as ``encoded``); and whether it holds tensors."""
    kind = type(value)
    if kind in _TENSOR_TYPES:
        return _TensorNode(encoded), True
    if isinstance(value, torch.Tensor):
        raise _Uncompilable  # subclasses may encode differently
    if type(value).__module__.startswith("numpy"):
        import numpy as np

        if kind is np.ndarray:
            return _ArrayNode(encoded, path), True
        if isinstance(value, np.ndarray):
            raise _Uncompilable
        return _FreeNode(None), False
    if isinstance(value, Mapping):
        return _compile_mapping(value, encoded, path)
    if isinstance(value, (list, tuple)):
        items = encoded if isinstance(value, list) else encoded["$tuple"]
        if (kind is list or kind is tuple) and _plain_items(list(value)) is not None:
            return _FreeNode(None), False  # replayed in bulk, whatever its length
        pairs = enumerate(zip(value, items, strict=True))
        compiled = [_compile(v, e, f"{path}/{i}") for i, (v, e) in pairs]
        children = [node for node, _ in compiled]
        if not any(has for _, has in compiled):
            return _FreeNode(_SequenceNode(kind, children, encoded, items)), False
        return _SequenceNode(kind, children, encoded, items), True
    return _FreeNode(None), False


def _compile_mapping(value: Mapping[Any, Any], encoded: Any, path: str) -> tuple[_Node, bool]:
    metadata = getattr(value, "_metadata", None)
    has_meta = isinstance(value, OrderedDict) and isinstance(metadata, Mapping)
    inner = encoded["$odict"] if has_meta else encoded
    tagged = next(iter(inner), None) == "$dict"
    if tagged:
        if not all(_is_plain(k) for k in value):
            if _holds_tensors(value):
                raise _Uncompilable  # keys encoded through the full encoder
            return _FreeNode(None), False
        outs = [pair[1] for pair in inner["$dict"]]
    else:
        outs = list(inner.values())
    compiled = [
        _compile(v, e, f"{path}/{k}") for (k, v), e in zip(value.items(), outs, strict=True)
    ]
    meta: tuple[_Node, bool] | None = None
    if has_meta:
        meta = _compile(dict(metadata), encoded["meta"], f"{path}/<meta>")  # type: ignore[arg-type]
    has_tensors = any(has for _, has in compiled) or (meta is not None and meta[1])
    node = _MappingNode(value, encoded, [n for n, _ in compiled], None if meta is None else meta[0])
    return (node, True) if has_tensors else (_FreeNode(node), False)


def _holds_tensors(value: Any) -> bool:
    flattener = _Flattener()
    flattener.encode(value, "")
    return bool(flattener.tensors)


class StatePlan:
    """The structure of one flattened state, and the checks that a new state has it."""

    def __init__(self, state: Mapping[str, Any], flat: FlatState) -> None:
        self.keys = tuple(state)
        self.nodes: list[_Node] = []
        for key, value in state.items():
            node, _ = _compile(value, flat.skeleton[key], key)
            self.nodes.append(node)
        self.skeleton = flat.skeleton
        self.names = flat.names
        occurrences = self._occurrences(state)
        self.count = len(occurrences)
        self.metas = list(map(_META, occurrences))
        pointers = list(map(_data_ptr, occurrences))
        self.distinct = len(set(pointers))
        by_pointer: dict[int, list[int]] = {}
        for position, pointer in enumerate(pointers):
            by_pointer.setdefault(pointer, []).append(position)
        # Occurrences that share a pointer (tied weights, views, empty tensors): the only
        # place where aliasing can be decided differently, so the only one checked in full.
        self.groups = [(g, _aliasing(occurrences, g)) for g in by_pointer.values() if len(g) > 1]
        refs = _references(flat.skeleton)
        firsts: dict[int, int] = {}
        for position, (_, index) in enumerate(refs):
            firsts.setdefault(index, position)
        self.firsts = None if len(firsts) == self.count else [firsts[i] for i in range(len(firsts))]
        unique = occurrences if self.firsts is None else [occurrences[i] for i in self.firsts]
        self.detach = [i for i, tensor in enumerate(unique) if tensor.requires_grad]
        if not _agrees(occurrences, refs, flat.tensors):
            raise _Uncompilable  # the walk and the skeleton disagree: stay on the full path

    def _occurrences(self, state: Mapping[str, Any]) -> list[torch.Tensor]:
        tensors: list[torch.Tensor] = []
        for node, value in zip(self.nodes, state.values(), strict=True):
            node.replay(value, tensors)
        return tensors

    def replay(self, state: Mapping[str, Any]) -> FlatState | None:
        """The FlatState of ``state`` if it has this plan's structure, else None."""
        try:
            if tuple(state) != self.keys:
                return None
            tensors: list[torch.Tensor] = []
            values = state.values()
            outs = [node.replay(v, tensors) for node, v in zip(self.nodes, values, strict=True)]
            if not self._same_tensors(tensors):
                return None
        except Exception:  # _Miss, or anything odd: the full encoder decides (and reports)
            return None
        if all(map(is_, outs, self.skeleton.values())):
            skeleton = self.skeleton
        else:
            skeleton = self.skeleton = dict(zip(self.keys, outs, strict=True))
        if self.firsts is not None:
            tensors = [tensors[i] for i in self.firsts]
        for i in self.detach:
            tensors[i] = tensors[i].detach()
        return FlatState(tensors, self.names, skeleton, structure=self)

    def _same_tensors(self, tensors: list[torch.Tensor]) -> bool:
        if len(tensors) != self.count:
            return False
        pointers = list(map(_data_ptr, tensors))  # raises for tensors without storage
        if len(set(pointers)) != self.distinct:
            return False
        for group, aliasing in self.groups:
            first = pointers[group[0]]
            if any(pointers[i] != first for i in group) or _aliasing(tensors, group) != aliasing:
                return False
        return list(map(_META, tensors)) == self.metas


def _aliasing(tensors: list[torch.Tensor], group: list[int]) -> list[int]:
    """Which earlier member of ``group`` each member is stored as (the full encoder's rule:
    same pointer, dtype, shape and strides; empty tensors alias nothing)."""
    decided: list[int] = []
    seen: list[tuple[object, ...]] = []
    for position in group:
        tensor = tensors[position]
        key = (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
        if key[0] and key in seen:
            decided.append(seen.index(key))
        else:
            decided.append(len(seen))
            seen.append(key if key[0] else (object(),))
    return decided


def _references(skeleton: Any) -> list[tuple[str, int]]:
    """The tag and tensor index of every tensor reference, in the full encoder's order."""
    found: list[tuple[str, int]] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            tag = next(iter(node), None)
            if tag in (TENSOR_TAG, "$ndarray") and len(node) == 1:
                found.append((tag, node[tag]))
            elif tag != "$npscalar":
                for item in node.values():
                    walk(item)

    walk(skeleton)
    return found


def _agrees(
    occurrences: list[torch.Tensor], refs: list[tuple[str, int]], table: list[torch.Tensor]
) -> bool:
    """Whether the plan's walk found the tensors the full encoder found, in its order
    (arrays are copied anew by each walk, so only their kind of tensor can agree)."""
    if len(occurrences) != len(refs) or len(table) != len({i for _, i in refs}):
        return False
    for tensor, (tag, index) in zip(occurrences, refs, strict=True):
        stored = table[index]
        if (tensor.dtype, tensor.shape, tensor.device) != (
            stored.dtype,
            stored.shape,
            stored.device,
        ):
            return False
        if tag == TENSOR_TAG and tensor.data_ptr() != stored.data_ptr():
            return False
    return True


class FlattenCache:
    """The plan of the last state flattened, kept across checkpoints.

    A state whose structure keeps changing (so that plans never get replayed) is compiled
    less and less often, so the full encoder's cost is all it pays.
    """

    MAX_BACKOFF = 64

    def __init__(self) -> None:
        self.plan: StatePlan | None = None
        self.hits = 0
        self.misses = 0
        self._replayed_since_compile = False
        self._backoff = 0
        self._cooldown = 0

    def replay(self, state: Mapping[str, Any]) -> FlatState | None:
        if self.plan is None:
            return None
        flat = self.plan.replay(state)
        if flat is None:
            self.misses += 1
            self.plan = None
            return None
        self.hits += 1
        self._replayed_since_compile = True
        return flat

    def learn(self, state: Mapping[str, Any], flat: FlatState) -> FlatState:
        """Compile a plan from a full flattening; returns ``flat`` tagged with it."""
        if self._cooldown > 0:
            self._cooldown -= 1
            return flat
        if self._replayed_since_compile:
            self._backoff = 0
        elif self.hits or self.misses:
            self._backoff = min(max(1, 2 * self._backoff), self.MAX_BACKOFF)
        self._cooldown = self._backoff
        self._replayed_since_compile = False
        try:
            self.plan = StatePlan(state, flat)
        except Exception:  # _Uncompilable, or a state the walk cannot read twice
            self.plan = None
            self._cooldown = self._backoff = self.MAX_BACKOFF
            return flat
        return FlatState(flat.tensors, flat.names, flat.skeleton, structure=self.plan)
