"""Turn nested state_dicts into a tensor table plus a JSON skeleton, and back.

A checkpoint must never need pickle to load, so every non-tensor value is encoded as plain
JSON. Values JSON cannot say exactly (tuples, dicts with non-string keys, NaN, bytes,
numpy arrays and scalars, torch dtypes) are written as small tagged objects whose single
tag key starts with ``$``. Encoding builds new containers, so it doubles as the deep copy
of the non-tensor leaves that capture needs: training may mutate its dicts right after
``checkpoint()`` returns.

Tensors are replaced by ``{"$tensor": i}``. Tensors that are the same view of the same
storage (tied weights, or one tensor reachable from two places) get one index, so they are
stored once and come back as one tensor.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...distributed.sharding import ShardInfo, dtensor_type, local_shard, shard_info
from ...errors import UnsupportedStateError, WorldSizeError

if TYPE_CHECKING:
    from .replay import FlattenCache

__all__ = ["FlatState", "flatten_state", "unflatten_state", "dtype_from_name", "dtype_name"]

TENSOR_TAG = "$tensor"
# A DTensor: its global shape and the shards saved of it ({"offset": [...], "data": ref}).
DTENSOR_TAG = "$dtensor"
# State that differs by rank: one skeleton per rank of the run that saved it.
RANKS_TAG = "$ranks"
_PLAIN_LEAVES = frozenset({str, bool, int, type(None)})
_TAGS = frozenset(
    {
        TENSOR_TAG,
        DTENSOR_TAG,
        RANKS_TAG,
        "$tuple",
        "$dict",
        "$float",
        "$bytes",
        "$dtype",
        "$ndarray",
        "$npscalar",
        "$odict",
    }
)

_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in vars(torch).values()
    if isinstance(dtype, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype called ``name``, or None when this torch has no such dtype."""
    return _DTYPES.get(name)


@dataclass(frozen=True)
class FlatState:
    """What capture works on: unique tensors in traversal order, their names, the skeleton."""

    tensors: list[torch.Tensor]
    names: list[str]
    # Read-only once built: a later FlatState of the same structure shares its containers.
    skeleton: dict[str, Any]
    # DTensor local shards among ``tensors``, by index.
    shards: dict[int, ShardInfo] = field(default_factory=dict)
    # An object that is the same (``is``) for every FlatState whose tensors have the same
    # dtypes, shapes and devices in the same order (a layout check can stop there), or None.
    structure: object | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def _alias_key(tensor: torch.Tensor) -> tuple[object, ...]:
    # data_ptr() already includes the storage offset: two tensors with the same pointer,
    # shape, strides and dtype are the same view (CUDA's unified addressing keeps host and
    # device pointers apart).
    return (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())


def _plain_keys(mapping: Mapping[Any, Any]) -> bool:
    """Whether a dict's keys are all strings without the tag prefix (memoized by key set:
    state_dicts repeat the same keys at every checkpoint)."""
    keys = tuple(mapping)
    known = _PLAIN_KEYS_SEEN.get(keys)
    if known is None:
        known = all(type(k) is str and not k.startswith("$") for k in keys)
        if len(_PLAIN_KEYS_SEEN) > 4096:
            _PLAIN_KEYS_SEEN.clear()
        _PLAIN_KEYS_SEEN[keys] = known
    return known


_PLAIN_KEYS_SEEN: dict[tuple[Any, ...], bool] = {}


def _check_tensor(tensor: torch.Tensor, path: str) -> None:
    if tensor.layout != torch.strided:
        raise UnsupportedStateError(
            f"{path}: tensors with layout {tensor.layout} are not supported; "
            "convert it to a dense tensor (tensor.to_dense()) in state_dict()"
        )
    if tensor.is_quantized or tensor.device.type == "meta":
        raise UnsupportedStateError(
            f"{path}: quantized and meta tensors cannot be checkpointed; "
            "store a dense or materialized tensor instead"
        )


class _Flattener:
    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.names: list[str] = []
        # Tensors by data pointer: the full alias key is compared only on a pointer hit,
        # which keeps the common case (no aliasing) to one int lookup per tensor.
        self._by_pointer: dict[int, list[int]] = {}
        self._used_names: set[str] = set()
        self.shards: dict[int, ShardInfo] = {}
        self._dtensor = dtensor_type()

    def dtensor_ref(self, tensor: torch.Tensor, path: str) -> dict[str, Any]:
        """A DTensor: its local shard goes to the tensor table, with its global place."""
        try:
            info = shard_info(tensor)
        except ValueError as exc:
            raise UnsupportedStateError(f"{path}: {exc}") from None
        ref = self.tensor_ref(local_shard(tensor), path)
        self.shards[ref[TENSOR_TAG]] = info
        shard = {"offset": list(info.offset), "data": ref}
        return {DTENSOR_TAG: {"shape": list(info.global_shape), "shards": [shard]}}

    def tensor_ref(self, tensor: torch.Tensor, path: str) -> dict[str, int]:
        pointer = tensor.data_ptr()
        seen = self._by_pointer.get(pointer) if pointer else None
        if seen is not None:
            for index in seen:
                if _alias_key(self.tensors[index]) == _alias_key(tensor):
                    return {TENSOR_TAG: index}
        if tensor.layout is not torch.strided or tensor.is_quantized or tensor.is_meta:
            _check_tensor(tensor, path)
        index = len(self.tensors)
        if pointer:  # empty tensors all point at 0 and alias nothing
            self._by_pointer.setdefault(pointer, []).append(index)
        self.tensors.append(tensor.detach() if tensor.requires_grad else tensor)
        name = path
        while name in self._used_names:  # keys like "a/b" vs nested a -> b collide
            name += "#"
        self._used_names.add(name)
        self.names.append(name)
        return {TENSOR_TAG: index}

    def encode(self, value: Any, path: str) -> Any:
        # Fast path by exact type: capture walks every leaf of every state_dict on the
        # training thread, and these cover nearly all of them.
        kind = type(value)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            return self.tensor_ref(value, path)
        if kind in _PLAIN_LEAVES or (kind is float and math.isfinite(value)):
            return value
        if kind is dict and _plain_keys(value):
            return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
        if kind is list:
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, torch.Tensor):
            if self._dtensor is not None and isinstance(value, self._dtensor):
                return self.dtensor_ref(value, path)
            return self.tensor_ref(value, path)
        # Before the float/str checks: np.float64 and np.str_ subclass them, and would
        # otherwise come back as plain Python values.
        encoded = _encode_numpy(value, path, self)
        if encoded is not None:
            return encoded
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)  # IntEnum and friends become plain ints
        if isinstance(value, float):
            if math.isfinite(value):
                return float(value)
            return {"$float": repr(float(value))}
        if isinstance(value, Mapping):
            return self._encode_mapping(value, path)
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, (bytes, bytearray)):
            return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, torch.dtype):
            return {"$dtype": dtype_name(value)}
        raise UnsupportedStateError(
            f"{path}: values of type {type(value).__module__}.{type(value).__qualname__} "
            "cannot be stored without pickle; return tensors, numbers, strings, lists, "
            "tuples or dicts from state_dict() (convert this value there)"
        )

    def _encode_mapping(self, value: Mapping[Any, Any], path: str) -> Any:
        # Any "$" key goes the tagged way: a plain dict whose first key merely looks like a
        # tag (e.g. "$price") would otherwise be rejected as an unknown tag on load.
        plain = _plain_keys(value)
        if plain:
            encoded: Any = {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
        else:
            encoded = {
                "$dict": [
                    [self.encode(k, f"{path}/<key>"), self.encode(v, f"{path}/{k}")]
                    for k, v in value.items()
                ]
            }
        metadata = getattr(value, "_metadata", None)
        if isinstance(value, OrderedDict) and isinstance(metadata, Mapping):
            # nn.Module.state_dict() carries per-module versions that load_state_dict reads.
            return {"$odict": encoded, "meta": self.encode(dict(metadata), f"{path}/<meta>")}
        return encoded


def _encode_numpy(value: Any, path: str, flattener: _Flattener) -> Any | None:
    module = type(value).__module__
    if not module.startswith("numpy"):
        return None
    import numpy as np

    if isinstance(value, np.ndarray):
        tensor = ndarray_tensor(value, path)
        return {"$ndarray": flattener.tensor_ref(tensor, path)[TENSOR_TAG]}
    if isinstance(value, np.generic):
        return {"$npscalar": value.dtype.str, "value": flattener.encode(value.item(), path)}
    return None


def ndarray_tensor(value: Any, path: str) -> torch.Tensor:
    """A tensor holding a copy of numpy array ``value`` (taken now: the array may change)."""
    import numpy as np

    if value.dtype == object:
        raise UnsupportedStateError(f"{path}: numpy arrays of dtype object need pickle")
    try:
        # np.array copies; np.ascontiguousarray would turn a 0-d array into shape (1,).
        return torch.from_numpy(np.array(value, order="C"))
    except (TypeError, ValueError):  # str/datetime dtypes, non-native byte order
        raise UnsupportedStateError(
            f"{path}: numpy arrays of dtype {value.dtype} cannot be stored; "
            "convert it to a supported dtype in state_dict()"
        ) from None


def flatten_state(state: Mapping[str, Any], plans: FlattenCache | None = None) -> FlatState:
    """Flatten ``{name: state_dict}`` into tensors, names and a JSON skeleton.

    With ``plans``, a state of the same structure as the last one is flattened by replaying
    that structure (see flatplan), which gives the same result in a fraction of the time.
    """
    if plans is not None:
        replayed = plans.replay(state)
        if replayed is not None:
            return replayed
    flattener = _Flattener()
    skeleton = {key: flattener.encode(value, key) for key, value in state.items()}
    flat = FlatState(flattener.tensors, flattener.names, skeleton, flattener.shards)
    return flat if plans is None else plans.learn(state, flat)


TensorSource = Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class SavedShards:
    """A saved DTensor: its global shape and the (offset, tensor) of each shard on disk."""

    shape: tuple[int, ...]
    shards: list[tuple[tuple[int, ...], Any]]

    def check(self) -> SavedShards:
        """Raise ValueError unless every shard read lies inside the tensor."""
        for offset, tensor in self.shards:
            if not isinstance(tensor, torch.Tensor):
                continue  # not read (a partial read)
            ends = zip(offset, tensor.shape, self.shape, strict=False)
            fits = len(offset) == len(self.shape) == tensor.dim() and all(
                o >= 0 and o + n <= d for o, n, d in ends
            )
            if not fits:
                raise ValueError(
                    f"a shard of shape {list(tensor.shape)} at {list(offset)} lies outside "
                    f"its tensor of shape {list(self.shape)}"
                )
        return self

    def assemble(self) -> Any:
        """The whole tensor (a tensor not read in a partial read stays unread)."""
        tensors = [t for _, t in self.shards]
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            return tensors[0] if tensors else torch.empty(self.shape)
        whole = torch.empty(self.shape, dtype=tensors[0].dtype, device=tensors[0].device)
        covered = 0
        for offset, tensor in self.shards:
            box = tuple(slice(o, o + n) for o, n in zip(offset, tensor.shape, strict=True))
            whole[box].copy_(tensor)
            covered += tensor.numel()
        if covered != whole.numel():
            raise ValueError(
                f"the shards of a tensor of shape {list(self.shape)} cover {covered} of its "
                f"{whole.numel()} elements"
            )
        return whole


@dataclass(frozen=True)
class _Decoding:
    tensor_at: TensorSource
    rank: int
    dtensor: Callable[[SavedShards], Any]


def unflatten_state(
    skeleton: Any,
    tensor_at: TensorSource,
    *,
    rank: int = 0,
    dtensor: Callable[[SavedShards], Any] = SavedShards.assemble,
) -> Any:
    """Rebuild the nested state from a skeleton; ``tensor_at(i)`` gives tensor ``i``.

    State saved per rank comes back as ``rank`` had it; a DTensor as ``dtensor(saved)``
    gives it (by default the whole tensor, assembled from its shards).
    """
    return _decode(skeleton, _Decoding(tensor_at, rank, dtensor))


def _decode(node: Any, how: _Decoding) -> Any:
    if isinstance(node, list):
        return [_decode(v, how) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) >= 1 and next(iter(node)) in _TAGS:
        return _decode_tagged(node, how)
    return {k: _decode(v, how) for k, v in node.items()}


def _decode_tagged(node: dict[str, Any], how: _Decoding) -> Any:
    tag = next(iter(node))
    payload = node[tag]
    tensor_at = how.tensor_at
    if tag == TENSOR_TAG:
        return tensor_at(payload)
    if tag == RANKS_TAG:
        if not 0 <= how.rank < len(payload):
            raise WorldSizeError(
                f"state saved per rank by {len(payload)} ranks has none for rank {how.rank}; "
                "restore it with as many ranks as saved it, or leave it out (restore(only=...))"
            )
        return _decode(payload[how.rank], how)
    if tag == DTENSOR_TAG:
        shards = [
            (tuple(int(o) for o in s["offset"]), _decode(s["data"], how)) for s in payload["shards"]
        ]
        saved = SavedShards(tuple(int(d) for d in payload["shape"]), shards)
        return how.dtensor(saved.check())
    if tag == "$tuple":
        return tuple(_decode(v, how) for v in payload)
    if tag == "$dict":
        return {_hashable(_decode(k, how)): _decode(v, how) for k, v in payload}
    if tag == "$float":
        return float(payload)
    if tag == "$bytes":
        return base64.b64decode(payload, validate=True)
    if tag == "$dtype":
        dtype = dtype_from_name(payload)
        if dtype is None:
            raise ValueError(f"unknown dtype {payload!r}")
        return dtype
    if tag == "$odict":
        items = _decode(payload, how)
        result: OrderedDict[Any, Any] = OrderedDict(items)
        result._metadata = _decode(node.get("meta"), how)  # type: ignore[attr-defined]
        return result
    if tag == "$ndarray":
        return tensor_at(payload).numpy()
    if tag == "$npscalar":
        import numpy as np

        return np.dtype(payload).type(_decode(node["value"], how))
    raise ValueError(f"unknown tag {tag!r}")


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


def tensor_paths(skeleton: Any, prefix: str = "") -> dict[int, list[str]]:
    """Every path at which each tensor index appears (for partial restore and tools)."""
    found: dict[int, list[str]] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")
        elif isinstance(node, dict):
            tag = next(iter(node), None)
            if tag in (TENSOR_TAG, "$ndarray"):
                found.setdefault(node[tag], []).append(path)
            elif tag == "$tuple":
                walk(node[tag], path)
            elif tag == "$dict":
                for k, v in node[tag]:
                    walk(v, f"{path}/{k}")
            elif tag == "$odict":
                walk(node[tag], path)
            elif tag == RANKS_TAG:
                for rank_state in node[tag]:
                    walk(rank_state, path)
            elif tag == DTENSOR_TAG:
                for shard in node[tag]["shards"]:
                    walk(shard["data"], path)
            elif tag not in _TAGS:
                for k, v in node.items():
                    walk(v, f"{path}/{k}" if path else k)

    walk(skeleton, prefix)
    return found
