"""The one registry of what a skeleton may say: its tags, and the dtypes tensors may have.

docs/FORMAT.md sections 4 and 9 in code. The encoder (capture), the decoder and the
manifest's validator all take their tags from here, so the three can never disagree on
what a checkpoint may hold or which format_version covers it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "DEFAULT_FACTORIES",
    "DTENSOR_TAG",
    "GRAD_TAG",
    "NUMPY_SCALAR_KINDS",
    "PARAMETER_TAG",
    "RANKS_TAG",
    "SPARSE_LAYOUTS",
    "SPARSE_TAG",
    "TAGS",
    "TAG_VERSIONS",
    "TENSOR_TAG",
    "dtype_from_name",
    "dtype_name",
    "format_version_for",
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
# numpy scalar kinds stored exactly: bool, ints, floats and complex of at most 64-bit parts,
# str and bytes. (longdouble, datetime64, void and object scalars are refused.)
NUMPY_SCALAR_KINDS = {"b": 1, "i": 8, "u": 8, "f": 8, "c": 16, "U": 2**31, "S": 2**31}


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
