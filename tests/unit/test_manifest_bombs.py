"""Hostile manifests that pass their checksum (re-sealed after editing): every one is a
CorruptCheckpointError found by Manifest.parse, for aiockpt.load and for restore, which
falls back to the older checkpoint; none costs memory out of proportion to its size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
from conftest import Bag, assert_state_equal, make_config

import aiockpt
from aiockpt._format import skeleton
from aiockpt._format.manifest import MAX_SKELETON_DEPTH, Manifest, SkeletonError, check_skeleton

ROOT = Path(__file__).resolve().parents[2]


def state_of(step: int) -> dict[str, Any]:
    return {
        "w": torch.full((8,), float(step)),
        "v": torch.arange(6, dtype=torch.int32).view(2, 3),
        "lr": 0.5,
        "n": 3,
        "tags": ["a", "b"],
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 1 and 2, committed; each test edits a copy of step 2."""
    root = tmp_path_factory.mktemp("pristine")
    config = make_config(root, keep_last=None)
    for step in (1, 2):
        with aiockpt.SyncCheckpointer(config, bag=Bag(state_of(step))) as ckpt:
            ckpt.checkpoint(step).wait()
    return Path(config.directory)


def _copy(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(pristine, root)
    return root


def _seal(document: dict[str, Any]) -> bytes:
    """The manifest's bytes with a matching manifest_crc32c, as a hostile writer makes them."""
    document.pop("manifest_crc32c", None)
    canonical = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    return canonical[:-1] + b',"manifest_crc32c":%d}' % crc32c.crc32c(canonical)


def _edited(root: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    path = root / "step-2" / "manifest.json"
    document = json.loads(path.read_bytes())
    edit(document)
    path.write_bytes(_seal(document))
    return path


def _state(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["state"]["bag"].update(values)


def _tensor_entry(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in document["tensors"] if t["name"] == name)


def _dtensor(shape: list[Any], *shards: tuple[Any, int]) -> dict[str, Any]:
    return {
        "$dtensor": {
            "shape": shape,
            "shards": [{"offset": o, "data": {"$tensor": i}} for o, i in shards],
        }
    }


def _nested_tags(levels: int) -> Any:
    node: Any = 1
    for _ in range(levels):
        node = {"$tuple": [node]}
    return node


def _raw_replace(old: str, new: str) -> Callable[[Path], None]:
    """Edit the manifest's text itself (for what json.dumps cannot write), then re-seal
    by the same rule a reader checks."""

    def edit(path: Path) -> None:
        text = path.read_text()
        assert old in text
        text = text.replace(old, new, 1)
        head, _, _ = text.rpartition(',"manifest_crc32c":')
        path.write_text(f'{head},"manifest_crc32c":{crc32c.crc32c(head.encode() + b"}")}}}')

    return edit


# Index 0 is bag/w (float32, [8]), index 1 bag/v (int32, [2, 3]).
EDITS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    # values a decoder would choke on
    "float-npscalar-int8-out-of-range": (
        _state(lr={"$npscalar": "|i1", "value": 1000}),
        r"\$npscalar value 1000 is not a value of dtype \|i1",
    ),
    "npscalar-void-2-GiB": (
        _state(lr={"$npscalar": "V", "value": 2147483647}),
        r"\$npscalar dtype 'V' is not allowed",
    ),
    "npscalar-object": (
        _state(lr={"$npscalar": "|O", "value": 1}),
        r"\$npscalar dtype '\|O' is not allowed",
    ),
    "npscalar-datetime": (
        _state(lr={"$npscalar": "<M8[ns]", "value": 1}),
        r"dtype '<M8\[ns\]' is not allowed",
    ),
    "npscalar-int-given-a-string": (
        _state(lr={"$npscalar": "<i8", "value": "7"}),
        r"value '7' is not a value of dtype <i8",
    ),
    "npscalar-int-given-a-bool": (
        _state(lr={"$npscalar": "<i8", "value": True}),
        r"value True is not a value",
    ),
    "npscalar-half-overflows": (
        _state(lr={"$npscalar": "<f2", "value": 70000.0}),
        r"value 70000.0 is not a value of dtype <f2",
    ),
    "npscalar-text-longer-than-its-dtype": (
        _state(lr={"$npscalar": "<U2", "value": "abc"}),
        r"value 'abc' is not a value of dtype <U2",
    ),
    "npscalar-text-of-absurd-length": (
        _state(lr={"$npscalar": "<U99999999999", "value": "a"}),
        r"not allowed",
    ),
    "npscalar-without-value": (_state(lr={"$npscalar": "<f8"}), r"\$npscalar has no value"),
    "dtensor-negative-shape": (
        _state(w=_dtensor([-8], ([0], 0))),
        r"shape \[-8\] is not a list of at most \d+ non-negative integers",
    ),
    "dtensor-negative-offset": (
        _state(w=_dtensor([8], ([-1], 0))),
        r"a shard of shape \[8\] at \[-1\] lies outside",
    ),
    "dtensor-shard-of-other-rank": (
        _state(w=_dtensor([8, 1], ([0, 0], 0))),
        r"a shard of shape \[8\] at \[0, 0\] lies outside",
    ),
    "dtensor-does-not-cover-its-tensor": (
        _state(w=_dtensor([16], ([0], 0))),
        r"cover 8 of its 16 elements",
    ),
    "dtensor-shards-of-two-dtypes": (
        lambda d: (
            _tensor_entry(d, "bag/v").update(shape=[6])
            or _state(w=_dtensor([14], ([0], 0), ([8], 1)))(d)
        ),
        r"shards of a \$dtensor have different dtypes",
    ),
    "dtensor-shards-overlap-and-leave-a-gap": (
        _state(w=_dtensor([16], ([0], 0), ([4], 0))),
        r"shards of a \$dtensor of shape \[16\] overlap",
    ),
    "dtensor-data-not-a-tensor": (
        _state(w={"$dtensor": {"shape": [1], "shards": [{"offset": [0], "data": 5}]}}),
        r"shard data must be a \$tensor",
    ),
    "ranks-fewer-than-world-size": (
        lambda d: d.update(world_size=2, format_version=2) or _state(w={"$ranks": [1]})(d),
        r"\$ranks holds 1 ranks' state, but world_size is 2",
    ),
    "tags-nested-100-deep": (
        _state(lr=_nested_tags(100)),
        rf"nests deeper than {MAX_SKELETON_DEPTH}",
    ),
    "lists-nested-past-the-limit": (
        _state(lr=json.loads("[" * MAX_SKELETON_DEPTH + "]" * MAX_SKELETON_DEPTH)),
        rf"nests deeper than {MAX_SKELETON_DEPTH}",
    ),
    "float-tag-not-a-float-name": (_state(lr={"$float": "1e400"}), r"\$float is '1e400'"),
    "bytes-not-base64": (_state(lr={"$bytes": "abc"}), r"not standard base64"),
    "bytes-not-a-string": (_state(lr={"$bytes": [1, 2]}), r"not standard base64"),
    "dtype-not-a-string": (_state(lr={"$dtype": ["float32"]}), r"unknown dtype"),
    "ndarray-of-bfloat16": (
        lambda d: (
            _tensor_entry(d, "bag/w").update(dtype="bfloat16", shape=[16])
            or _state(w={"$ndarray": 0})(d)
        ),
        r"\$ndarray names tensor 0 of dtype torch.bfloat16, which numpy cannot hold",
    ),
    "tensor-ref-with-extra-keys": (
        _state(w={"$tensor": 0, "evil": 1}),
        r"\$tensor object has unexpected keys",
    ),
    "dict-entry-not-a-pair": (_state(lr={"$dict": [[1, 2, 3]]}), r"\[key, value\] pairs"),
    "dict-key-unhashable": (
        _state(lr={"$dict": [[{"a": 1}, 2]]}),
        r"\$dict key \{'a': 1\} is not hashable",
    ),
    "dict-key-an-array": (
        _state(lr={"$dict": [[{"$ndarray": 1}, 2]]}),
        r"is not hashable",
    ),
    "dict-key-twice": (_state(lr={"$dict": [[1, "a"], [1, "b"]]}), r"has the key 1 twice"),
    "odict-of-a-list": (_state(lr={"$odict": [1, 2]}), r"\$odict payload must be"),
    "odict-meta-a-number": (
        _state(lr={"$odict": {}, "meta": 3}),
        r"\$odict meta must be a JSON object",
    ),
    "unknown-tag": (_state(lr={"$eval": "1"}), r"unknown tag '\$eval'"),
    "versions-not-strings": (
        lambda d: d.update(versions={"aiockpt": [1]}),
        r"versions must map names to strings",
    ),
    # format rules
    "pieces-overlap": (
        lambda d: _tensor_entry(d, "bag/v")["pieces"][0].update(
            offset=_tensor_entry(d, "bag/w")["pieces"][0]["offset"] + 8
        ),
        r"tensors 'bag/w' and 'bag/v' overlap in data-r00000-c00000.bin",
    ),
    "tensor-overlaps-itself": (
        lambda d: _tensor_entry(d, "bag/w").update(
            pieces=[dict(_tensor_entry(d, "bag/w")["pieces"][0], length=16)] * 2
        ),
        r"tensors 'bag/w' and 'bag/w' overlap",
    ),
}

RAW_EDITS: dict[str, tuple[Callable[[Path], None], str]] = {
    # 1e400 parses to inf, which has no JSON text to check the seal against
    "float-1e400": (_raw_replace('"lr":0.5', '"lr":1e400'), r"Out of range float values"),
    "created-1e400": (
        _raw_replace('"created":', '"created":1e400,"was":'),
        r"Out of range float values",
    ),
    # 1,000 JSON levels: past what json itself parses or re-serializes on a normal stack
    "tags-nested-500-deep": (
        _raw_replace('"lr":0.5', '"lr":' + '{"$tuple":[' * 500 + "1" + "]}" * 500),
        r"nests deeper|not valid JSON|cannot be checked against its seal",
    ),
    "duplicate-key-in-state": (
        _raw_replace('"lr":0.5', '"lr":0.5,"lr":9.5'),
        r"key 'lr' appears twice in one object",
    ),
    "duplicate-key-at-the-top": (
        _raw_replace('"step":2', '"step":2,"step":2'),
        r"key 'step' appears twice",
    ),
    "duplicate-key-in-a-tensor-entry": (
        _raw_replace('"nbytes":32', '"nbytes":32,"nbytes":32'),
        r"key 'nbytes' appears twice",
    ),
}


def _assert_refused_and_restore_falls_back(root: Path, problem: str) -> None:
    with pytest.raises(aiockpt.CorruptCheckpointError, match=problem) as caught:
        aiockpt.load(root / "step-2")
    assert str(root / "step-2" / "manifest.json") in str(caught.value)
    raw = (root / "step-2" / "manifest.json").read_bytes()
    with pytest.raises(aiockpt.CorruptCheckpointError, match=problem):
        Manifest.parse(raw, "hostile")
    restored = Bag()
    with aiockpt.SyncCheckpointer(make_config(root.parent, keep_last=None), bag=restored) as c:
        assert c.restore() == 1
    assert_state_equal(restored.state, state_of(1))


@pytest.mark.parametrize("name", sorted(EDITS))
def test_resealed_hostile_manifest_is_refused_by_the_parser(
    pristine: Path, tmp_path: Path, name: str
) -> None:
    edit, problem = EDITS[name]
    root = _copy(pristine, tmp_path)
    _edited(root, edit)
    _assert_refused_and_restore_falls_back(root, problem)


@pytest.mark.parametrize("name", sorted(RAW_EDITS))
def test_hostile_manifest_text_is_refused_by_the_parser(
    pristine: Path, tmp_path: Path, name: str
) -> None:
    edit, problem = RAW_EDITS[name]
    root = _copy(pristine, tmp_path)
    edit(root / "step-2" / "manifest.json")
    _assert_refused_and_restore_falls_back(root, problem)


def test_every_edit_passes_the_checksum(pristine: Path, tmp_path: Path) -> None:
    """The cases test the validator, not the checksum: each one is sealed correctly."""
    root = _copy(pristine, tmp_path)
    _edited(root, lambda d: None)
    assert aiockpt.load(root / "step-2")["bag"]["lr"] == 0.5
    _raw_replace('"lr":0.5', '"lr":0.25')(root / "step-2" / "manifest.json")
    assert aiockpt.load(root / "step-2")["bag"]["lr"] == 0.25


def test_any_failure_while_decoding_is_corrupt_and_restore_falls_back(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the validator might miss, a decoder failure of any type marks the
    checkpoint corrupt (its cause kept) instead of escaping as a raw exception."""
    root = _copy(pristine, tmp_path)
    _edited(root, _state(lr={"$float": "inf"}))  # valid: only step 2 holds a $float
    original = skeleton._decode_tagged

    def failing(node: dict[str, Any], how: Any) -> Any:
        if next(iter(node)) == "$float":  # stands in for a decoder surprise
            raise RecursionError("maximum recursion depth exceeded")
        return original(node, how)

    monkeypatch.setattr(skeleton, "_decode_tagged", failing)
    with pytest.raises(aiockpt.CorruptCheckpointError, match="cannot be decoded") as caught:
        aiockpt.load(root / "step-2")
    assert isinstance(caught.value.__cause__, RecursionError)
    restored = Bag()
    with aiockpt.SyncCheckpointer(make_config(tmp_path, keep_last=None), bag=restored) as c:
        assert c.restore() == 1
    assert_state_equal(restored.state, state_of(1))


BOMB = textwrap.dedent(
    """
    import json, resource, sys, time
    import crc32c
    from aiockpt._format.manifest import Manifest
    from aiockpt.errors import CorruptCheckpointError

    size = int(sys.argv[1])
    body = b"[" + b",".join([b"{}"] * (size // 3)) + b"]"
    head = {"format": "aiockpt", "format_version": 1, "step": 1, "created": 0.0,
            "world_size": 1, "versions": {}, "checksum": "crc32c", "files": [],
            "tensors": [], "state": {"x": "@@"}}
    text = json.dumps(head, separators=(",", ":")).encode().replace(b'"@@"', body)
    raw = text[:-1] + b',"manifest_crc32c":%d}' % crc32c.crc32c(text)
    del body, text
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        Manifest.parse(raw, "bomb")
        outcome = "accepted"
    except CorruptCheckpointError as exc:
        outcome = str(exc)
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"bytes": len(raw), "seconds": seconds, "grown_kib": grown,
                      "outcome": outcome}))
    """
)


def test_a_manifest_of_empty_objects_is_refused_before_it_is_parsed() -> None:
    """16 MiB of "{}" would become ~0.5 GB of dicts; it is refused on a count of its
    brackets, in about the memory of one copy of the file."""
    size = 16 * 2**20
    result = subprocess.run(
        [sys.executable, "-c", BOMB, str(size)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    assert "JSON objects and arrays" in report["outcome"], report
    assert report["grown_kib"] * 1024 < 2 * size, report


def test_a_real_manifest_is_far_inside_the_container_allowance(pristine: Path) -> None:
    from aiockpt._format.manifest import container_allowance

    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(50)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    root = pristine.parent / "real"
    config = make_config(root)
    with aiockpt.SyncCheckpointer(config, model=model, optimizer=optimizer) as ckpt:
        ckpt.checkpoint(1).wait()
    raw = (Path(config.directory) / "step-1" / "manifest.json").read_bytes()
    containers = raw.count(b"{") + raw.count(b"[")
    per_byte_allowed = container_allowance(len(raw)) - container_allowance(0)
    assert containers * 2 < per_byte_allowed, (containers, len(raw))


def _grid(shape: list[int], boxes: list[tuple[list[int], list[int]]]) -> None:
    state = {"w": _dtensor(shape, *((offset, i) for i, (offset, _) in enumerate(boxes)))}
    check_skeleton(state, [torch.empty(size) for _, size in boxes])


def test_dtensor_shards_on_a_grid_pass_and_overlapping_ones_do_not() -> None:
    # 2 x 3 mesh over a 5 x 7 tensor, split as torch.chunk splits (uneven, one empty).
    rows, cols = [(0, 3), (3, 2)], [(0, 3), (3, 3), (6, 1)]
    _grid([5, 7], [([r, c], [n, m]) for r, n in rows for c, m in cols])
    _grid([2, 4], [([0, 0], [2, 4]), ([2, 0], [0, 4])])  # an empty shard past the end
    # Same cover, same element count, but two shards share a corner and leave a hole.
    with pytest.raises(SkeletonError, match="overlap"):
        _grid([4, 4], [([0, 0], [2, 2]), ([1, 1], [2, 2]), ([0, 2], [2, 2]), ([2, 2], [2, 2])])
    with pytest.raises(SkeletonError, match="overlap"):
        _grid([4], [([0], [2]), ([0], [2])])
