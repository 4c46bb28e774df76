"""Manifests that lie: each is rejected as CorruptCheckpointError and restore falls back."""

from __future__ import annotations

import json
from pathlib import Path

import crc32c
import pytest
import torch
from conftest import make_config

import aiockpt
from aiockpt._engine.layout import plan_layout_for_count


class Holder:
    def __init__(self, value: float) -> None:
        self.state = {"w": torch.full((64, 64), value), "lr": 0.5, "pair": (1, 2)}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def _two_checkpoints(tmp_path: Path) -> Path:
    config = make_config(tmp_path, keep_last=None)
    for step, value in ((1, 1.0), (2, 2.0)):
        with aiockpt.SyncCheckpointer(config, holder=Holder(value)) as ckpt:
            ckpt.checkpoint(step).wait()
    return Path(config.directory)


def _edit_manifest(directory: Path, edit, *, reseal: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Change a manifest; ``reseal`` recomputes its checksum, as a hostile writer would."""
    path = directory / "manifest.json"
    document = json.loads(path.read_bytes())
    document.pop("manifest_crc32c")
    edit(document)
    canonical = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    document["manifest_crc32c"] = crc32c.crc32c(canonical) if reseal else 0
    path.write_text(json.dumps(document))


def test_flipped_non_tensor_state_fails_the_manifest_checksum(tmp_path):
    root = _two_checkpoints(tmp_path)
    path = root / "step-2" / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"lr":0.5', b'"lr":0.7'))
    with pytest.raises(aiockpt.CorruptCheckpointError, match="manifest fails its crc32c"):
        aiockpt.load(root / "step-2")
    holder = Holder(0.0)
    with aiockpt.SyncCheckpointer(make_config(tmp_path), holder=holder) as ckpt:
        assert ckpt.restore() == 1
    assert holder.state["lr"] == 0.5


@pytest.mark.parametrize(
    "payload",
    [{"$float": "abc"}, {"$dict": 5}, {"$tuple": 3}, {"$bytes": "!!!"}, {"$odict": 1}],
    ids=["float", "dict", "tuple", "bytes", "odict"],
)
def test_broken_tag_payload_is_corrupt_and_restore_falls_back(tmp_path, payload):
    root = _two_checkpoints(tmp_path)
    _edit_manifest(root / "step-2", lambda d: d["state"]["holder"].update(lr=payload))
    with pytest.raises(aiockpt.CorruptCheckpointError, match="cannot be decoded"):
        aiockpt.load(root / "step-2")
    holder = Holder(0.0)
    with aiockpt.SyncCheckpointer(make_config(tmp_path), holder=holder) as ckpt:
        assert ckpt.restore() == 1
    assert torch.equal(holder.state["w"], torch.full((64, 64), 1.0))


def test_tensors_claiming_more_bytes_than_files_hold(tmp_path):
    root = _two_checkpoints(tmp_path)

    def duplicate(document: dict) -> None:
        document["tensors"] = document["tensors"] * 50  # all pointing at the same bytes

    _edit_manifest(root / "step-2", duplicate)
    with pytest.raises(aiockpt.CorruptCheckpointError, match=r"claim .* bytes but the data"):
        aiockpt.load(root / "step-2")


def test_directory_renamed_to_another_step(tmp_path):
    root = _two_checkpoints(tmp_path)
    (root / "step-2").rename(root / "step-99")
    with pytest.raises(aiockpt.CorruptCheckpointError, match="says step 99 but its manifest"):
        aiockpt.load(root / "step-99")
    with aiockpt.SyncCheckpointer(make_config(tmp_path), holder=Holder(0.0)) as ckpt:
        assert ckpt.restore() == 1


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_chunk_count_is_an_upper_bound(count):
    sizes = [1000, 5000, 300, 7000, 20000, 1, 0, 4000, 64, 12345]
    tensors = [torch.zeros(n) for n in sizes]
    layout = plan_layout_for_count(tensors, [str(i) for i in range(len(sizes))], count)
    assert len(layout.chunks) <= count
    placed = sum(p.length for t in layout.tensors for p in t.pieces)
    assert placed == sum(sizes) * 4


def test_checkpointer_honours_chunk_count(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(40, 40) for _ in range(6)])
    config = make_config(tmp_path, chunk_count=3)
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        handle = ckpt.checkpoint(1)
        handle.wait()
    assert handle.metrics.chunks <= 3
    files = sorted(p.name for p in (Path(config.directory) / "step-1").glob("data-*.bin"))
    assert 1 <= len(files) <= 3
