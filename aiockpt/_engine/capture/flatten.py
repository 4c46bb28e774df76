"""Turn nested state_dicts into a tensor table plus a JSON skeleton (decoding: _format.skeleton).

A checkpoint must never need pickle to load, so every non-tensor value is encoded as plain
JSON. Values JSON cannot say exactly (tuples, dicts with non-string keys, NaN, bytes,
numpy arrays and scalars, torch dtypes, the standard containers) are written as small
tagged objects whose tag key starts with ``$`` (``TAG_VERSIONS`` is the one registry of
them). Every value comes back with its exact type, or capture refuses it with an
UnsupportedStateError naming its path: nothing is silently converted. Encoding builds new
containers, so it doubles as the deep copy of the non-tensor leaves that capture needs:
training may mutate its dicts right after ``checkpoint()`` returns.

Tensors are replaced by ``{"$tensor": i}``. Tensors that are the same view of the same
storage (tied weights, or one tensor reachable from two places) get one index, so they are
stored once and come back as one tensor.
"""

from __future__ import annotations

import base64
import enum
import math
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import torch

from ..._format.skeleton import intenum_class, namedtuple_class
from ..._format.tags import (
    DEFAULT_FACTORIES,
    DTENSOR_TAG,
    GRAD_TAG,
    NUMPY_SCALAR_KINDS,
    PARAMETER_TAG,
    SPARSE_LAYOUTS,
    SPARSE_TAG,
    TENSOR_TAG,
    dtype_name,
)
from ...distributed.sharding import ShardInfo, dtensor_type, local_shard, shard_info
from ...errors import UnsupportedStateError

__all__ = ["FlatState", "check_state_name", "encode_state"]

_PLAIN_LEAVES = frozenset({str, bool, int, type(None)})
# Dtypes with less than a byte per element: torch has no byte view of them to write.
_SUB_BYTE_DTYPES = frozenset(
    dtype
    for name in [f"uint{n}" for n in range(1, 8)] + [f"int{n}" for n in range(1, 8)]
    if isinstance(dtype := getattr(torch, name, None), torch.dtype)
)
_COMPLEX_DTYPES = frozenset({torch.complex32, torch.complex64, torch.complex128})
_STRIDED = torch.strided
_is_neg = torch.Tensor.is_neg
_IS_NESTED = attrgetter("is_nested")
_SPARSE_NAMES = {layout: name for name, layout in SPARSE_LAYOUTS.items()}


def check_state_name(name: object) -> None:
    """Refuse a top-level name that tensor names and ``keys=`` selection could not tell
    apart: tensors are named ``<name>/<path>``, and the first ``/`` ends the name."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("$"):
        raise UnsupportedStateError(
            f"cannot save state under the name {name!r}: a name must be a non-empty string "
            "without '/' that does not start with '$' (the first '/' of a tensor's name ends "
            "the name it was saved under); use e.g. 'ema_model' instead of 'ema/model'"
        )


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
    return (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride(), tensor.is_neg())


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


def _type_name(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _refuse(path: str, value: object, advice: str) -> UnsupportedStateError:
    return UnsupportedStateError(
        f"{path}: values of type {_type_name(value)} cannot be stored without pickle; {advice}"
    )


_CONVERT = (
    "convert it in state_dict() to tensors, numbers, strings, bytes, lists, tuples, dicts "
    "or another type docs/FORMAT.md section 4 lists"
)


def _check_tensor(tensor: torch.Tensor, path: str) -> None:
    if tensor.is_nested:
        raise UnsupportedStateError(
            f"{path}: nested tensors cannot be checkpointed; store their components "
            "(tensor.unbind()) or a padded tensor (tensor.to_padded_tensor(0)) in state_dict()"
        )
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
    if tensor.dtype in _SUB_BYTE_DTYPES:
        raise UnsupportedStateError(
            f"{path}: tensors of dtype {tensor.dtype} (less than a byte per element) cannot "
            "be stored; store them packed into a uint8 tensor in state_dict()"
        )


def _unusual(tensor: torch.Tensor) -> bool:
    """Whether a tensor needs more than a plain reference (checked once per new tensor)."""
    return (
        tensor.layout is not torch.strided
        or tensor.is_nested
        or tensor.is_quantized
        or tensor.is_meta
        or tensor.dtype in _SUB_BYTE_DTYPES
        or tensor.is_neg()
        or (tensor.dtype in _COMPLEX_DTYPES and tensor.is_conj())
    )


def _is_namedtuple(value: tuple[Any, ...]) -> bool:
    fields = getattr(type(value), "_fields", None)
    return (
        isinstance(fields, tuple)
        and len(fields) == len(value)
        and all(type(f) is str for f in fields)
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
        # The dtype of the last dense tensor that needed nothing more than a reference:
        # consecutive tensors mostly share one, which spares them the full check.
        self._plain_dtype: torch.dtype | None = None

    def finish(self) -> None:
        """The checks left for one C-level pass over the table, as what they find is rare:
        nested tensors are refused, and negative-bit views (``x.conj().imag``) are stored
        as their values (their bytes are not their values, and no byte view of them
        exists; the alias key keeps them apart from the tensor they view)."""
        tensors = self.tensors
        if any(map(_IS_NESTED, tensors)):
            index = next(i for i, t in enumerate(tensors) if t.is_nested)
            _check_tensor(tensors[index], self.names[index])
        if any(map(_is_neg, tensors)):
            self.tensors = [t.resolve_neg() if t.is_neg() else t for t in tensors]

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

    def tensor_value(self, tensor: torch.Tensor, path: str) -> dict[str, Any]:
        """A plain tensor: its reference, marked when it requires grad."""
        # Quantized, sub-byte and complex dtypes are never the remembered one, so only the
        # layout is left to check here; nested tensors and negative views (of any dtype)
        # are found in one pass over the table (finish); meta tensors have no data pointer.
        dtype = tensor.dtype
        if dtype is not self._plain_dtype or tensor.layout is not _STRIDED:
            if _unusual(tensor):
                return self._unusual_tensor(tensor, path)
            if dtype not in _COMPLEX_DTYPES:
                self._plain_dtype = dtype
        if tensor.requires_grad:
            return {GRAD_TAG: self._table_ref(tensor.detach(), path)}
        return self._table_ref(tensor, path)

    def _unusual_tensor(self, tensor: torch.Tensor, path: str) -> dict[str, Any]:
        if tensor.layout in _SPARSE_NAMES and not tensor.is_nested:
            return self.sparse_ref(tensor, path)
        _check_tensor(tensor, path)
        # A conjugate or negative view: its bytes are not its values, and no byte view of
        # it exists. Store the values (a copy taken now, as capture must anyway).
        ref = self._table_ref(tensor.detach().resolve_conj().resolve_neg(), path)
        return {GRAD_TAG: ref} if tensor.requires_grad else ref

    def sparse_ref(self, tensor: torch.Tensor, path: str) -> dict[str, Any]:
        """A sparse tensor: its dense component tensors, rebuilt exactly on load."""
        layout = _SPARSE_NAMES[tensor.layout]
        tensor = tensor.detach()
        encoded: dict[str, Any] = {SPARSE_TAG: layout, "shape": list(tensor.shape)}
        if layout == "coo":
            parts = {"indices": tensor._indices(), "values": tensor._values()}
            encoded["coalesced"] = tensor.is_coalesced()
        elif layout in ("csr", "bsr"):
            parts = {
                "compressed": tensor.crow_indices(),
                "plain": tensor.col_indices(),
                "values": tensor.values(),
            }
        else:
            parts = {
                "compressed": tensor.ccol_indices(),
                "plain": tensor.row_indices(),
                "values": tensor.values(),
            }
        encoded["data"] = {
            name: self.tensor_value(part, f"{path}/<{name}>") for name, part in parts.items()
        }
        return encoded

    def tensor_ref(self, tensor: torch.Tensor, path: str) -> dict[str, int]:
        """A dense tensor's reference (a conjugate or negative view is stored resolved)."""
        if _unusual(tensor):  # before data_ptr(): sparse and nested tensors have none
            _check_tensor(tensor, path)
            tensor = tensor.resolve_conj().resolve_neg()
        return self._table_ref(tensor.detach() if tensor.requires_grad else tensor, path)

    def _table_ref(self, tensor: torch.Tensor, path: str) -> dict[str, int]:
        pointer = tensor.data_ptr()
        if not pointer and tensor.is_meta:
            _check_tensor(tensor, path)
        seen = self._by_pointer.get(pointer) if pointer else None
        if seen is not None:
            if tensor.is_nested:  # (no shape to compare)
                _check_tensor(tensor, path)
            for index in seen:
                if _alias_key(self.tensors[index]) == _alias_key(tensor):
                    return {TENSOR_TAG: index}
        index = len(self.tensors)
        if pointer:  # empty tensors all point at 0 and alias nothing
            self._by_pointer.setdefault(pointer, []).append(index)
        self.tensors.append(tensor)
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
        if kind is torch.Tensor:
            return self.tensor_value(value, path)
        if kind in _PLAIN_LEAVES or (kind is float and math.isfinite(value)):
            return value
        if kind is dict and _plain_keys(value):
            return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
        if kind is list:
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        # Then by exact type too: a subclass of any of these (an IntEnum, a namedtuple, a
        # str subclass) is not the type the encoding below would bring back.
        encoder = _ENCODERS.get(kind)
        if encoder is not None:
            return encoder(self, value, path)
        return self._encode_other(value, path)

    def _encode_other(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            if self._dtensor is not None and isinstance(value, self._dtensor):
                return self.dtensor_ref(value, path)
            raise _refuse(
                path,
                value,
                "tensor subclasses are not stored (a wrapper subclass would lose the tensors "
                "it holds); store plain tensors in state_dict(), e.g. t.as_subclass("
                "torch.Tensor), or each tensor a wrapper holds",
            )
        if type(value).__module__.startswith("numpy"):
            return _encode_numpy(value, path, self)
        if isinstance(value, enum.IntEnum):
            return self._encode_intenum(value, path)
        if isinstance(value, tuple) and _is_namedtuple(value):
            return self._encode_namedtuple(value, path)
        if isinstance(value, enum.Enum):
            advice = "only IntEnum members are stored; store its .value (or .name) instead"
        elif isinstance(value, (str, int, float, bytes, tuple, list, dict, set, frozenset)):
            advice = "subclasses of built-in types are not stored; convert it to the built-in"
        else:
            advice = _CONVERT
        raise _refuse(path, value, advice)

    def _encode_intenum(self, value: enum.IntEnum, path: str) -> Any:
        kind = type(value)
        members = tuple((name, int(member)) for name, member in kind.__members__.items())
        try:  # the class a reader builds from these names (cached): refused now, not then
            intenum_class(kind.__name__, members)
        except (ValueError, TypeError) as exc:
            raise _refuse(path, value, f"a reader could not rebuild its class ({exc})") from None
        return {"$intenum": int(value), "name": kind.__name__, "members": list(map(list, members))}

    def _encode_namedtuple(self, value: tuple[Any, ...], path: str) -> Any:
        kind = type(value)
        fields = tuple(kind._fields)  # type: ignore[attr-defined]
        try:
            namedtuple_class(kind.__name__, fields)
        except (ValueError, TypeError) as exc:
            raise _refuse(path, value, f"a reader could not rebuild its type ({exc})") from None
        items = [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        return {"$namedtuple": items, "name": kind.__name__, "fields": list(fields)}

    def _encode_float(self, value: float, path: str) -> Any:
        return value if math.isfinite(value) else {"$float": repr(value)}

    def _encode_mapping(self, value: Mapping[Any, Any], path: str) -> Any:
        # Any "$" key goes the tagged way: a plain dict whose first key merely looks like a
        # tag (e.g. "$price") would otherwise be rejected as an unknown tag on load.
        if _plain_keys(value):
            return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
        return {
            "$dict": [
                [self.encode(k, f"{path}/<key>"), self.encode(v, f"{path}/{k}")]
                for k, v in value.items()
            ]
        }

    def _encode_ordered(self, value: OrderedDict[Any, Any], path: str) -> Any:
        encoded = self._encode_mapping(value, path)
        metadata = getattr(value, "_metadata", None)
        if metadata is None:
            return {"$ordereddict": encoded}
        if not isinstance(metadata, Mapping):
            raise UnsupportedStateError(
                f"{path}: an OrderedDict's _metadata is a {_type_name(metadata)}; "
                "nn.Module state_dicts keep a dict there, and only a dict can be stored"
            )
        # nn.Module.state_dict() carries per-module versions that load_state_dict reads.
        return {"$odict": encoded, "meta": self.encode(dict(metadata), f"{path}/<meta>")}

    def _encode_defaultdict(self, value: defaultdict[Any, Any], path: str) -> Any:
        factory = value.default_factory
        name = None if factory is None else getattr(factory, "__name__", None)
        if factory is not None and DEFAULT_FACTORIES.get(name) is not factory:  # type: ignore[arg-type]
            raise _refuse(
                path,
                value,
                f"its default_factory {factory!r} is not one of None, "
                f"{', '.join(DEFAULT_FACTORIES)}; convert it to a dict in state_dict() "
                "(and rebuild the defaultdict in load_state_dict())",
            )
        return {"$defaultdict": self._encode_mapping(value, path), "factory": name}

    def _encode_set(self, value: set[Any] | frozenset[Any], path: str) -> Any:
        tag = "$set" if type(value) is set else "$frozenset"
        return {tag: [self.encode(v, f"{path}/<item>") for v in value]}

    def _encode_complex(self, value: complex, path: str) -> Any:
        return {
            "$complex": [self._encode_float(value.real, path), self._encode_float(value.imag, path)]
        }


def _bytes_tag(tag: str) -> Callable[[_Flattener, Any, str], Any]:
    return lambda _, value, __: {tag: base64.b64encode(bytes(value)).decode("ascii")}


_ENCODERS: dict[type, Callable[[_Flattener, Any, str], Any]] = {
    float: _Flattener._encode_float,
    dict: _Flattener._encode_mapping,
    OrderedDict: _Flattener._encode_ordered,
    Counter: lambda f, v, p: {"$counter": f._encode_mapping(v, p)},
    defaultdict: _Flattener._encode_defaultdict,
    tuple: lambda f, v, p: {"$tuple": [f.encode(x, f"{p}/{i}") for i, x in enumerate(v)]},
    set: _Flattener._encode_set,
    frozenset: _Flattener._encode_set,
    complex: _Flattener._encode_complex,
    bytes: _bytes_tag("$bytes"),
    bytearray: _bytes_tag("$bytearray"),
    torch.Size: lambda _, v, __: {"$size": list(v)},
    torch.dtype: lambda _, v, __: {"$dtype": dtype_name(v)},
    torch.nn.Parameter: lambda f, v, p: {
        PARAMETER_TAG: f.tensor_ref(v, p),
        "requires_grad": v.requires_grad,
    },
}


def _encode_numpy(value: Any, path: str, flattener: _Flattener) -> Any:
    import numpy as np

    if type(value) is np.ndarray:
        tensor = ndarray_tensor(value, path)
        return {"$ndarray": flattener.tensor_ref(tensor, path)[TENSOR_TAG]}
    if isinstance(value, np.generic) and type(value) is value.dtype.type:
        dtype = value.dtype
        if NUMPY_SCALAR_KINDS.get(dtype.kind, 0) >= dtype.itemsize:
            if dtype.kind == "S":  # .item() would drop trailing NUL bytes
                raw = value.tobytes()
                item: Any = {"$bytes": base64.b64encode(raw).decode("ascii")}
            elif dtype.kind == "U":
                item = str.__str__(value)  # str() would drop trailing NULs too
            else:
                item = flattener.encode(value.item(), path)
            return {"$npscalar": dtype.str, "value": item}
    raise _refuse(
        path,
        value,
        "numpy values are stored as plain ndarrays of a dtype torch has, and scalars of "
        "bool, int, float (up to 64 bits), complex (up to 128), str or bytes; convert it in "
        "state_dict()",
    )


def ndarray_tensor(value: Any, path: str) -> torch.Tensor:
    """A tensor holding a copy of numpy array ``value`` (taken now: the array may change)."""
    import numpy as np

    if value.dtype == object:
        raise UnsupportedStateError(f"{path}: numpy arrays of dtype object need pickle")
    try:
        # np.array copies; np.ascontiguousarray would turn a 0-d array into shape (1,).
        return torch.from_numpy(np.array(value, order="C"))
    except (TypeError, ValueError):  # str/datetime/void/longdouble dtypes, non-native order
        raise UnsupportedStateError(
            f"{path}: numpy arrays of dtype {value.dtype} cannot be stored; "
            "convert it to a supported dtype in state_dict()"
        ) from None


def encode_state(state: Mapping[str, Any]) -> FlatState:
    """Flatten ``{name: state_dict}`` into tensors, names and a JSON skeleton, walking all
    of it (``capture.flatten_state`` replays a known structure instead when it can)."""
    flattener = _Flattener()
    skeleton = {key: flattener.encode(value, key) for key, value in state.items()}
    flattener.finish()
    return FlatState(flattener.tensors, flattener.names, skeleton, flattener.shards)
