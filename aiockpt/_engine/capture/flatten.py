"""Turn nested state_dicts into a tensor table plus a JSON skeleton, and back.

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
import collections
import enum
import functools
import keyword
import math
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import torch

from ...distributed.sharding import ShardInfo, dtensor_type, local_shard, shard_info
from ...errors import UnsupportedStateError, WorldSizeError

if TYPE_CHECKING:
    from .replay import FlattenCache

__all__ = [
    "TAGS",
    "TAG_VERSIONS",
    "FlatState",
    "adopt_live_types",
    "check_state_name",
    "dtype_from_name",
    "dtype_name",
    "flatten_state",
    "format_version_for",
    "unflatten_state",
]

TENSOR_TAG = "$tensor"
# A DTensor: its global shape and the shards saved of it ({"offset": [...], "data": ref}).
DTENSOR_TAG = "$dtensor"
# State that differs by rank: one skeleton per rank of the run that saved it.
RANKS_TAG = "$ranks"
# A plain tensor that requires grad; a Parameter (with its requires_grad); a sparse tensor
# (its dense component tensors and its layout).
GRAD_TAG = "$grad"
PARAMETER_TAG = "$parameter"
SPARSE_TAG = "$sparse"

# Every tag a skeleton may use, with the format_version that introduced it (docs/FORMAT.md
# sections 4 and 9). A writer writes the lowest version covering the tags it used, so a
# checkpoint without the newer tags stays readable by older readers.
TAG_VERSIONS: dict[str, int] = {
    TENSOR_TAG: 1,
    "$ndarray": 1,
    "$tuple": 1,
    "$dict": 1,
    "$odict": 1,
    "$float": 1,
    "$bytes": 1,
    "$dtype": 1,
    "$npscalar": 1,
    RANKS_TAG: 2,
    DTENSOR_TAG: 2,
    "$ordereddict": 3,
    "$counter": 3,
    "$defaultdict": 3,
    "$namedtuple": 3,
    "$intenum": 3,
    "$set": 3,
    "$frozenset": 3,
    "$complex": 3,
    "$bytearray": 3,
    "$size": 3,
    GRAD_TAG: 3,
    PARAMETER_TAG: 3,
    SPARSE_TAG: 3,
}
TAGS = frozenset(TAG_VERSIONS)
# The compact JSON of a tag used as a key: no other key of a skeleton starts with "$" (a
# dict with such a key goes through "$dict"), so finding this text finds the tag.
_TAG_KEYS_BY_VERSION = sorted(
    ((version, f'"{tag}":'.encode()) for tag, version in TAG_VERSIONS.items() if version > 2),
    reverse=True,
)

# The default_factory values a defaultdict may name: builtins that take no argument.
DEFAULT_FACTORIES: dict[str, Callable[[], Any]] = {
    f.__name__: f
    for f in (int, float, complex, str, bytes, bool, list, dict, set, frozenset, tuple)
}
# Sparse layouts, by the name a skeleton gives them, and the component tensors of each.
SPARSE_LAYOUTS: dict[str, torch.layout] = {
    "coo": torch.sparse_coo,
    "csr": torch.sparse_csr,
    "csc": torch.sparse_csc,
    "bsr": torch.sparse_bsr,
    "bsc": torch.sparse_bsc,
}
_SPARSE_NAMES = {layout: name for name, layout in SPARSE_LAYOUTS.items()}
# numpy scalar kinds stored exactly: bool, ints, floats and complex of at most 64-bit parts,
# str and bytes. (longdouble, datetime64, void and object scalars are refused.)
NUMPY_SCALAR_KINDS = {"b": 1, "i": 8, "u": 8, "f": 8, "c": 16, "U": 2**31, "S": 2**31}

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
# Marks a namedtuple or IntEnum class built on load from the names a checkpoint recorded.
_REBUILT = "__aiockpt_rebuilt__"

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


def format_version_for(document: bytes, least: int) -> int:
    """The lowest format_version (at least ``least``) whose tags cover the compact JSON
    ``document`` of a manifest."""
    for version, key in _TAG_KEYS_BY_VERSION:
        if version <= least:
            break
        if key in document:
            return version
    return least


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


def _safe_name(name: object) -> bool:
    """A name a namedtuple or enum class rebuilt on load may carry: an identifier that is
    not a keyword and not private (so never a dunder that would configure the class)."""
    return (
        isinstance(name, str)
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and not name.startswith("_")
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
            _intenum_class(kind.__name__, members)
        except (ValueError, TypeError) as exc:
            raise _refuse(path, value, f"a reader could not rebuild its class ({exc})") from None
        return {"$intenum": int(value), "name": kind.__name__, "members": list(map(list, members))}

    def _encode_namedtuple(self, value: tuple[Any, ...], path: str) -> Any:
        kind = type(value)
        fields = tuple(kind._fields)  # type: ignore[attr-defined]
        try:
            _namedtuple_class(kind.__name__, fields)
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
    flattener.finish()
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
def _namedtuple_class(name: str, fields: tuple[str, ...]) -> type:
    if not _safe_name(name):
        raise ValueError(f"{name!r} is not a namedtuple type name this reader builds")
    # rename=True gives positional names (_0, _1...) the same as when they were saved.
    kind = collections.namedtuple(name, fields, rename=True)  # type: ignore[misc]
    if kind._fields != fields:
        raise ValueError(f"{list(fields)} are not the field names of a namedtuple")
    setattr(kind, _REBUILT, True)
    return kind


@functools.lru_cache(maxsize=256)
def _intenum_class(name: str, members: tuple[tuple[str, int], ...]) -> type[enum.IntEnum]:
    if not _safe_name(name) or not all(_safe_name(m) and type(v) is int for m, v in members):
        raise ValueError(
            f"{name!r} with members {list(members)} is not an IntEnum this reader builds"
        )
    kind = enum.IntEnum(name, list(members))  # type: ignore[misc]
    setattr(kind, _REBUILT, True)
    return kind


def _namedtuple(payload: Any, node: dict[str, Any], how: _Decoding) -> Any:
    kind = _namedtuple_class(node["name"], tuple(node["fields"]))
    return kind(*(_decode(v, how) for v in payload))


def _intenum(payload: Any, node: dict[str, Any], how: _Decoding) -> Any:
    members = tuple((str(name), value) for name, value in node["members"])
    return _intenum_class(node["name"], members)(payload)


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
