"""`aiockpt bench` on the tiny CPU preset: the report has every figure, with sane types.

Timings are not checked here (they mean something only on a GPU); the structure is."""

from __future__ import annotations

import json
import math
import subprocess
import sys


def test_bench_tiny_preset_reports_every_figure(tmp_path):
    output = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "aiockpt", "bench", "--preset", "tiny", "--cpu",
        "--rounds", "2", "--steps", "3", "--directory", str(tmp_path / "run"),
        "--trainer", "--trainer-seconds", "0.5", "--trainer-intervals", "2",
        "--trainer-policies", "block,skip", "--output", str(output), "--json",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert json.loads(result.stdout) == report
    assert report["preset"] == "tiny" and report["parameters"] > 0 and report["state_bytes"] > 0
    limits = report["limits"]
    assert limits["fsync_write_gbps"] > 0 and limits["read_gbps"] > 0
    cpu = report["aiockpt"]["cpu"]
    assert len(cpu["raw"]["call_ms"]) == 2
    for key in ("call_ms_median", "stall_ms_median", "persist_gbps_median", "restore_seconds"):
        assert math.isfinite(cpu[key]), key
    assert cpu["persist_gbps_median"] > 0 and cpu["restore_bound_seconds"] > 0
    trainer = report["trainer"]
    assert set(trainer) == {"none", "every 2 (block)", "every 2 (skip)"}
    assert trainer["none"]["vs_no_checkpoint"] == 1.0 and trainer["none"]["checkpoints"] == 0
    assert trainer["every 2 (block)"]["checkpoints"] > 0
    assert report["torch_save_seconds"] and report["torch_save_seconds"][0] > 0
    assert not (tmp_path / "run").exists()  # the bench cleans up after itself
