"""Bitwise round trips: Checkpointer -> disk -> aiockpt.load / Checkpointer.restore."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Bag, MixedModel, assert_state_equal, clone_state, make_config, run

import aiockpt

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs, infs, subnormals included); valid 0/1 for bool."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).view(shape)


async def save(config: aiockpt.Config, step: int = 1, **objects: Any) -> Path:
    async with aiockpt.Checkpointer(config, **objects) as ckpt:
        handle = await ckpt.checkpoint(step)
        info = await handle
    assert info is not None and info.step == step
    return info.path


def save_and_load(config: aiockpt.Config, **objects: Any) -> dict[str, Any]:
    return aiockpt.load(run(save(config, **objects)))


def restore_into(config: aiockpt.Config, **objects: Any) -> int | None:
    async def go() -> int | None:
        async with aiockpt.Checkpointer(config, **objects) as ckpt:
            return await ckpt.restore()

    return run(go())


def manifest_of(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("use_monitor", [True, False])
def test_every_dtype_round_trips_bitwise(tmp_path: Path, use_monitor: bool) -> None:
    state = {
        str(d).removeprefix("torch."): random_tensor(d, (5, 7), i) for i, d in enumerate(DTYPES)
    }
    expected = clone_state(state)
    config = make_config(tmp_path, use_monitor=use_monitor)
    loaded = save_and_load(config, bag=Bag(state))
    assert_state_equal(loaded, {"bag": expected})

    fresh = Bag()
    assert restore_into(config, bag=fresh) == 1
    assert_state_equal(fresh.state, expected)


# Newer or rarer dtypes, where this torch has them.
EXTRA_DTYPES = [
    getattr(torch, name)
    for name in (
        "uint16",
        "uint32",
        "uint64",
        "complex128",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    )
    if hasattr(torch, name)
]


def test_rarer_dtypes_round_trip_bitwise(tmp_path: Path) -> None:
    state = {str(d): random_tensor(d, (3, 4), i) for i, d in enumerate(EXTRA_DTYPES)}
    expected = clone_state(state)
    assert_state_equal(save_and_load(make_config(tmp_path), bag=Bag(state)), {"bag": expected})


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"count": 3, "huge": 2**100, "name": "no tensors at all"},
        {"a": torch.empty(0), "b": torch.empty(0, 2, dtype=torch.int8)},
    ],
    ids=["empty", "no-tensors", "only-empty-tensors"],
)
def test_states_without_tensor_bytes(tmp_path: Path, state: dict[str, Any]) -> None:
    expected = clone_state(state)
    config = make_config(tmp_path, use_monitor=False)
    assert_state_equal(save_and_load(config, bag=Bag(state)), {"bag": expected})
    fresh = Bag()
    assert restore_into(config, bag=fresh) == 1
    assert_state_equal(fresh.state, expected)


def test_layouts_round_trip(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).view(6, 10)
    state = {
        "transposed": base.t(),
        "stepped": base[::2, 1::3],
        "expanded": torch.arange(3, dtype=torch.int16).expand(4, 3),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "empty_int": torch.empty(2, 0, dtype=torch.int64),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    }
    assert not state["transposed"].is_contiguous()
    expected = clone_state(state)
    loaded = save_and_load(make_config(tmp_path), bag=Bag(state))
    assert_state_equal(loaded, {"bag": expected})
    for name, tensor in loaded["bag"].items():
        assert torch.equal(tensor, expected[name]), name


def test_tensor_larger_than_a_chunk_is_split_across_files(tmp_path: Path) -> None:
    config = make_config(tmp_path, chunk_size_mb=0.01)
    assert config.chunk_bytes(10**6) == 12288
    big = random_tensor(torch.float32, (100, 100), seed=3)  # 40000 bytes: 4 chunks
    state = {
        "small": torch.arange(10),
        "big": big,
        "big_transposed": random_tensor(torch.float64, (90, 70), seed=4).t(),
        "big_fp8_transposed": random_tensor(torch.float8_e4m3fn, (150, 100), seed=5).t(),
        "after": torch.ones(3, dtype=torch.int8),
    }
    expected = clone_state(state)
    path = run(save(config, bag=Bag(state)))
    assert_state_equal(aiockpt.load(path), {"bag": expected})

    manifest = manifest_of(path)
    data_files = sorted(p.name for p in path.glob("data-*.bin"))
    assert data_files == sorted(f["name"] for f in manifest["files"])
    # Chunks are filled to the end: every file but the last holds exactly a chunk.
    sizes = [(path / f).stat().st_size for f in data_files]
    assert sizes[:-1] == [12288] * (len(sizes) - 1) and 0 < sizes[-1] <= 12288
    records = {t["name"]: t for t in manifest["tensors"]}
    big_files = [p["file"] for p in records["bag/big"]["pieces"]]
    assert len(big_files) == 4 and len(set(big_files)) == 4
    assert sum(p["length"] for p in records["bag/big"]["pieces"]) == 40000


def test_many_tiny_tensors(tmp_path: Path) -> None:
    dtypes = [torch.float32, torch.int64, torch.bfloat16, torch.bool, torch.uint8]
    state = {
        f"t{i}": random_tensor(dtypes[i % len(dtypes)], (i % 3 + 1,), seed=i) for i in range(1500)
    }
    expected = clone_state(state)
    config = make_config(tmp_path, chunk_size_mb=0.01)
    path = run(save(config, bag=Bag(state)))
    assert len(list(path.glob("data-*.bin"))) > 1
    assert len(manifest_of(path)["tensors"]) == 1500
    assert_state_equal(aiockpt.load(path), {"bag": expected})


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Embedding(10, 4)
        self.decoder = torch.nn.Linear(4, 10)
        self.decoder.weight = self.encoder.weight


def test_tied_weights_are_stored_once_and_load_as_one_tensor(tmp_path: Path) -> None:
    model = Tied()
    expected = clone_state(model.state_dict())
    path = run(save(make_config(tmp_path), model=model))

    names = [t["name"] for t in manifest_of(path)["tensors"]]
    assert names == ["model/encoder.weight", "model/decoder.bias"]

    state = aiockpt.load(path)["model"]
    assert_state_equal(state, expected)
    assert state["encoder.weight"] is state["decoder.weight"]

    fresh = Tied()
    restore_into(make_config(tmp_path), model=fresh)
    assert fresh.decoder.weight is fresh.encoder.weight
    assert torch.equal(fresh.encoder.weight, expected["encoder.weight"])
    assert torch.equal(fresh.decoder.bias, expected["decoder.bias"])


def exotic_state() -> dict[str, Any]:
    module = MixedModel()
    return {
        "tuple": (1, "a", (2.5, None), ()),
        "int_keys": {1: "one", -2: [3, 4], 10**18: {}},
        "mixed_keys": {None: 0, True: "t", 2.5: "f", (1, "x"): "tuple key", "s": "str"},
        "dollar_keys": {"$tensor": "not a tensor", "x": 1},
        "dollar_first": {"$price": 3, "y": 2},
        "none": None,
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "big": 2**62,
        "neg": -(2**40),
        "text": "ünïcødé ✓",
        "bytes": b"\x00\xff\x10",
        "empty": {"list": [], "dict": {}, "str": ""},
        "dtypes": [torch.bfloat16, torch.float8_e5m2, torch.int64],
        "ndarray": np.arange(12, dtype=np.int16).reshape(3, 4),
        "nd_strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],
        "nd_scalar": np.array(2.5),
        "nd_bool": np.array([True, False]),
        "np_f32": np.float32(1.5),
        "np_f64": np.float64(0.1),
        "np_i64": np.int64(-7),
        "np_u8": np.uint8(200),
        "np_bool": np.bool_(True),
        "np_nan": np.float16("nan"),
        "np_str": np.str_("hi"),
        "tensors_in_list": [torch.arange(3), {"deep": (torch.ones(2, 2),)}],
        "module": module.state_dict(),
    }


def test_non_tensor_leaves_come_back_with_their_types(tmp_path: Path) -> None:
    state = exotic_state()
    assert hasattr(state["module"], "_metadata")
    expected = clone_state(state)
    loaded = save_and_load(make_config(tmp_path), exotic=Bag(state))
    assert_state_equal(loaded, {"exotic": expected})

    # The module state still loads into a module (load_state_dict reads _metadata).
    model = MixedModel(seed=1)
    model.load_state_dict(loaded["exotic"]["module"])
    assert_state_equal(model.state_dict(), expected["module"])


def test_exotic_state_restores_through_checkpointer(tmp_path: Path) -> None:
    config = make_config(tmp_path, use_monitor=False)
    expected = clone_state(exotic_state())
    run(save(config, exotic=Bag(exotic_state())))
    fresh = Bag()
    assert restore_into(config, exotic=fresh) == 1
    assert_state_equal(fresh.state, expected)


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (range(2), "range"),
        (Opaque(), "Opaque"),
        (np.array(["a", "b"]), "<U1"),
        (np.arange(3, dtype=">i4"), ">i4"),
        (np.longdouble(1.5), "longdouble"),
    ],
)
def test_unsupported_value_raises_naming_its_path(
    tmp_path: Path, value: object, type_name: str
) -> None:
    bag = Bag({"fine": torch.zeros(2), "nested": {"inner": [1, value]}})

    async def go() -> None:
        async with aiockpt.Checkpointer(make_config(tmp_path), custom=bag) as ckpt:
            with pytest.raises(aiockpt.UnsupportedStateError) as info:
                await ckpt.checkpoint(1)
            message = str(info.value)
            assert "custom/nested/inner/1" in message
            assert type_name in message
            # Nothing was admitted: the checkpointer still works once the value is fixed.
            bag.state["nested"]["inner"][1] = "fixed"
            assert await (await ckpt.checkpoint(2)) is not None

    run(go())
    assert [i.step for i in aiockpt.list_checkpoints(tmp_path / "ckpt")] == [2]


def test_ordered_dict_metadata_and_key_order_survive(tmp_path: Path) -> None:
    state: OrderedDict[str, Any] = OrderedDict([("z", 1), ("a", torch.ones(1)), ("m", 2)])
    state._metadata = OrderedDict([("", {"version": 3})])  # type: ignore[attr-defined]
    loaded = save_and_load(make_config(tmp_path), bag=Bag({"od": state}))
    od = loaded["bag"]["od"]
    assert type(od) is OrderedDict and list(od) == ["z", "a", "m"]
    assert od._metadata == {"": {"version": 3}}
