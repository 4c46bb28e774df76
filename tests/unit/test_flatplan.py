"""The replayed flattening gives exactly what the full encoder gives, or steps aside.

Every case flattens a sequence of states with one FlattenCache (the way checkpoints do)
and compares each result with a fresh full encoding of the same state: the skeleton as
JSON text (so key order, 1 vs 1.0 vs True and -0.0 count), the names, and the tensor
table (the very same tensors, or for numpy arrays equal copies).
"""

from __future__ import annotations

import enum
import json
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import MixedModel

import aiockpt
from aiockpt._engine.capture.flatten import FlatState, flatten_state
from aiockpt._engine.capture.replay import FlattenCache

Mutation = Callable[[dict[str, Any]], None]


class Color(enum.IntEnum):
    RED = 1


def canonical(skeleton: Any) -> str:
    return json.dumps(skeleton, allow_nan=False, separators=(",", ":"))


def array_indices(node: Any) -> set[int]:
    if isinstance(node, list):
        return set().union(*(array_indices(v) for v in node)) if node else set()
    if isinstance(node, dict):
        if next(iter(node), None) == "$ndarray" and len(node) == 1:
            return {node["$ndarray"]}
        return set().union(*(array_indices(v) for v in node.values())) if node else set()
    return set()


def assert_same(fast: FlatState, full: FlatState) -> None:
    assert canonical(fast.skeleton) == canonical(full.skeleton)
    assert fast.names == full.names
    assert len(fast.tensors) == len(full.tensors)
    arrays = array_indices(full.skeleton)
    for index, (a, b) in enumerate(zip(fast.tensors, full.tensors, strict=True)):
        assert (a.dtype, a.shape, a.stride(), a.device) == (b.dtype, b.shape, b.stride(), b.device)
        assert a.requires_grad is b.requires_grad is False
        if index in arrays:  # copied from the array at each call
            assert torch.equal(a, b)
        else:
            assert a.data_ptr() == b.data_ptr()


def flatten_all(states: list[dict[str, Any]]) -> FlattenCache:
    cache = FlattenCache()
    for state in states:
        assert_same(flatten_state(state, cache), flatten_state(state))
    return cache


def training_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = MixedModel(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3)
    rng = aiockpt.RNGState()
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": rng}

    def state() -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in objects.items()}

    return {"objects": objects, "state": state}


def test_a_training_state_is_replayed_and_matches_at_every_step() -> None:
    run = training_state()
    model, optimizer = run["objects"]["model"], run["objects"]["optimizer"]
    scheduler = run["objects"]["scheduler"]
    states = []
    for _ in range(5):
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        scheduler.step()  # the learning rate and counters change: leaves, not structure
        random.random()
        np.random.rand()
        states.append(run["state"]())
    cache = flatten_all(states)
    assert cache.hits == 4 and cache.misses == 0


def base_state() -> dict[str, Any]:
    """A fresh state of every kind of node, as a state_dict() would build it."""
    torch.manual_seed(0)
    shared = torch.arange(12.0)
    square = torch.arange(16.0).view(4, 4)
    module = OrderedDict([("w", torch.ones(2, 3)), ("b", torch.zeros(3))])
    module._metadata = OrderedDict([("", {"version": 1}), ("sub", {"version": 2})])  # type: ignore[attr-defined]
    return {
        "model": module,
        "opt": {
            "state": {
                0: {"step": torch.tensor(3.0), "m": torch.ones(4)},
                1: {"step": torch.tensor(3.0), "m": torch.zeros(4)},
            },
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "fused": None}],
        },
        "tied": {"a": shared, "b": shared, "row": shared.view(3, 4)},
        "empty": [torch.empty(0), torch.empty(0), torch.empty(0, 3)],
        "param": torch.nn.Parameter(torch.ones(2)),
        "tensors": [torch.arange(3), {"deep": (torch.ones(2, 2),)}],
        "numbers": [1, 2.5, -0.0, True, None, "s"],
        "history": [0.5, 0.25, 0.125],
        "zeros": [0.0, 1.0],
        "rows": {"a": {"x": 0.0, "y": 1}, "b": {"x": 2.0, "y": 3}},
        "square": {"a": square, "b": square},
        "tuple": (1, "a", (2.5, None), ()),
        "int_keys": {1: "one", -2: [3, 4]},
        "float_keys": {0.0: torch.ones(1), 2.5: "f"},
        "mixed_keys": {None: 0, True: "t", (1, "x"): "tuple key"},
        "dollar": {"$tensor": "not a tensor", "x": 1},
        "odd": [float("nan"), float("inf"), b"\x00\xff", torch.bfloat16, Color.RED],
        "numpy": {"array": np.arange(6, dtype=np.int16).reshape(2, 3), "scalar": np.float32(1.5)},
        "rng": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
    }


def _set(path: str, value: Any) -> Mutation:
    def mutate(state: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = state
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[_key(node, part)]
        if isinstance(node, list):
            node[int(last)] = value() if callable(value) else value
        else:
            node[_key(node, last)] = value() if callable(value) else value

    return mutate


def _key(node: dict[Any, Any], part: str) -> Any:
    return int(part) if part not in node and part.lstrip("-").isdigit() else part


def _call(fn: Callable[[dict[str, Any]], Any]) -> Mutation:
    def mutate(state: dict[str, Any]) -> None:
        fn(state)

    return mutate


def _untie(state: dict[str, Any]) -> None:
    state["tied"]["b"] = state["tied"]["a"].clone()


def _tie(state: dict[str, Any]) -> None:
    state["model"]["b"] = state["opt"]["state"][0]["m"][:3]


def _same_view_new_shape(state: dict[str, Any]) -> None:
    state["tied"]["b"] = state["tied"]["a"].view(2, 6)  # same pointer, another view


def _transposed(state: dict[str, Any]) -> None:
    state["square"]["b"] = state["square"]["a"].t()  # same pointer, dtype and shape


def _renamed_key(state: dict[str, Any]) -> None:
    tied = state["tied"]
    state["tied"] = {"a": tied["a"], "c": tied["b"], "row": tied["row"]}


def _renamed_row_key(state: dict[str, Any]) -> None:
    row = state["opt"]["state"][1]
    state["opt"]["state"][1] = {"step": row["step"], "n": row["m"]}


def _alias_empty(state: dict[str, Any]) -> None:
    shared = torch.ones(0)
    state["empty"][0] = state["empty"][1] = shared


def _plain_dict_to_odict(state: dict[str, Any]) -> None:
    state["int_keys"] = OrderedDict(state["int_keys"])


def _drop_metadata(state: dict[str, Any]) -> None:
    del state["model"]._metadata


def _metadata_version(state: dict[str, Any]) -> None:
    state["model"]._metadata["sub"] = {"version": 3}


def _metadata_float(state: dict[str, Any]) -> None:
    state["model"]._metadata["sub"] = {"version": 2.0}


def _reorder(state: dict[str, Any]) -> None:
    module = state["model"]
    module.move_to_end("w")


def _new_key(state: dict[str, Any]) -> None:
    state["opt"]["state"][2] = {"step": torch.tensor(1.0), "m": torch.ones(4)}


def _removed_key(state: dict[str, Any]) -> None:
    del state["opt"]["state"][1]


def _row_key(state: dict[str, Any]) -> None:
    state["opt"]["state"][1]["v"] = torch.ones(4)


def _bool_key(state: dict[str, Any]) -> None:
    state["int_keys"] = {True: "one", -2: [3, 4]}


def _negative_zero_key(state: dict[str, Any]) -> None:
    state["float_keys"] = {-0.0: state["float_keys"][0.0], 2.5: "f"}


def _requires_grad(state: dict[str, Any]) -> None:
    state["model"]["w"] = torch.ones(2, 3, requires_grad=True)


def _plain_grad(state: dict[str, Any]) -> None:
    state["param"] = torch.nn.Parameter(torch.ones(2), requires_grad=False)


def _tensor_list_grows(state: dict[str, Any]) -> None:
    state["tensors"].append(torch.zeros(1))


def _history_grows(state: dict[str, Any]) -> None:
    state["history"].extend([0.0625, 1e300, -0.0])


def _history_nan(state: dict[str, Any]) -> None:
    state["history"].append(float("nan"))


def _leaf_becomes_dict(state: dict[str, Any]) -> None:
    state["numbers"][0] = {"now": ["a", "dict"]}


def _array_dtype(state: dict[str, Any]) -> None:
    state["numpy"]["array"] = state["numpy"]["array"].astype(np.float64)


def _array_subclass(state: dict[str, Any]) -> None:
    state["numpy"]["array"] = np.ma.masked_array([1, 2])


def _tensor_in_free_subtree(state: dict[str, Any]) -> None:
    state["numbers"][5] = torch.ones(1)


MUTATIONS: dict[str, Mutation] = {
    "leaf value (lr)": _set("opt/param_groups/0/lr", 0.05),
    "int becomes float": _set("numbers/0", 1.0),
    "int becomes bool": _set("numbers/0", True),
    "zero becomes negative zero": _set("zeros/0", -0.0),
    "zero in a row becomes negative zero": _set("rows/a/x", -0.0),
    "int in a row becomes bool": _set("rows/a/y", True),
    "float becomes nan": _set("opt/param_groups/0/lr", float("nan")),
    "tuple becomes list": _set("opt/param_groups/0/betas", [0.9, 0.999]),
    "str leaf becomes int": _set("numbers/5", 5),
    "new tensor object, same shape": _set("model/w", lambda: torch.full((2, 3), 7.0)),
    "dtype changes": _set("model/b", lambda: torch.zeros(3, dtype=torch.float64)),
    "shape changes": _set("model/w", lambda: torch.ones(3, 2)),
    "tensor becomes a number": _set("model/b", 0.5),
    "number becomes a tensor": _set("opt/param_groups/0/lr", lambda: torch.tensor(0.1)),
    "parameter becomes tensor": _set("param", lambda: torch.ones(2)),
    "aliasing disappears": _call(_untie),
    "aliasing appears": _call(_tie),
    "same pointer, another view": _call(_same_view_new_shape),
    "same pointer and shape, other strides": _call(_transposed),
    "key renamed": _call(_renamed_key),
    "row key renamed": _call(_renamed_row_key),
    "empty tensors shared": _call(_alias_empty),
    "dict becomes OrderedDict": _call(_plain_dict_to_odict),
    "metadata dropped": _call(_drop_metadata),
    "metadata value changes": _call(_metadata_version),
    "metadata int becomes float": _call(_metadata_float),
    "key order changes": _call(_reorder),
    "new key": _call(_new_key),
    "removed key": _call(_removed_key),
    "row gains a key": _call(_row_key),
    "int key becomes bool key": _call(_bool_key),
    "zero key becomes negative zero": _call(_negative_zero_key),
    "tensor requires grad": _call(_requires_grad),
    "parameter stops requiring grad": _call(_plain_grad),
    "tensor list grows": _call(_tensor_list_grows),
    "number list grows": _call(_history_grows),
    "number list gets nan": _call(_history_nan),
    "leaf becomes a dict": _call(_leaf_becomes_dict),
    "array dtype changes": _call(_array_dtype),
    "array subclass": _call(_array_subclass),
    "tensor appears among leaves": _call(_tensor_in_free_subtree),
}


def mutated(mutation: Mutation) -> dict[str, Any]:
    state = base_state()
    mutation(state)
    return state


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_change_between_calls_is_never_missed(name: str) -> None:
    mutation = MUTATIONS[name]
    # Same structure twice (replayed), the change twice, then back to the original.
    cache = flatten_all(
        [base_state(), base_state(), mutated(mutation), mutated(mutation), base_state()]
    )
    assert cache.hits >= 1  # the unchanged structure is replayed, not re-encoded


def test_the_skeleton_is_a_copy_taken_at_call_time() -> None:
    cache = FlattenCache()
    state = base_state()
    flatten_state(state, cache)
    flat = flatten_state(state, cache)
    assert cache.hits == 1
    before = canonical(flat.skeleton)
    state["opt"]["param_groups"][0]["lr"] = 99.0
    state["opt"]["param_groups"][0]["params"].append(7)
    state["history"].append(1.0)
    state["model"]._metadata[""]["version"] = 9
    assert canonical(flat.skeleton) == before


def test_unchanged_parts_are_shared_and_changed_parts_are_new() -> None:
    cache = FlattenCache()
    first = flatten_state(base_state(), cache)
    state = base_state()
    state["opt"]["param_groups"][0]["lr"] = 0.5
    second = flatten_state(state, cache)
    assert cache.hits == 1
    # Containers with the same content are reused (nothing new to allocate and collect)...
    assert second.skeleton["model"] is first.skeleton["model"]
    assert second.skeleton["opt"]["state"] is first.skeleton["opt"]["state"]
    # ...and what changed is built anew, leaving the earlier snapshot as it was.
    assert second.skeleton["opt"]["param_groups"][0]["lr"] == 0.5
    assert first.skeleton["opt"]["param_groups"][0]["lr"] == 0.1
    assert second.structure is first.structure is not None


def test_a_state_that_always_changes_is_compiled_less_and_less() -> None:
    cache = FlattenCache()
    compiled = 0
    for i in range(40):
        state = {"grows": {str(k): torch.zeros(1) for k in range(i + 1)}}
        plan_before = cache.plan
        flat = flatten_state(state, cache)
        assert_same(flat, flatten_state(state))
        compiled += cache.plan is not None and cache.plan is not plan_before
    assert cache.hits == 0
    assert compiled < 15


def test_unsupported_values_are_reported_by_the_full_encoder() -> None:
    cache = FlattenCache()
    flatten_state(base_state(), cache)
    state = base_state()
    state["numbers"][1] = {1, 2}
    with pytest.raises(aiockpt.UnsupportedStateError, match="numbers/1"):
        flatten_state(state, cache)
    state = base_state()
    assert_same(flatten_state(state, cache), flatten_state(state))


def test_tensor_subclasses_stay_on_the_full_path() -> None:
    class Marked(torch.Tensor):
        pass

    cache = FlattenCache()
    for _ in range(3):
        state = {"x": {"t": torch.ones(2).as_subclass(Marked), "u": torch.zeros(1)}}
        assert_same(flatten_state(state, cache), flatten_state(state))
    assert cache.hits == 0


# -- random structures and random changes ----------------------------------------------


def random_value(rng: random.Random, depth: int, pool: list[torch.Tensor]) -> Any:
    choice = rng.randrange(11 if depth < 3 else 6)
    if choice == 0:
        if pool and rng.random() < 0.3:
            return rng.choice(pool)  # aliasing
        shape = rng.choice([(), (0,), (3,), (2, 2)])
        dtype = rng.choice([torch.float32, torch.int64, torch.bfloat16])
        tensor = torch.zeros(shape, dtype=dtype)
        pool.append(tensor)
        return tensor
    if choice == 1:
        return rng.choice([0, 1, -3, 2**40, True, False])
    if choice == 2:
        return rng.choice([0.0, -0.0, 1.5, 1e-8, float("inf"), float("nan")])
    if choice == 3:
        return rng.choice(["", "a", "$x", None])
    if choice == 4:
        return rng.choice([np.float32(2.0), np.arange(3), b"xy", torch.float16])
    if choice == 5:
        return [rng.randrange(5) for _ in range(rng.randrange(4))]
    if choice in (6, 7):
        keys = rng.sample(["a", "b", "c", "$d", 0, 1, True, None], rng.randrange(1, 4))
        if all(type(k) is str and not k.startswith("$") for k in keys) and rng.random() < 0.3:
            value: dict[Any, Any] = OrderedDict()
            value._metadata = {"": {"version": rng.randrange(2)}}  # type: ignore[attr-defined]
        else:
            value = {}
        for key in keys:
            value[key] = random_value(rng, depth + 1, pool)
        return value
    if choice == 8:
        return tuple(random_value(rng, depth + 1, pool) for _ in range(rng.randrange(3)))
    if choice == 9:  # a row table: dicts of one key set
        return {i: {"s": torch.zeros(1), "m": torch.ones(2)} for i in range(rng.randrange(1, 4))}
    return [random_value(rng, depth + 1, pool) for _ in range(rng.randrange(1, 4))]


def random_state(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    pool: list[torch.Tensor] = []
    return {f"obj{i}": random_value(rng, 0, pool) for i in range(rng.randrange(1, 4))}


def change_somewhere(state: Any, rng: random.Random) -> Any:
    """A copy of ``state`` with one node replaced by a new random value."""
    if isinstance(state, dict) and state and rng.random() < 0.7:
        key = rng.choice(list(state))
        copy = type(state)(state)
        if hasattr(state, "_metadata"):
            copy._metadata = state._metadata
        copy[key] = change_somewhere(state[key], rng)
        return copy
    if isinstance(state, list) and state and rng.random() < 0.7:
        index = rng.randrange(len(state))
        return [change_somewhere(v, rng) if i == index else v for i, v in enumerate(state)]
    return random_value(rng, 2, [])


@pytest.mark.parametrize("seed", range(60))
def test_random_states_and_changes(seed: int) -> None:
    rng = random.Random(1000 + seed)
    states = [random_state(seed), random_state(seed)]
    changed = {k: change_somewhere(v, rng) for k, v in random_state(seed).items()}
    states += [changed, random_state(seed), changed]
    flatten_all(states)
