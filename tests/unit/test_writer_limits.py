"""The writer refuses whatever a reader would refuse: nothing committed is unreadable.

Every reader limit (each MAX_* of aiockpt._format.manifest, enumerated from the module so a new
one cannot be forgotten) gets a state just within it, which must round-trip, and one just
past it, which checkpoint() must refuse (at capture, or at the latest before commit)
while the previous checkpoint stays the newest. With the writer's checks switched off,
the same state is written, and a reader refuses it: the case really reaches the limit.
Limits too large to reach in a test are lowered for reader and writer alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Bag, assert_state_equal, clone_state, make_config

import aiockpt
from aiockpt._engine import saver as saver_module
from aiockpt._engine.capture.limits import StateLimits
from aiockpt._format import manifest
from aiockpt._format.manifest import Manifest

LIMITS = sorted(name for name in vars(manifest) if name.startswith("MAX_"))
BASELINE = {"w": torch.arange(4.0), "lr": 0.5}


@dataclass
class Case:
    """One reader limit: a state at it, a state past it, where the writer stops."""

    at: Callable[[], Any]
    over: Callable[[], Any]
    refused_at: str  # "capture": checkpoint() raises; "commit": the handle's wait() does
    problem: str  # what the writer's message says
    reader_problem: str  # what a reader says of the checkpoint written past the limit
    lowered: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def _nested(levels: int) -> Any:
    node: Any = "bottom"
    for _ in range(levels):
        node = [node]
    return node


def _floats(count: int) -> torch.Tensor:
    return torch.arange(float(count))


# The bag's values sit at depth 2 of the skeleton ({"bag": {"n": ...}}): n lists nest the
# innermost one at depth n + 1.
DEPTH = manifest.MAX_SKELETON_DEPTH

CASES: dict[str, Case] = {
    "MAX_MANIFEST_BYTES": Case(
        at=lambda: {"text": "x" * 40_000},
        over=lambda: {"text": "x" * 70_000},
        refused_at="commit",
        problem=r"manifest is \d+ bytes, over the 65536 limit",
        reader_problem=r"over the 65536 limit",
        lowered={"MAX_MANIFEST_BYTES": 65536},
    ),
    "MAX_CONTAINERS_BASE": Case(
        at=lambda: {"empty": [{} for _ in range(1100)]},
        over=lambda: {"empty": [{} for _ in range(1600)]},
        refused_at="commit",
        problem=r"JSON objects and arrays in \d+ bytes, over the limit",
        reader_problem=r"JSON objects and arrays in \d+ bytes, over the limit",
        lowered={"MAX_CONTAINERS_BASE": 1000},
    ),
    "MAX_CONTAINERS_PER_MIB": Case(
        at=lambda: {"empty": [{} for _ in range(20)], "pad": "x" * 1000},
        over=lambda: {"empty": [{} for _ in range(200)], "pad": "x" * 1000},
        refused_at="commit",
        problem=r"JSON objects and arrays in \d+ bytes, over the limit",
        reader_problem=r"JSON objects and arrays in \d+ bytes, over the limit",
        lowered={"MAX_CONTAINERS_BASE": 0},
    ),
    "MAX_TENSORS": Case(
        at=lambda: {"t": [torch.full((2,), float(i)) for i in range(4)]},
        over=lambda: {"t": [torch.full((2,), float(i)) for i in range(5)]},
        refused_at="capture",
        problem=r"holds 5 tensors, over the 4",
        reader_problem=r"tensors has 5 entries, over the limit of 4",
        lowered={"MAX_TENSORS": 4},
    ),
    "MAX_FILES": Case(
        at=lambda: {"t": [_floats(1024) for _ in range(2)]},
        over=lambda: {"t": [_floats(1024) for _ in range(3)]},
        refused_at="capture",
        problem=r"3 data files, over the 2",
        reader_problem=r"files has 3 entries, over the limit of 2",
        lowered={"MAX_FILES": 2},
        config={"chunk_size_mb": 4096 / 2**20},
    ),
    "MAX_NDIM": Case(
        at=lambda: {"t": torch.ones([1] * manifest.MAX_NDIM)},
        over=lambda: {"t": torch.ones([1] * (manifest.MAX_NDIM + 1))},
        refused_at="capture",
        problem=rf"bag/t: a tensor of {manifest.MAX_NDIM + 1} dimensions",
        reader_problem=rf"shape has {manifest.MAX_NDIM + 1} entries, over the limit",
    ),
    "MAX_TENSOR_BYTES": Case(
        at=lambda: {"t": _floats(1024)},
        over=lambda: {"t": _floats(1025)},
        refused_at="capture",
        problem=r"bag/t: a tensor of 4100 bytes, over the 4096",
        reader_problem=r"nbytes = 4100 is not an integer from 0 to 4096",
        lowered={"MAX_TENSOR_BYTES": 4096},
    ),
    "MAX_SKELETON_DEPTH": Case(
        at=lambda: {"n": _nested(DEPTH - 1)},
        over=lambda: {"n": _nested(DEPTH)},
        refused_at="capture",
        problem=rf"bag/n(/0)+: state nests deeper than {DEPTH} levels",
        reader_problem=rf"state nests deeper than {DEPTH} levels",
    ),
}
# Limits checked by tests of their own below.
SEPARATE = {"MAX_STEP", "MAX_DIM", "MAX_WORLD_SIZE"}


def test_every_reader_limit_has_a_writer_case() -> None:
    assert set(CASES) | SEPARATE == set(LIMITS)


def _writer_checks_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a state past a limit be written, as a writer without the checks would."""
    monkeypatch.setattr(StateLimits, "check", lambda self, flat, complete=True: None)
    monkeypatch.setattr(saver_module, "check_layout", lambda layout: None)
    monkeypatch.setattr(Manifest, "to_json", Manifest._serialize)


def _committed(root: Path) -> list[int]:
    return [info.step for info in aiockpt.list_checkpoints(root)]


def _refuse(ckpt: aiockpt.SyncCheckpointer, step: int, case: Case) -> None:
    if case.refused_at == "capture":
        with pytest.raises(aiockpt.UnsupportedStateError, match=case.problem):
            ckpt.checkpoint(step)
        return
    handle = ckpt.checkpoint(step)
    with pytest.raises(aiockpt.BackgroundError) as caught:
        handle.wait()
    cause = caught.value.__cause__
    assert isinstance(cause, aiockpt.UnsupportedStateError), repr(cause)
    assert re.search(case.problem, str(cause)), str(cause)
    assert "is not committed" in str(cause)


@pytest.mark.parametrize("limit", sorted(CASES))
def test_writer_refuses_past_each_limit_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    case = CASES[limit]
    for name, value in case.lowered.items():
        monkeypatch.setattr(manifest, name, value)
    config = make_config(tmp_path, keep_last=None, **case.config)
    root = Path(config.directory)
    bag = Bag(clone_state(BASELINE))
    with aiockpt.SyncCheckpointer(config, bag=bag) as ckpt:
        ckpt.checkpoint(1).wait()
        bag.state = case.over()
        _refuse(ckpt, 2, case)
        assert _committed(root) == [1]
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
        at = case.at()
        bag.state = at
        ckpt.checkpoint(3).wait()
    assert _committed(root) == [1, 3]
    assert_state_equal(aiockpt.load(root / "step-3")["bag"], at)
    restored = Bag()
    with aiockpt.SyncCheckpointer(config, bag=restored) as ckpt:
        assert ckpt.restore() == 3
    assert_state_equal(restored.state, at)
    assert_state_equal(aiockpt.load(root / "step-1")["bag"], BASELINE)


@pytest.mark.parametrize("limit", sorted(CASES))
def test_a_reader_refuses_what_the_writer_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    case = CASES[limit]
    for name, value in case.lowered.items():
        monkeypatch.setattr(manifest, name, value)
    _writer_checks_off(monkeypatch)
    config = make_config(tmp_path, keep_last=None, **case.config)
    with aiockpt.SyncCheckpointer(config, bag=Bag(clone_state(BASELINE))) as ckpt:
        ckpt.checkpoint(1).wait()
    with aiockpt.SyncCheckpointer(config, bag=Bag(case.over())) as ckpt:
        ckpt.checkpoint(2).wait()
    root = Path(config.directory)
    with pytest.raises(aiockpt.CorruptCheckpointError, match=case.reader_problem):
        aiockpt.load(root / "step-2")
    restored = Bag()
    with aiockpt.SyncCheckpointer(config, bag=restored) as ckpt:
        assert ckpt.restore() == 1  # the newest is lost: what the writer's checks prevent
    assert_state_equal(restored.state, BASELINE)


def test_step_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path, keep_last=None)
    root = Path(config.directory)
    with aiockpt.SyncCheckpointer(config, bag=Bag(clone_state(BASELINE))) as ckpt:
        with pytest.raises(ValueError, match="non-negative int"):
            ckpt.checkpoint(manifest.MAX_STEP + 1)
        ckpt.checkpoint(manifest.MAX_STEP).wait()
    assert _committed(root) == [manifest.MAX_STEP]
    assert_state_equal(aiockpt.load(root / f"step-{manifest.MAX_STEP}")["bag"], BASELINE)
    # Past it, written anyway, a reader refuses it.
    _writer_checks_off(monkeypatch)
    monkeypatch.setattr(saver_module, "MAX_STEP", 2**64)
    with aiockpt.SyncCheckpointer(config, bag=Bag(clone_state(BASELINE))) as ckpt:
        ckpt.checkpoint(manifest.MAX_STEP + 1).wait()
    with pytest.raises(aiockpt.CorruptCheckpointError, match=r"step = \d+ is not an integer"):
        aiockpt.load(root / f"step-{manifest.MAX_STEP + 1}")


def test_dimension_limit_is_torchs_own(tmp_path: Path) -> None:
    """Torch sizes are int64, so no writer can pass MAX_DIM; the largest round-trips."""
    with pytest.raises((TypeError, RuntimeError, OverflowError)):
        torch.empty(0, manifest.MAX_DIM + 1)
    state = {"t": torch.empty(0, manifest.MAX_DIM)}
    config = make_config(tmp_path)
    with aiockpt.SyncCheckpointer(config, bag=Bag(state)) as ckpt:
        ckpt.checkpoint(1).wait()
    assert_state_equal(aiockpt.load(Path(config.directory) / "step-1")["bag"], state)


def test_world_size_limit_is_checked_before_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of more ranks than data file names can number is refused before commit (one
    process stands in for it: the limit is lowered below its world size of 1)."""
    config = make_config(tmp_path, keep_last=None)
    root = Path(config.directory)
    with aiockpt.SyncCheckpointer(config, bag=Bag(clone_state(BASELINE))) as ckpt:
        ckpt.checkpoint(1).wait()
    # A writer validates the parts of its manifests that never change (the world size
    # among them) once, with its first manifest: a new one meets the lowered limit.
    monkeypatch.setattr(manifest, "MAX_WORLD_SIZE", 0)
    with aiockpt.SyncCheckpointer(config, bag=Bag(clone_state(BASELINE))) as ckpt:
        _refuse(ckpt, 2, Case(dict, dict, "commit", r"world_size = 1 is not an integer", ""))
        monkeypatch.setattr(manifest, "MAX_WORLD_SIZE", 1)
        ckpt.checkpoint(3).wait()
    assert _committed(root) == [1, 3]


# Rules that are not counts: what a state may hold at all.
REFUSED_VALUES = {
    # The encoder refuses these by type before the format's allow-list would.
    "numpy-datetime": (np.datetime64(5, "ns"), r"bag/v: values of type numpy\.datetime64 cannot"),
    "numpy-long-double": (np.longdouble(1.5), r"bag/v: values of type numpy\.longdouble cannot"),
    "numpy-void": (np.void(b"abcd"), r"bag/v: values of type numpy\.void cannot"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED_VALUES))
def test_numpy_scalars_outside_the_allow_list_are_refused_at_capture(
    tmp_path: Path, kind: str
) -> None:
    value, problem = REFUSED_VALUES[kind]
    config = make_config(tmp_path, keep_last=None)
    bag = Bag(clone_state(BASELINE))
    with aiockpt.SyncCheckpointer(config, bag=bag) as ckpt:
        ckpt.checkpoint(1).wait()
        bag.state = {"v": value}
        with pytest.raises(aiockpt.UnsupportedStateError, match=problem):
            ckpt.checkpoint(2)
    assert _committed(Path(config.directory)) == [1]


def test_numpy_scalars_of_the_allow_list_round_trip(tmp_path: Path) -> None:
    state = {
        "bool": np.bool_(True),
        "i1": np.int8(-128),
        "u8": np.uint64(2**64 - 1),
        "i8": np.int64(-(2**63)),
        "f2": np.float16(65504.0),
        "f4": np.float32(np.finfo(np.float32).max),
        "f8": np.float64("-inf"),
        "text": np.str_("naïve"),
        "bytes": np.bytes_(b"\x00\xffab"),
    }
    config = make_config(tmp_path)
    with aiockpt.SyncCheckpointer(config, bag=Bag(state)) as ckpt:
        ckpt.checkpoint(1).wait()
    assert_state_equal(aiockpt.load(Path(config.directory) / "step-1")["bag"], state)


def test_integer_beyond_what_json_readers_take_is_refused_before_commit(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=None)
    bag = Bag(clone_state(BASELINE))
    with aiockpt.SyncCheckpointer(config, bag=bag) as ckpt:
        ckpt.checkpoint(1).wait()
        bag.state = {"big": 10**5000}
        _refuse(ckpt, 2, Case(dict, dict, "commit", r"Exceeds the limit \(4300 digits\)", ""))
        bag.state = {"big": 10**4000}
        ckpt.checkpoint(3).wait()
    assert _committed(Path(config.directory)) == [1, 3]
    assert aiockpt.load(Path(config.directory) / "step-3")["bag"]["big"] == 10**4000


def test_state_deeper_than_python_can_flatten_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=None)
    bag = Bag(clone_state(BASELINE))
    looped: dict[str, Any] = {}
    looped["self"] = looped
    with aiockpt.SyncCheckpointer(config, bag=bag) as ckpt:
        ckpt.checkpoint(1).wait()
        for state in ({"n": _nested(5000)}, looped):
            bag.state = state
            with pytest.raises(aiockpt.UnsupportedStateError, match="nests too deeply"):
                ckpt.checkpoint(2)
        bag.state = clone_state(BASELINE)
        ckpt.checkpoint(3).wait()  # the checkpointer is still fine
    assert _committed(Path(config.directory)) == [1, 3]


def test_a_5000_character_key_holding_a_tensor_round_trips(tmp_path: Path) -> None:
    """Tensor names are labels: a long key is legitimate and only the manifest bounds it."""
    state = {"k" * 5000: torch.ones(3), "x" * 100_000: {"deep": torch.zeros(2)}}
    config = make_config(tmp_path)
    with aiockpt.SyncCheckpointer(config, bag=Bag(state)) as ckpt:
        ckpt.checkpoint(1).wait()
    assert_state_equal(aiockpt.load(Path(config.directory) / "step-1")["bag"], state)


def test_the_check_at_capture_costs_nothing_when_the_state_keeps_its_structure(
    tmp_path: Path,
) -> None:
    """A changed learning rate re-checks the containers that changed, not the rest."""
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    checked: list[int] = []
    original = manifest.check_skeleton

    def counting(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        if kwargs.get("checked") is not None:  # at capture, not the check before commit
            checked.append(len(kwargs["checked"]))

    config = make_config(tmp_path, keep_last=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(manifest, "check_skeleton", counting)
        with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
            for step in range(4):
                optimizer.param_groups[0]["lr"] *= 0.5
                ckpt.checkpoint(step).wait()
    full = checked[0]
    assert full > 100
    assert all(n < full // 4 for n in checked[2:]), checked
