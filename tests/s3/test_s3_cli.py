"""Every checkpoint command on s3:// URLs: ls, inspect, verify, export, import, prune."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import aiockpt
from aiockpt.cli.main import main

from .s3server import keys


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, Any]:
    code = main([str(a) for a in argv] + ["--json"])
    out, err = capsys.readouterr()
    assert out, err
    return code, json.loads(out)


@pytest.fixture
def saved(s3_url: str) -> dict[int, torch.nn.Module]:
    """Steps 1, 2 and 3 of a small model in ``s3_url``."""
    models = {}
    config = aiockpt.Config(directory=s3_url, keep_last=None)
    model = torch.nn.Linear(8, 4)
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        for step in (1, 2, 3):
            model.weight.data += 1
            ckpt.checkpoint(step).wait()
            models[step] = torch.nn.Linear(8, 4)
            models[step].load_state_dict(model.state_dict())
    return models


def _corrupt(client, bucket: str, step: int) -> None:  # type: ignore[no-untyped-def]
    """Flip the first byte of a data object of ``step``, in place in the bucket."""
    key = next(
        k for k in keys(client, bucket, f"run-1/step-{step}/") if not k.endswith("manifest.json")
    )
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[0] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


def test_ls_inspect_and_verify(capsys, saved, s3_url, bucket, s3_client_):
    code, report = _cli(capsys, "ls", s3_url)
    assert code == 0
    assert [row["step"] for row in report["checkpoints"]] == [1, 2, 3]
    assert report["latest"] == "step-3"
    assert report["writer"]["live"] is False

    code, report = _cli(capsys, "inspect", s3_url, "--step", 2)
    assert code == 0
    assert report["step"] == 2

    _corrupt(s3_client_, bucket, 2)
    code, report = _cli(capsys, "verify", s3_url)
    assert code == 1
    assert {c["step"]: c["valid"] for c in report["checkpoints"]} == {1: True, 2: False, 3: True}

    # A restore falls back past a corrupt newest checkpoint.
    _corrupt(s3_client_, bucket, 3)
    model = torch.nn.Linear(8, 4)
    with aiockpt.SyncCheckpointer(aiockpt.Config(directory=s3_url), model=model) as ckpt:
        assert ckpt.restore() == 1
    assert torch.equal(model.weight, saved[1].weight)


def test_export_and_import(capsys, saved, s3_url, tmp_path, bucket):
    exported = tmp_path / "step2.pt"
    code, report = _cli(capsys, "export", s3_url, "--step", 2, "--to", "torch", exported)
    assert code == 0
    state = torch.load(exported, weights_only=True)
    assert torch.equal(state["model"]["weight"], saved[2].weight)

    target = f"s3://{bucket}/imported"
    code, report = _cli(capsys, "import", exported, "--from", "torch", "--step", 7, target)
    assert code == 0
    assert report["checkpoint"] == f"{target}/step-7"
    loaded = aiockpt.load(f"{target}/step-7")
    assert torch.equal(loaded["model"]["weight"], saved[2].weight)


def test_prune(capsys, saved, s3_url, bucket, s3_client_):
    code, report = _cli(capsys, "prune", s3_url, "--keep-last", 1, "--dry-run")
    assert code == 0
    assert [r["action"] for r in report["checkpoints"]] == ["remove", "remove", "keep"]
    assert [info.step for info in aiockpt.list_checkpoints(s3_url)] == [1, 2, 3]
    code, report = _cli(capsys, "prune", s3_url, "--keep-last", 1)
    assert code == 0
    assert report["freed_bytes"] > 0
    assert [info.step for info in aiockpt.list_checkpoints(s3_url)] == [3]
    remaining = keys(s3_client_, bucket, "run-1/")
    assert not [k for k in remaining if k.startswith(("run-1/step-1/", "run-1/step-2/"))]
    assert "run-1/.aiockpt.lock" not in remaining  # prune gave its lock back


def test_bench_refuses_an_object_store_instead_of_making_a_local_folder(
    capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--directory", "s3://bucket-1/x", "--preset", "tiny"]) == 2
    assert "local directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" appeared
