"""The manifest writer's kept text gives the same bytes as encoding and validating each
manifest in full, and refuses what a reader would refuse."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MixedModel, make_config

import aiockpt
from aiockpt._format.manifest import Manifest, manifest_from_layout
from aiockpt._format.writer import ManifestWriter
from aiockpt.errors import UnsupportedStateError


def _fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the pipeline gave the writer for a real checkpoint of a real model."""
    seen: list[dict[str, Any]] = []
    encode = ManifestWriter.encode

    def spy(self: ManifestWriter, **fields: Any) -> bytes:
        seen.append(fields)
        return encode(self, **fields)

    monkeypatch.setattr(ManifestWriter, "encode", spy)
    model = MixedModel()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    with aiockpt.SyncCheckpointer(make_config(tmp_path), model=model, optimizer=optimizer) as ck:
        ck.checkpoint(1).wait()
        ck.checkpoint(2).wait()
    monkeypatch.undo()
    assert len(seen) == 2
    return seen[-1]


def _in_full(fields: dict[str, Any]) -> bytes:
    return manifest_from_layout(**fields).to_json()


def test_kept_text_gives_the_bytes_of_a_full_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = _fields(tmp_path, monkeypatch)
    writer = ManifestWriter()
    first = writer.encode(**fields)
    assert first == _in_full(fields)
    # Later checkpoints of the same layout: new step, time, checksums and state.
    for step in (3, 2**63 - 1):
        checksums = {key: (value * 7 + step) % 2**32 for key, value in fields["checksums"].items()}
        state = dict(fields["state"])
        state["extra"] = {"lr": 1e-3 * step, "name": 'quoted "$counter" text', "n": [1, 2.5]}
        later = dict(fields, step=step, created=123.25 + step, checksums=checksums, state=state)
        payload = writer.encode(**later)
        assert payload == _in_full(later)
        parsed = Manifest.parse(payload, "manifest")
        assert parsed.step == step
        assert [p.checksum for t in parsed.tensors for p in t.pieces] == [
            checksums[(placement.index, j)]
            for placement in fields["layout_tensors"]
            for j in range(len(placement.pieces))
        ]


def test_a_state_that_needs_a_newer_format_version_gets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = _fields(tmp_path, monkeypatch)
    writer = ManifestWriter()
    writer.encode(**fields)
    # A Counter is a format version 3 tag: the version follows the state, as in full.
    with_counter = dict(fields, state=dict(fields["state"], counts=_tagged(collections.Counter())))
    payload = writer.encode(**with_counter)
    assert payload == _in_full(with_counter)
    assert Manifest.parse(payload, "manifest") is not None
    assert b'"format_version":1' not in payload


def _tagged(counter: collections.Counter[str]) -> Any:
    """The skeleton node that capture makes of ``counter``."""
    from aiockpt._engine.capture import flatten_state

    return flatten_state({"x": counter}).skeleton["x"]


@pytest.mark.parametrize(
    "bad",
    [
        {"ghost": {"$tensor": 10**6}},  # names a tensor the table lacks
        {1: "a", "1": "b"},  # two keys once JSON makes them strings
    ],
)
def test_a_state_a_reader_refuses_is_refused_on_the_kept_path_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: dict[Any, Any]
) -> None:
    fields = _fields(tmp_path, monkeypatch)
    writer = ManifestWriter()
    writer.encode(**fields)
    refused = dict(fields, state=dict(fields["state"], bad=bad))
    with pytest.raises(UnsupportedStateError, match="not committed"):
        writer.encode(**refused)
    with pytest.raises(UnsupportedStateError, match="not committed"):
        _in_full(refused)


def test_a_new_layout_is_encoded_and_validated_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = _fields(tmp_path, monkeypatch)
    writer = ManifestWriter()
    writer.encode(**fields)
    calls: list[int] = []
    to_json = Manifest.to_json

    def counting(self: Manifest) -> bytes:
        calls.append(self.step)
        return to_json(self)

    monkeypatch.setattr(Manifest, "to_json", counting)
    writer.encode(**dict(fields, step=5))
    assert calls == []  # the same layout: the kept text
    renamed = [name + "_v2" for name in fields["names"]]
    payload = writer.encode(**dict(fields, step=6, names=renamed))
    assert calls == [6]
    assert Manifest.parse(payload, "manifest").tensors[0].name.endswith("_v2")
