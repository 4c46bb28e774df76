"""The command line, run on checkpoints these tests make: in-process and as ``python -m``."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Bag, MixedModel, assert_state_equal, make_config

import aiockpt
from aiockpt._engine.reader import read_manifest
from aiockpt.cli.main import main

REPO = Path(__file__).resolve().parents[2]
STEPS = (10, 20, 30)


def _state_objects() -> dict[str, Any]:
    model = MixedModel(seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    extra = Bag(
        {
            "epoch": 3,
            "note": "warmup done",
            "stats": torch.tensor([1.0, float("nan"), float("inf"), -2.0]),
        }
    )
    return {"model": model, "optimizer": optimizer, "extra": extra, "rng": aiockpt.RNGState()}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with committed steps 10, 20, 30 (made once; tests copy it to change it)."""
    root = tmp_path_factory.mktemp("made")
    config = make_config(root, keep_last=None, num_threads=2)
    with aiockpt.SyncCheckpointer(config, **_state_objects()) as writer:
        for step in STEPS:
            writer.checkpoint(step).wait()
    return config.directory


@pytest.fixture
def ckpt(made: Path, tmp_path: Path) -> Path:
    """A private copy of ``made`` that a test may damage or prune."""
    return Path(shutil.copytree(made, tmp_path / "copy"))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, Any]:
    code, out, _ = run_cli(capsys, *argv, "--json")
    return code, json.loads(out)


def flip_byte_of(checkpoint: Path, tensor: str) -> tuple[str, int, int]:
    """Flip the first byte of ``tensor`` on disk; its (file, start, end)."""
    record = next(t for t in read_manifest(checkpoint).tensors if t.name == tensor)
    piece = record.pieces[0]
    path = checkpoint / piece.file
    data = bytearray(path.read_bytes())
    data[piece.offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return piece.file, piece.offset, piece.offset + piece.length


def zeros_like_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, dict):
        return {k: zeros_like_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(zeros_like_state(v) for v in value)
    return value


# -- ls -----------------------------------------------------------------------------------------


def test_ls_lists_steps_and_marks_leftovers(ckpt: Path, capsys: pytest.CaptureFixture[str]):
    (ckpt / ".tmp-step-40-deadbeef").mkdir()
    (ckpt / ".tmp-step-40-deadbeef" / "data-r00000-c00000.bin").write_bytes(b"x" * 10)
    (ckpt / ".trash-step-5-cafebabe").mkdir()
    code, out, _ = run_cli(capsys, "ls", ckpt)
    assert code == 0
    for step in STEPS:
        assert f" {step} " in out
    assert ".tmp-step-40-deadbeef" in out and ".trash-step-5-cafebabe" in out
    assert "abandoned write of a dead writer" in out
    assert "unverified" in out and "no live writer" in out

    code, report = run_json(capsys, "ls", ckpt, "--verify")
    assert code == 0
    assert [c["step"] for c in report["checkpoints"]] == list(STEPS)
    assert all(c["status"] == "valid" and c["world_size"] == 1 for c in report["checkpoints"])
    assert report["checkpoints"][-1]["latest"] is True
    assert {(left["name"], left["kind"]) for left in report["leftovers"]} == {
        (".tmp-step-40-deadbeef", "tmp"),
        (".trash-step-5-cafebabe", "trash"),
    }
    assert report["writer"] == {"live": False, "pid": None}


def test_ls_sees_live_writer_and_prune_leaves_it_alone(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = make_config(tmp_path, directory=ckpt, keep_last=None, num_threads=2)
    with aiockpt.SyncCheckpointer(config, extra=Bag({"x": torch.ones(2)})):
        # Made after the writer opened (opening clears a dead writer's leftovers).
        (ckpt / ".tmp-step-40-0badf00d").mkdir()
        code, report = run_json(capsys, "ls", ckpt)
        assert code == 0
        assert report["writer"] == {"live": True, "pid": os.getpid()}
        assert report["leftovers"][0]["in_progress"] is True

        before = sorted(p.name for p in ckpt.iterdir())
        code, _, err = run_cli(capsys, "prune", ckpt, "--keep-last", 1)
        assert code == 1
        assert "being written" in err and "--force" in err
        code, plan = run_json(capsys, "prune", ckpt, "--keep-last", 1, "--dry-run")
        assert code == 0 and sorted(p.name for p in ckpt.iterdir()) == before
        assert [c["action"] for c in plan["checkpoints"]] == ["remove", "remove", "keep"]

        code, done = run_json(capsys, "prune", ckpt, "--keep-last", 1, "--force")
        assert code == 0 and done["removed"] == [10, 20]
        assert (ckpt / ".tmp-step-40-0badf00d").is_dir()  # the writer's: untouched
        assert [i.step for i in aiockpt.list_checkpoints(ckpt)] == [30]


def test_ls_errors_on_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, out, err = run_cli(capsys, "ls", tmp_path / "nope")
    assert code == 2 and out == ""  # a bad path argument is bad usage
    assert "no such directory" in err and "hint:" in err


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_shows_tree_and_values(made: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _ = run_cli(capsys, "inspect", made / "step-20")
    assert code == 0
    assert "step 20" in out
    for text in ("model", "optimizer", "fc1.weight", "float32", "[16, 8]", "bfloat16", "int64"):
        assert text in out
    assert "epoch = 3" in out and '"warmup done"' in out and "betas = (0.9, 0.999)" in out

    code, report = run_json(capsys, "inspect", made, "--step", 20)
    assert code == 0 and report["step"] == 20
    assert set(report["groups"]) == {"model", "optimizer", "extra", "rng"}
    by_name = {t["name"]: t for t in report["tensors"]}
    assert by_name["model/fc1.weight"]["dtype"] == "float32"
    assert by_name["model/fc1.weight"]["shape"] == [16, 8]
    assert by_name["model/buf16"]["dtype"] == "bfloat16"
    assert report["groups"]["model"]["nbytes"] == sum(
        t["nbytes"] for t in report["tensors"] if t["group"] == "model"
    )
    assert report["values"]["extra/epoch"] == 3
    layered = [t for t in report["tensors"] if t["layer"] is not None]
    assert sum(layer["nbytes"] for layer in report["layers"].values()) == sum(
        t["nbytes"] for t in layered
    )


def test_inspect_newest_when_given_the_directory(made: Path, capsys: pytest.CaptureFixture[str]):
    code, out, err = run_cli(capsys, "inspect", made, "--summary")
    assert code == 0 and "step 30" in out and "step-30" in err
    assert "fc1.weight" not in out  # --summary: groups only


def test_inspect_tensor_statistics(made: Path, capsys: pytest.CaptureFixture[str]):
    code, stats = run_json(capsys, "inspect", made / "step-10", "--tensor", "extra/stats")
    assert code == 0
    assert stats["nan"] == 1 and stats["inf"] == 1
    assert stats["min"] == -2.0 and stats["max"] == 1.0 and stats["mean"] == -0.5
    assert stats["checksum_ok"] is True
    assert stats["bytes_read"] == stats["nbytes"] == 16  # that tensor's bytes, nothing else

    expected = aiockpt.load(made / "step-10")["model"]["fc1.weight"].double()
    code, stats = run_json(capsys, "inspect", made / "step-10", "--tensor", "model.fc1.weight")
    assert code == 0 and stats["name"] == "model/fc1.weight"
    assert stats["dtype"] == "float32" and stats["shape"] == [16, 8]
    assert stats["min"] == pytest.approx(expected.min().item())
    assert stats["max"] == pytest.approx(expected.max().item())
    assert stats["mean"] == pytest.approx(expected.mean().item())
    assert stats["std"] == pytest.approx(expected.std().item())

    code, out, _ = run_cli(capsys, "inspect", made / "step-10", "--tensor", "model/counts")
    assert code == 0 and "int32" in out and "checksum" in out and "ok" in out

    code, _, err = run_cli(capsys, "inspect", made / "step-10", "--tensor", "model/fc1.weigth")
    assert code == 2 and "did you mean" in err and "model/fc1.weight" in err


def test_inspect_tensor_reports_a_bad_checksum(ckpt: Path, capsys: pytest.CaptureFixture[str]):
    flip_byte_of(ckpt / "step-30", "model/fc1.weight")
    code, stats = run_json(capsys, "inspect", ckpt / "step-30", "--tensor", "model/fc1.weight")
    assert code == 1 and stats["checksum_ok"] is False and stats["bad_pieces"]


# -- verify -------------------------------------------------------------------------------------


def test_verify_clean_and_after_a_flipped_byte(ckpt: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _ = run_cli(capsys, "verify", ckpt)
    assert code == 0 and "3 valid, 0 corrupt" in out

    file, start, end = flip_byte_of(ckpt / "step-20", "model/fc1.weight")
    code, out, _ = run_cli(capsys, "verify", ckpt / "step-20")
    assert code == 1
    assert "CORRUPT" in out and file in out and f"bytes {start}..{end}" in out
    assert "model/fc1.weight" in out

    code, report = run_json(capsys, "verify", ckpt)
    assert code == 1 and report["valid"] is False
    assert [c["status"] for c in report["checkpoints"]] == ["valid", "corrupt", "valid"]
    (problem,) = report["checkpoints"][1]["problems"]
    assert (problem["file"], problem["start"], problem["end"]) == (file, start, end)
    assert problem["tensor"] == "model/fc1.weight"


def test_verify_names_a_truncated_file(ckpt: Path, capsys: pytest.CaptureFixture[str]):
    data = next((ckpt / "step-10").glob("data-*.bin"))
    os.truncate(data, data.stat().st_size // 2)
    code, report = run_json(capsys, "verify", ckpt / "step-10")
    assert code == 1
    messages = [p["message"] for p in report["checkpoints"][0]["problems"]]
    assert any("truncated" in m for m in messages) and any("missing" in m for m in messages)


def test_python_dash_m_verify_and_ls(ckpt: Path):
    file, _, _ = flip_byte_of(ckpt / "step-30", "optimizer/state/1/exp_avg")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "aiockpt", "verify", str(ckpt), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert [c["valid"] for c in report["checkpoints"]] == [True, True, False]
    assert report["checkpoints"][2]["problems"][0]["file"] == file


# -- export / import ----------------------------------------------------------------------------


def test_export_torch_loads_with_weights_only(
    made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "state.pt"
    code, report = run_json(capsys, "export", made / "step-20", "--to", "torch", out)
    assert code == 0 and report["step"] == 20
    loaded = torch.load(out, weights_only=True)
    expected = aiockpt.load(made / "step-20")
    for key in ("model", "optimizer", "extra"):
        assert_state_equal(loaded[key], expected[key])
    # numpy's RNG state (an array) comes back as a tensor of the same values
    assert torch.equal(loaded["rng"]["numpy"][1], torch.from_numpy(expected["rng"]["numpy"][1]))

    code, _, err = run_cli(capsys, "export", made / "step-20", "--to", "torch", out)
    assert code == 2 and "--force" in err
    assert run_cli(capsys, "export", made / "step-20", "--to", "torch", out, "--force")[0] == 0


def test_export_safetensors(made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    out = tmp_path / "model.safetensors"
    code, report = run_json(capsys, "export", made / "step-10", "--to", "safetensors", out)
    assert code == 0 and report["keys"] == ["model"]
    model_bytes = sum(
        t.nbytes for t in read_manifest(made / "step-10").tensors if t.name.startswith("model/")
    )
    assert report["bytes_read"] == model_bytes  # only the model's tensors were read
    tensors = safetensors_torch.load_file(str(out))
    expected = aiockpt.load(made / "step-10")["model"]
    assert set(tensors) == set(expected)
    for name, tensor in expected.items():
        assert_state_equal(tensors[name], tensor, name)
    MixedModel().load_state_dict(tensors)  # strict: the names are the module's own

    both = tmp_path / "both.safetensors"
    code, _, _ = run_cli(
        capsys, "export", made, "--to", "safetensors", both, "--key", "model", "--key", "extra"
    )
    names = set(safetensors_torch.load_file(str(both)))
    assert code == 0 and "model.fc1.weight" in names and "extra.stats" in names
    assert not any(name.startswith("optimizer") for name in names)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_dcp_loads_back(made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "dcp"
    code, _, _ = run_cli(capsys, "export", made / "step-30", "--to", "dcp", out)
    assert code == 0 and (out / ".metadata").is_file()
    expected = aiockpt.load(made / "step-30")
    target = {k: zeros_like_state(expected[k]) for k in ("model", "optimizer")}
    dcp.load(target, storage_reader=dcp.FileSystemReader(out), no_dist=True)
    assert_state_equal(target["model"], dict(expected["model"]))
    assert_state_equal(target["optimizer"]["state"], expected["optimizer"]["state"])


def test_import_round_trips(made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    expected = aiockpt.load(made / "step-20")
    exported = tmp_path / "state.pt"
    assert run_cli(capsys, "export", made / "step-20", "--to", "torch", exported)[0] == 0
    target = tmp_path / "imported"
    code, report = run_json(capsys, "import", exported, "--from", "torch", "--step", 7, target)
    assert code == 0 and report["keys"] == ["model", "optimizer", "extra", "rng"]
    state = aiockpt.load(target / "step-7")
    for key in ("model", "optimizer", "extra"):
        assert_state_equal(state[key], expected[key])

    # What an import writes restores into live objects like any checkpoint.
    model = MixedModel(seed=99)
    with aiockpt.SyncCheckpointer(make_config(tmp_path, directory=target), model=model) as ckpt:
        assert ckpt.restore() == 7
    assert_state_equal(dict(model.state_dict()), dict(expected["model"]))

    code, _, err = run_cli(capsys, "import", exported, "--from", "torch", "--step", 7, target)
    assert code == 2 and "already exists" in err and "--force" in err

    dcp_dir = tmp_path / "dcp"
    assert run_cli(capsys, "export", made / "step-20", "--to", "dcp", dcp_dir)[0] == 0
    assert run_cli(capsys, "import", dcp_dir, "--from", "dcp", "--step", 8, target)[0] == 0
    state = aiockpt.load(target / "step-8")
    assert_state_equal(state["model"], dict(expected["model"]))
    assert_state_equal(state["extra"], expected["extra"])


def test_import_safetensors(made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pytest.importorskip("safetensors")
    out = tmp_path / "model.safetensors"
    assert run_cli(capsys, "export", made / "step-10", "--to", "safetensors", out)[0] == 0
    target = tmp_path / "imported"
    assert run_cli(capsys, "import", out, "--from", "safetensors", "--step", 1, target)[0] == 0
    state = aiockpt.load(target / "step-1")
    assert list(state) == ["model"]
    expected = aiockpt.load(made / "step-10")["model"]
    assert set(state["model"]) == set(expected)  # safetensors sorts names
    for name, tensor in expected.items():
        assert_state_equal(state["model"][name], tensor, name)


class _NotWeights:
    pass


def test_import_refuses_pickled_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    source = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "obj": _NotWeights()}, source)
    code, _, err = run_cli(capsys, "import", source, "--from", "torch", "--step", 1, tmp_path / "d")
    assert code == 1 and "cannot be loaded safely" in err and "hint:" in err
    assert not (tmp_path / "d" / "step-1").exists()
    with pytest.raises(pickle.UnpicklingError):  # the guard is torch's weights_only loader
        torch.load(source, weights_only=True)


# -- prune --------------------------------------------------------------------------------------


def test_prune_dry_run_then_real(ckpt: Path, capsys: pytest.CaptureFixture[str]):
    (ckpt / ".tmp-step-40-deadbeef").mkdir()
    before = sorted(p.name for p in ckpt.iterdir())
    code, plan = run_json(capsys, "prune", ckpt, "--keep-last", 1, "--keep-every", 20, "--dry-run")
    assert code == 0 and sorted(p.name for p in ckpt.iterdir()) == before
    assert {c["step"]: c["action"] for c in plan["checkpoints"]} == {
        10: "remove",
        20: "keep",
        30: "keep",
    }
    assert plan["leftovers"][0]["action"] == "delete" and plan["removed"] == []

    code, out, _ = run_cli(capsys, "prune", ckpt, "--keep-last", 1, "--keep-every", 20)
    assert code == 0 and "removed" in out
    assert [i.step for i in aiockpt.list_checkpoints(ckpt)] == [20, 30]
    assert not (ckpt / ".tmp-step-40-deadbeef").exists()  # a dead writer's leftover
    assert not list(ckpt.glob(".trash-*"))
    assert (ckpt / "latest").read_text() == "step-30\n"


def test_prune_never_removes_the_newest_valid(ckpt: Path, capsys: pytest.CaptureFixture[str]):
    flip_byte_of(ckpt / "step-30", "model/fc1.weight")
    code, report = run_json(capsys, "prune", ckpt, "--keep-last", 1)
    assert code == 0
    assert report["newest_valid"] == 20 and report["corrupt"][0]["step"] == 30
    assert [i.step for i in aiockpt.list_checkpoints(ckpt)] == [20, 30]


# -- the parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ls", "inspect", "verify", "export", "import", "prune"])
def test_every_command_has_teaching_help(command: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert "examples:" in out and f"aiockpt {command}" in out and "--json" in out


def test_bench_is_an_ordinary_subcommand(monkeypatch: pytest.MonkeyPatch):
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr("aiockpt.tools.bench.command", lambda args: seen.append(args) or 0)
    assert main(["bench", "--preset", "tiny", "--max-async", "3"]) == 0
    assert [(a.command, a.preset, a.max_async) for a in seen] == [("bench", "tiny", 3)]


def test_export_errors_say_what_to_do(
    made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "export", made, "--to", "safetensors", out)
    assert code == 1 and "pip install 'aiockpt[export]'" in err and not out.exists()
    out = tmp_path / "x.pt"
    code, _, err = run_cli(capsys, "export", made, "--to", "torch", out, "--key", "nope")
    assert code == 2 and "no top-level key 'nope'" in err and "model" in err
