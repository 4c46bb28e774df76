"""Shared helpers for the CPU test suite: small models, configs, bitwise comparisons."""

from __future__ import annotations

import asyncio
import math
import os
from collections import OrderedDict
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

import aiockpt

T = TypeVar("T")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_aiockpt_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own AIOCKPT_* settings must not leak into these tests.
    for var in list(os.environ):
        if var.upper().startswith("AIOCKPT_"):
            monkeypatch.delenv(var)


def make_config(tmp_path: Path, **kw: Any) -> aiockpt.Config:
    """A config writing under ``tmp_path/ckpt``; keyword arguments override."""
    kw.setdefault("directory", tmp_path / "ckpt")
    kw.setdefault("num_threads", 4)
    return aiockpt.Config(**kw)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class MixedModel(torch.nn.Module):
    """Parameters and buffers of several dtypes, a BatchNorm (int64 counter), dropout."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(8, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.drop = torch.nn.Dropout(0.25)
        self.fc2 = torch.nn.Linear(16, 4)
        self.scale16 = torch.nn.Parameter(torch.randn(3, 5).half())
        self.register_buffer("buf16", torch.randn(7).bfloat16())
        self.register_buffer("counts", torch.arange(6, dtype=torch.int32).view(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


class Bag:
    """A plain Stateful holding whatever state it is given; load_state_dict keeps it."""

    def __init__(self, state: Any = None) -> None:
        self.state = {} if state is None else state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def clone_state(value: Any) -> Any:
    """Deep copy of a nested state with every tensor cloned (a reference snapshot)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, OrderedDict):
        copy = OrderedDict((k, clone_state(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            copy._metadata = clone_state(value._metadata)  # type: ignore[attr-defined]
        return copy
    if isinstance(value, dict):
        return {k: clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_state(v) for v in value)
    return value


def assert_state_equal(actual: Any, expected: Any, path: str = "") -> None:
    """Same structure, same types, tensors bitwise equal (NaN payloads included)."""
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual)} is not a tensor"
        assert actual.dtype == expected.dtype, f"{where}: {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: {actual.shape} != {expected.shape}"
        assert torch.equal(tensor_bytes(actual), tensor_bytes(expected)), f"{where}: bytes differ"
        return
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert actual.tobytes() == expected.tobytes(), f"{where}: array bytes differ"
    elif isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype, where
        assert actual.tobytes() == expected.tobytes(), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_state_equal(actual[key], expected[key], f"{path}/{key}")
        if isinstance(expected, OrderedDict) and hasattr(expected, "_metadata"):
            # Only the contents matter to load_state_dict, not the mapping type.
            meta = getattr(actual, "_metadata", None)
            assert isinstance(meta, dict), f"{where}: _metadata lost"
            assert_state_equal(dict(meta), dict(expected._metadata), f"{path}/<meta>")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_state_equal(a, e, f"{path}/{i}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), f"{where}: {actual!r} is not NaN"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
