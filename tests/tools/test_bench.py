"""`aiockpt bench` on the CPU: every system runs, and the report's JSON, Markdown and PNG
have the structure they promise.

Timings are not checked here (they mean something only on a GPU, in `aiockpt bench`
itself); counts, keys, ratios between figures of the same report and file formats are.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from aiockpt.tools import bench, bench_report
from aiockpt.tools.bench_summary import p99, summarise
from aiockpt.tools.workloads import PRESETS, load_workload, preset_parameters

SYSTEMS = ["none", "torch.save", "dcp", "aiockpt-cpu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of the tiny preset with every system, through the command line."""
    tmp = tmp_path_factory.mktemp("bench")
    paths = {name: tmp / name for name in ("report.json", "report.md", "report.png")}
    command = [
        sys.executable, "-m", "aiockpt", "bench", "--preset", "tiny", "--cpu",
        "--steps", "6", "--checkpoint-interval", "3", "--rounds", "2",
        "--directory", str(tmp / "run"), "--output", str(paths["report.json"]),
        "--markdown", str(paths["report.md"]), "--plot", str(paths["report.png"]), "--json",
    ]  # fmt: skip
    # One intra-op thread: on a busy 2-core machine, torch's spinning worker threads make a
    # step of this tiny model take a hundred times longer, and the run's length with it.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr
    return {
        "tmp": tmp,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "report": json.loads(paths["report.json"].read_text()),
        **paths,
    }


def test_every_system_trains_checkpoints_and_restores(tiny_run: dict[str, Any]):
    report = tiny_run["report"]
    assert json.loads(tiny_run["stdout"]) == report  # --json: the report alone on stdout
    assert tiny_run["stderr"] == ""  # and no progress or log lines
    assert not (tiny_run["tmp"] / "run").exists()  # the bench cleans up after itself
    assert report["settings"]["systems"] == SYSTEMS == list(report["systems"])
    assert report["model"]["name"] == "tiny" and report["model"]["state_bytes"] > 0
    assert report["model"]["samples_per_step"] == PRESETS["tiny"].batch
    for name, system in report["systems"].items():
        assert len(system["rounds"]) == 2, name
        for r in system["rounds"]:
            assert len(r["step_ms"]) == 6 and all(t > 0 for t in r["step_ms"])
            if name == "none":
                assert r["checkpoint_at"] == [] and r["checkpoints"] == []
                continue
            assert r["checkpoint_at"] == [0, 3]
            assert [c["at"] for c in r["checkpoints"]] == [0, 3]
            for c in r["checkpoints"]:
                assert not c["skipped"] and c["stall_s"] > 0 and c["persist_s"] > 0
        summary = system["summary"]
        assert summary["samples_per_second"] > 0
        if name == "none":
            assert summary["restore_s"] is None and summary["achieved_interval"] is None
            continue
        assert summary["checkpoints_taken"] == 4 and summary["achieved_interval"] == 3.0
        assert summary["restore_s"] > 0 and summary["restore_bound_s"] > 0
        assert summary["persist_gbps"] > 0 and summary["stall_ms_p99"] >= summary["stall_ms_median"]
    assert report["systems"]["dcp"]["warm_up"]["first_checkpoint"]["stall_s"] > 0
    assert report["settings"]["per_system"]["dcp"]["cache_staged_state_dict"] is False  # no CUDA
    aiockpt_cpu = report["systems"]["aiockpt-cpu"]["summary"]
    for key in ("state_dict_ms_median", "staging_ms_median", "queue_wait_ms_median"):
        assert aiockpt_cpu[key] is not None, key
    assert aiockpt_cpu["staging_bytes"] >= report["model"]["state_bytes"]  # pinned_ratio 1
    limits = report["limits"]
    assert limits["fsync_write_gbps"] > 0 and limits["read_gbps"] > 0
    assert limits["host_copy_gbps"] > 0 and limits["d2d_gbps"] is None  # no GPU here
    assert {"build", "limits", "warm-up", "rounds", "restore", "total"} <= set(report["phases_s"])


def test_every_figure_has_its_ratios(tiny_run: dict[str, Any]):
    systems = tiny_run["report"]["systems"]
    for name, system in systems.items():
        vs = system["summary"]["vs"]
        assert set(vs) == {"none", "torch.save", "dcp"} - {name}
        for base, ratios in vs.items():
            mine = system["summary"]["samples_per_second"]
            theirs = systems[base]["summary"]["samples_per_second"]
            assert ratios["samples_per_second"] == pytest.approx(mine / theirs)
        assert set(system["summary"]["vs_limits"]) == {
            "stall_vs_capture_bound",
            "persist_vs_fsync_write",
            "restore_vs_bound",
            "staging_vs_state",
            "host_memory_vs_state",
        }
    ours = systems["aiockpt-cpu"]["summary"]
    assert ours["vs"]["torch.save"]["stall_ms_median"] == pytest.approx(
        ours["stall_ms_median"] / systems["torch.save"]["summary"]["stall_ms_median"]
    )
    assert ours["vs_limits"]["restore_vs_bound"] == pytest.approx(
        ours["restore_s"] / ours["restore_bound_s"]
    )


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_markdown_has_a_row_per_system(tiny_run: dict[str, Any]):
    text = tiny_run["report.md"].read_text()
    assert text.startswith("# aiockpt bench: tiny on cpu")
    rows = _table_rows(text, "| system | samples/s")
    header, rule, body = rows[0], rows[1], rows[2:]
    assert [row[0] for row in body] == SYSTEMS
    assert all(len(row) == len(header) == len(rule) for row in body)
    assert body[0][1].endswith("(1x)")  # none against itself
    ratios = _table_rows(text, "| system | against")
    assert ("aiockpt-cpu", "torch.save") in {(row[0], row[1]) for row in ratios[2:]}
    breakdown = _table_rows(text, "| system | state_dict")
    assert [row[0] for row in breakdown[2:]] == ["aiockpt-cpu"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_is_a_png_with_both_panels(tiny_run: dict[str, Any]):
    width, height = _png_size(tiny_run["report.png"])
    assert width >= 1000 and height >= 800  # 12 x 8 inches at 110 dpi
    assert tiny_run["report.png"].stat().st_size > 20_000  # lines, markers, bars and text


def _render(tiny_run: dict[str, Any], md: Path, png: Path) -> list[str]:
    return ["--from-json", str(tiny_run["report.json"]), "--markdown", str(md), "--plot", str(png)]


def test_from_json_renders_the_same_report(tiny_run: dict[str, Any], tmp_path: Path, capsys):
    md, png = tmp_path / "again.md", tmp_path / "again.png"
    code = bench.main(_render(tiny_run, md, png))
    assert code == 0
    assert md.read_text() == tiny_run["report.md"].read_text()
    assert capsys.readouterr().out == md.read_text()  # printed too
    assert _png_size(png) == _png_size(tiny_run["report.png"])


def test_from_json_without_matplotlib_writes_the_rest(
    tiny_run: dict[str, Any], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(bench, "plot_available", lambda: False)
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    code = bench.main(_render(tiny_run, md, png))
    assert code == 0 and md.exists() and not png.exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_from_json_refuses_what_is_not_a_report(tmp_path: Path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"preset": "tiny"}))  # e.g. an older bench's report
    assert bench.main(["--from-json", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a report of this version" in err and "hint:" in err


MODEL_MODULE = """
import torch

def build(device):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 16, device=device)

    def step():
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    return model, optimizer, step, 8

def not_a_workload(device):
    return {"model": None}

def wrong_types(device):
    return "model", object(), 42

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "bench_user_model_" + tmp_path.name.replace("-", "_")
    (tmp_path / f"{name}.py").write_text(MODEL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_user_model_is_measured(user_module: str, tmp_path: Path):
    output = tmp_path / "r.json"
    argv = [
        "--model", f"{user_module}:build", "--cpu", "--systems", "none,aiockpt",
        "--steps", "4", "--checkpoint-interval", "2", "--rounds", "1",
        "--directory", str(tmp_path / "run"), "--output", str(output), "--json",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(output.read_text())
    assert report["model"]["name"] == f"{user_module}:build"
    assert report["model"]["parameters"] == 16 * 32 + 32 + 32 * 4 + 4
    assert report["model"]["samples_per_step"] == 8
    # SGD momentum buffers (one per parameter once stepped) double the model's bytes.
    assert report["model"]["state_bytes"] == 2 * 4 * report["model"]["parameters"]
    assert list(report["systems"]) == ["none", "aiockpt-cpu"]
    assert report["systems"]["aiockpt-cpu"]["summary"]["checkpoints_taken"] == 2


def test_a_failing_system_is_reported_and_the_others_measured(
    user_module: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    def broken(self, at):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("aiockpt.tools.bench_systems.DcpSystem.checkpoint", broken)
    output, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = [
        "--model", f"{user_module}:build", "--cpu", "--systems", "none,dcp,aiockpt",
        "--steps", "2", "--checkpoint-interval", "1", "--rounds", "2",
        "--directory", str(tmp_path / "run"), "--output", str(output), "--markdown", str(md),
    ]  # fmt: skip
    assert bench.main(argv) == 1  # everything written, but the run is not a success
    report = json.loads(output.read_text())
    assert list(report["systems"]) == ["none", "aiockpt-cpu"]
    failure = report["failed"]["dcp"]
    assert failure["during"] == "warm-up" and "No space left on device" in failure["error"]
    assert "in broken" in failure["traceback"]  # where it failed, for the bug report
    assert set(report["systems"]["aiockpt-cpu"]["summary"]["vs"]) == {"none"}
    assert len(report["systems"]["aiockpt-cpu"]["rounds"]) == 2
    assert "- dcp, during warm-up: OSError" in md.read_text()
    assert "dcp failed during warm-up" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_shipped_example_follows_the_protocol(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    workload = load_workload("examples.bench_model:workload", torch.device("cpu"))
    assert workload.name == "examples.bench_model:workload" and workload.samples_per_step == 64
    before = [p.detach().clone() for p in workload.model.parameters()]
    workload.step()
    assert workload.optimizer.state  # the step reached the optimizer
    after = list(workload.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "is not of the form package.module:function"),
        ("aiockpt_no_such_module_x:build", "cannot import 'aiockpt_no_such_module_x'"),
        ("{mod}:missing", "has no function 'missing'"),
        ("{mod}:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
        ("{mod}:not_a_workload", "returned dict"),
        ("{mod}:wrong_types", "model is a str, not an nn.Module"),
    ],
)
def test_bad_model_says_what_is_wrong(
    spec: str, message: str, user_module: str, tmp_path: Path, capsys
):
    run_dir = tmp_path / "run"
    argv = ["--model", spec.format(mod=user_module), "--cpu", "--directory", str(run_dir)]
    code = bench.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "hint: --model takes package.module:function" in err
    assert not run_dir.exists()  # rejected before anything was written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--staging", "gpu"], "needs a CUDA device"),
        (["--systems", "none,zfs"], "unknown ['zfs']"),
        (["--model", "m:f", "--preset", "tiny"], "give one of them"),
        (["--checkpoint-interval", "0"], "--checkpoint-interval must be at least 1"),
    ],
)
def test_bad_usage_is_refused(argv: list[str], message: str, tmp_path: Path, capsys):
    code = bench.main([*argv, "--cpu", "--directory", str(tmp_path / "run")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_presets_have_the_sizes_they_are_named_for():
    assert 330e6 < preset_parameters("350m") < 380e6
    billion = preset_parameters("1.3b")
    assert 1.2e9 < billion < 1.45e9
    # AdamW keeps 16 bytes per parameter (weights, gradients, two moments in fp32): the
    # state must fit an 80 GB GPU twice over (training plus aiockpt's GPU staging copy).
    assert 17e9 <= 16 * billion <= 21.5e9 and 2 * 16 * billion < 80e9 * 0.6


def _checkpoint(at: int, number: int, skipped: bool) -> dict[str, Any]:
    return {
        "at": at,
        "stall_s": 0.001 * (number + 1),
        "wait_s": 0.0,
        "skipped": skipped,
        "persist_s": None if skipped else 0.5,
        "detail": {},
    }


def _round(step_ms: list[float], at: list[int], persisting: list[int], skipped=()) -> dict:
    memory = dict.fromkeys(("rss_held", "rss_peak", "pinned_held", "gpu_held"))
    return {
        "elapsed_s": sum(step_ms) / 1e3,
        "samples_per_second": len(step_ms) / (sum(step_ms) / 1e3),
        "step_ms": step_ms,
        "checkpoint_at": at,
        "persisting": persisting,
        "checkpoints": [_checkpoint(i, k, i in skipped) for k, i in enumerate(at)],
        "drain_s": 0.0,
        "memory": {**memory, "rss_peak_growth": 10},
    }


def _warm_up(rss_held: int | None) -> dict[str, Any]:
    memory = {"rss_held": rss_held, "pinned_held": None, "gpu_held": None}
    return {
        "first_checkpoint": None,
        "memory": memory,
        "staging_bytes": None,
        "staging_pinned": None,
    }


def test_summary_separates_checkpoint_persisting_and_quiet_steps():
    # Steps 0 and 4 carry a checkpoint (4 was skipped); 1 and 2 ran while one persisted.
    step_ms = [30.0, 12.0, 14.0, 10.0, 11.0, 10.0, 9.0, 10.0]
    report = {
        "model": {"state_bytes": 10**9},
        "limits": {"read_gbps": 2.0, "h2d_pinned_gbps": None, "fsync_write_gbps": 4.0},
        "systems": {
            "aiockpt-x": {
                "rounds": [_round(step_ms, [0, 4], [1, 2], skipped={4})],
                "restore_s": 1.0,
                "warm_up": _warm_up(5),
            }
        },
    }
    summarise(report)
    s = report["systems"]["aiockpt-x"]["summary"]
    assert s["quiet_step_ms_median"] == 10.0  # steps 3, 5, 6, 7
    assert s["persisting_step_ms_median"] == 13.0  # steps 1, 2
    assert s["step_inflation_ms_median"] == 20.0  # the skipped request is not a checkpoint
    assert s["checkpoints_taken"] == 1 and s["checkpoints_skipped"] == 1
    assert s["achieved_interval"] == 8.0
    assert s["persist_gbps"] == 2.0  # 1 GB in 0.5 s
    assert s["vs_limits"]["persist_vs_fsync_write"] == 0.5
    assert s["restore_bound_s"] == 0.5 and s["vs_limits"]["restore_vs_bound"] == 2.0
    assert s["host_memory_bytes"] == 15  # held at warm-up + peak growth in the round
    assert s["vs"] == {}  # no baseline ran


def test_p99_is_nearest_rank():
    assert p99([]) is None
    assert p99([5.0]) == 5.0
    assert p99(list(range(1, 101))) == 99
    assert p99([1.0, 2.0, 100.0]) == 100.0


def test_markdown_renders_missing_figures_as_dashes():
    report = json.loads(json.dumps(_minimal_report()))
    text = bench_report.markdown(report)
    row = next(line for line in text.splitlines() if line.startswith("| none |"))
    assert "| - |" in row and "nan" not in text.lower()


def _minimal_report() -> dict[str, Any]:
    report = {
        "created": "now",
        "environment": {"device": "cpu", "torch": torch.__version__, "aiockpt": "0", "cpus": 2},
        "model": {"name": "m", "parameters": 1, "state_bytes": 4, "samples_per_step": 1},
        "settings": {"steps": 2, "rounds": 1, "checkpoint_interval": 1},
        "limits": {"fsync_write_gbps": 1.0, "read_gbps": 1.0},
        "phases_s": {"total": 1.0},
        "systems": {
            "none": {
                "rounds": [_round([1.0, 1.0], [], [])],
                "restore_s": None,
                "warm_up": _warm_up(None),
            }
        },
    }
    summarise(report)
    return report


@pytest.mark.gpu
def test_every_system_on_the_gpu(tmp_path: Path):
    """The tiny preset on CUDA: both staging modes, DCP's pinned cache, GPU limits."""
    output = tmp_path / "r.json"
    command = [
        sys.executable, "-m", "aiockpt", "bench", "--preset", "tiny",
        "--steps", "6", "--checkpoint-interval", "3", "--rounds", "2",
        "--directory", str(tmp_path / "run"), "--output", str(output), "--json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    names = ["none", "torch.save", "dcp", "aiockpt-gpu", "aiockpt-host"]
    assert list(report["systems"]) == names and report["failed"] == {}
    assert report["environment"]["device"] != "cpu"
    assert report["limits"]["d2d_gbps"] > 0 and report["limits"]["h2d_pinned_gbps"] > 0
    assert report["settings"]["per_system"]["dcp"]["cache_staged_state_dict"] is True
    systems = {name: report["systems"][name]["summary"] for name in names}
    for name in names[2:]:
        assert systems[name]["staging_pinned"] is True, name
        assert systems[name]["checkpoints_taken"] == 4 and systems[name]["restore_s"] > 0
    # GPU staging holds a copy of the state; the delta is taken around the whole run, so
    # gradients that zero_grad(set_to_none=True) frees at its end shift it by up to a
    # quarter of the state (parameters' size): a loose bound, not an exact one.
    assert systems["aiockpt-gpu"]["gpu_held_bytes"] >= report["model"]["state_bytes"] // 2


def test_tiered_system_restores_from_memory_and_leaves_no_shm(user_module: str, tmp_path: Path):
    output = tmp_path / "r.json"
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    argv = [
        "--model", f"{user_module}:build", "--cpu", "--systems", "none,tiered",
        "--steps", "4", "--checkpoint-interval", "2", "--rounds", "1",
        "--directory", str(tmp_path / "run"), "--output", str(output), "--json",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(output.read_text())
    assert list(report["systems"]) == ["none", "aiockpt-cpu-tiered"]
    tiered = report["systems"]["aiockpt-cpu-tiered"]
    assert tiered["summary"]["checkpoints_taken"] == 2
    memory = report["settings"]["per_system"]["aiockpt-cpu-tiered"]["memory"]
    assert memory == {"directory": None, "interval_steps": None, "keep_last": 1}
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) == before
