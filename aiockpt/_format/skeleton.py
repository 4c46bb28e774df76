"""From a skeleton and a tensor table back to the nested state that was saved.

Decoding is the reverse of capture's encoding (``_engine/capture/flatten.py``) and never runs
code a checkpoint names: every type it builds is one the tag registry (``tags``) allows,
and a namedtuple or IntEnum class is rebuilt from its recorded names with the standard
library alone. The manifest's validator has checked every payload's shape first.
"""

from __future__ import annotations

import base64
import collections
import enum
import functools
import keyword
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import WorldSizeError
from .tags import (
    DEFAULT_FACTORIES,
    DTENSOR_TAG,
    GRAD_TAG,
    NUMPY_SCALAR_KINDS,
    PARAMETER_TAG,
    RANKS_TAG,
    SPARSE_LAYOUTS,
    SPARSE_TAG,
    TAGS,
    TENSOR_TAG,
    dtype_from_name,
)

__all__ = [
    "SavedShards",
    "adopt_live_types",
    "intenum_class",
    "namedtuple_class",
    "tensor_paths",
    "unflatten_state",
]

# Marks a namedtuple or IntEnum class built on load from the names a checkpoint recorded.
_REBUILT = "__aiockpt_rebuilt__"


def _safe_name(name: object) -> bool:
    """A name a namedtuple or enum class rebuilt on load may carry: an identifier that is
    not a keyword and not private (so never a dunder that would configure the class)."""
    return (
        isinstance(name, str)
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and not name.startswith("_")
    )


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
    if len(node) >= 1 and next(iter(node)) in TAGS:
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
                "restore it with as many ranks as saved it, or leave it out (restore(only=...), "
                "or a Trainer's resume(only=...))"
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
        result: OrderedDict[Any, Any] = OrderedDict(_mapping(payload, how))
        result._metadata = _decode(node.get("meta"), how)  # type: ignore[attr-defined]
        return result
    if tag == "$ndarray":
        tensor = tensor_at(payload)
        return tensor.cpu().numpy() if isinstance(tensor, torch.Tensor) else tensor
    if tag == "$npscalar":
        return _numpy_scalar(payload, _decode(node["value"], how))
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise ValueError(f"unknown tag {tag!r}")
    return decoder(payload, node, how)


def _mapping(payload: Any, how: _Decoding) -> dict[Any, Any]:
    decoded = _decode(payload, how)
    if not isinstance(decoded, dict):
        raise TypeError(f"a mapping was expected, not {type(decoded).__name__}")
    return decoded


def _numpy_scalar(dtype_text: Any, value: Any) -> Any:
    import numpy as np

    dtype = np.dtype(str(dtype_text))
    if NUMPY_SCALAR_KINDS.get(dtype.kind, 0) < dtype.itemsize:
        raise ValueError(f"numpy scalars of dtype {dtype_text!r} are not stored")
    return dtype.type(value)


def _float_part(value: Any) -> float:
    if isinstance(value, dict) and next(iter(value), None) == "$float":
        return float(value["$float"])
    if type(value) not in (int, float):
        raise TypeError(f"a complex number's parts are numbers, not {type(value).__name__}")
    return float(value)


def _needs_grad(tensor: Any, requires_grad: Any) -> Any:
    if not isinstance(tensor, torch.Tensor):
        return tensor  # not read (a partial read)
    if requires_grad is not True and requires_grad is not False:
        raise TypeError("requires_grad must be true or false")
    if requires_grad and not (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"a tensor of dtype {tensor.dtype} cannot require grad")
    # A new tensor object on the same storage: another reference to the stored tensor
    # keeps its own requires_grad.
    return tensor.detach().requires_grad_(requires_grad)


def _parameter(payload: Any, node: dict[str, Any], how: _Decoding) -> Any:
    tensor = _decode(payload, how)
    tensor = _needs_grad(tensor, node.get("requires_grad"))
    if not isinstance(tensor, torch.Tensor):
        return tensor
    return torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad)


def _sparse(payload: Any, node: dict[str, Any], how: _Decoding) -> Any:
    layout = SPARSE_LAYOUTS[payload]
    parts = {name: _decode(ref, how) for name, ref in node["data"].items()}
    if not all(isinstance(t, torch.Tensor) for t in parts.values()):
        return _not_read(parts)
    size = [int(d) for d in node["shape"]]
    # check_invariants: indices a hostile file puts out of range fail here, not later.
    try:
        if layout is torch.sparse_coo:
            coalesced = node["coalesced"]
            if coalesced is not True and coalesced is not False:
                raise TypeError("coalesced must be true or false")
            return torch.sparse_coo_tensor(
                parts["indices"],
                parts["values"],
                size,
                check_invariants=True,
                is_coalesced=coalesced,
            )
        return torch.sparse_compressed_tensor(
            parts["compressed"],
            parts["plain"],
            parts["values"],
            size,
            layout=layout,
            check_invariants=True,
        )
    except RuntimeError as exc:
        raise ValueError(f"a sparse tensor's components do not fit together ({exc})") from exc


def _not_read(parts: dict[str, Any]) -> Any:
    return next(t for t in parts.values() if not isinstance(t, torch.Tensor))


@functools.lru_cache(maxsize=256)
def namedtuple_class(name: str, fields: tuple[str, ...]) -> type:
    if not _safe_name(name):
        raise ValueError(f"{name!r} is not a namedtuple type name this reader builds")
    # rename=True gives positional names (_0, _1...) the same as when they were saved.
    kind = collections.namedtuple(name, fields, rename=True)  # type: ignore[misc]
    if kind._fields != fields:
        raise ValueError(f"{list(fields)} are not the field names of a namedtuple")
    setattr(kind, _REBUILT, True)
    return kind


@functools.lru_cache(maxsize=256)
def intenum_class(name: str, members: tuple[tuple[str, int], ...]) -> type[enum.IntEnum]:
    if not _safe_name(name) or not all(_safe_name(m) and type(v) is int for m, v in members):
        raise ValueError(
            f"{name!r} with members {list(members)} is not an IntEnum this reader builds"
        )
    kind = enum.IntEnum(name, list(members))  # type: ignore[misc]
    setattr(kind, _REBUILT, True)
    return kind


def _namedtuple(payload: Any, node: dict[str, Any], how: _Decoding) -> Any:
    kind = namedtuple_class(node["name"], tuple(node["fields"]))
    return kind(*(_decode(v, how) for v in payload))


def _intenum(payload: Any, node: dict[str, Any], how: _Decoding) -> Any:
    members = tuple((str(name), value) for name, value in node["members"])
    return intenum_class(node["name"], members)(payload)


def _defaultdict(payload: Any, node: dict[str, Any], how: _Decoding) -> Any:
    factory = node["factory"]
    if factory is not None and factory not in DEFAULT_FACTORIES:
        raise ValueError(f"default_factory {factory!r} is not one this reader builds")
    return defaultdict(
        None if factory is None else DEFAULT_FACTORIES[factory], _mapping(payload, how)
    )


def _size(payload: Any, node: dict[str, Any], how: _Decoding) -> Any:
    if not isinstance(payload, list) or not all(type(d) is int for d in payload):
        raise TypeError("a torch.Size is a list of integers")
    return torch.Size(payload)


_DECODERS: dict[str, Callable[[Any, dict[str, Any], _Decoding], Any]] = {
    "$ordereddict": lambda p, _, how: OrderedDict(_mapping(p, how)),
    "$counter": lambda p, _, how: Counter(_mapping(p, how)),
    "$defaultdict": _defaultdict,
    "$namedtuple": _namedtuple,
    "$intenum": _intenum,
    "$set": lambda p, _, how: {_decode(v, how) for v in p},
    "$frozenset": lambda p, _, how: frozenset(_decode(v, how) for v in p),
    "$complex": lambda p, _, __: complex(_float_part(p[0]), _float_part(p[1])),
    "$bytearray": lambda p, _, __: bytearray(base64.b64decode(p, validate=True)),
    "$size": _size,
    GRAD_TAG: lambda p, _, how: _needs_grad(_decode(p, how), True),
    PARAMETER_TAG: _parameter,
    SPARSE_TAG: _sparse,
}


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


def adopt_live_types(saved: Any, live_state: Callable[[], Any]) -> Any:
    """``saved`` with each namedtuple and IntEnum rebuilt on load replaced by the live
    object's own class where ``live_state()`` holds one of the same name and fields (or
    members) at the same place. ``live_state`` is called only when there is one to replace.

    A checkpoint never names a class to import: on load, a namedtuple or IntEnum comes back
    as a class built from the names it recorded; restoring into a live object gives it back
    the class that object uses.
    """
    if not _holds_rebuilt(saved):
        return saved
    return _adopt(saved, live_state())


def _holds_rebuilt(node: Any) -> bool:
    if getattr(type(node), _REBUILT, False):
        return True
    if isinstance(node, dict):
        return any(map(_holds_rebuilt, node)) or any(map(_holds_rebuilt, node.values()))
    if isinstance(node, (list, tuple, set, frozenset)):
        return any(map(_holds_rebuilt, node))
    return False


def _live_match(saved: Any, live: Any) -> Any:
    """The live class an instance of a rebuilt class should take, or None."""
    kind, live_kind = type(saved), type(live)
    if kind.__name__ != live_kind.__name__:
        return None
    if isinstance(saved, enum.IntEnum):
        same = isinstance(live, enum.IntEnum) and [
            (n, int(m)) for n, m in live_kind.__members__.items()
        ] == [(n, int(m)) for n, m in kind.__members__.items()]
    else:
        same = isinstance(live, tuple) and getattr(live_kind, "_fields", None) == kind._fields
    return live_kind if same else None


def _adopt(saved: Any, live: Any) -> Any:
    kind = type(saved)
    if getattr(kind, _REBUILT, False):
        target = _live_match(saved, live)
        if isinstance(saved, enum.IntEnum):
            return saved if target is None else target(int(saved))
        items = (
            [_adopt(s, lv) for s, lv in zip(saved, live, strict=False)]
            if isinstance(live, tuple)
            else list(saved)
        )
        items += list(saved)[len(items) :]
        return (target or kind)(*items)
    if isinstance(saved, dict):
        live_map = live if isinstance(live, Mapping) else {}
        live_keys = {k: k for k in live_map}
        items = list(saved.items())
        saved.clear()  # refilled in place: keeps the dict's type and attributes
        for key, value in items:
            if getattr(type(key), _REBUILT, False) and key in live_keys:
                key = _adopt(key, live_keys[key])
            saved[key] = _adopt(value, live_map[key]) if key in live_map else value
        return saved
    if (kind is list or kind is tuple) and isinstance(live, (list, tuple)):
        adopted = [_adopt(s, lv) for s, lv in zip(saved, live, strict=False)]
        adopted += list(saved)[len(adopted) :]
        return adopted if kind is list else tuple(adopted)
    if (kind is set or kind is frozenset) and isinstance(live, (set, frozenset)):
        live_items = {v: v for v in live}
        return kind(_adopt(v, live_items[v]) if v in live_items else v for v in saved)
    return saved


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
            elif tag == "$dict":
                for k, v in node[tag]:
                    walk(v, f"{path}/{k}")
            elif tag == RANKS_TAG:
                for rank_state in node[tag]:
                    walk(rank_state, path)
            elif tag == DTENSOR_TAG:
                for shard in node[tag]["shards"]:
                    walk(shard["data"], path)
            elif tag == SPARSE_TAG:
                for name, ref in node["data"].items():
                    walk(ref, f"{path}/<{name}>")
            elif tag in TAGS:
                # Other tags hold their values in the payload (and "meta" holds none).
                walk(node[tag], path)
            else:
                for k, v in node.items():
                    walk(v, f"{path}/{k}" if path else k)

    walk(skeleton, prefix)
    return found
