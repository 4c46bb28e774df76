"""bench and diagnose say when they cannot tell, and bench times a cold start.

The statistics are checked on crafted numbers (what decides "within noise" is the data,
not the machine); one short real bench run on the CPU checks the cold-start figure end to
end. Nothing here asserts a timing.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_bench import _round, _warm_up
from test_diagnose import healthy

from aiockpt.tools import bench_report
from aiockpt.tools.bench_summary import summarise
from aiockpt.tools.diagnose_advice import analyze
from aiockpt.tools.noise import compare, median_interval, repeat_until_known

# -- the statistics --------------------------------------------------------------------------


def test_the_median_interval_is_the_range_for_few_values_and_narrows_with_more() -> None:
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)
    many = [float(v) for v in range(1, 41)]
    low, high = median_interval(many)
    assert 1.0 < low < 20.5 < high < 40.0
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


def test_a_difference_the_rounds_do_not_show_is_within_noise() -> None:
    # The tiny preset's run: aiockpt "1.24x faster" than none, whose rounds varied widely.
    none = [100.0, 160.0, 125.0]
    aiockpt = [150.0, 155.0, 148.0]
    found = compare(aiockpt, none)
    assert found is not None and found.within_noise
    assert found.ratio == pytest.approx(150.0 / 125.0)
    assert found.describe().startswith("1.20x, within noise (")
    assert found.baseline_spread == pytest.approx(30.0 / 125.0)


def test_a_difference_larger_than_both_spreads_is_reported_as_one() -> None:
    found = compare([70.0, 71.0, 69.0, 70.5, 70.2], [100.0, 101.0, 99.5, 100.2, 100.8])
    assert found is not None and not found.within_noise
    assert found.high < 1.0 and found.describe().startswith("0.70x (")


def test_one_value_each_is_no_evidence() -> None:
    found = compare([80.0], [100.0])
    assert found is not None and found.within_noise and found.samples == 1
    assert compare([], [1.0]) is None and compare([1.0], [0.0]) is None


def test_repeats_stop_once_the_spread_is_known_and_at_the_cap_when_it_never_is() -> None:
    steady = iter([10.0] * 100)
    values = repeat_until_known(lambda: next(steady), effect=lambda v: 1.0, minimum=5, cap=20)
    assert len(values) == 5
    wild = iter([1.0, 100.0] * 50)
    values = repeat_until_known(lambda: next(wild), effect=lambda v: 1.0, minimum=5, cap=20)
    assert len(values) == 20


# -- bench ---------------------------------------------------------------------------------


def _report(none_rounds: list[list[float]], mine_rounds: list[list[float]]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "created": "now",
        "environment": {"device": "cpu", "torch": "2", "aiockpt": "0", "cpus": 2},
        "model": {"name": "m", "parameters": 1, "state_bytes": 10**6, "samples_per_step": 1},
        "settings": {"steps": 4, "rounds": 3, "checkpoint_interval": 2},
        "limits": {"fsync_write_gbps": 1.0, "read_gbps": 1.0},
        "phases_s": {"total": 1.0},
        "cold_start": {
            "steps": 4,
            "interval": 2,
            "seconds": {"none": [1.0, 1.3], "aiockpt": [1.2]},
        },
        "systems": {
            "none": {
                "rounds": [_round(steps, [], []) for steps in none_rounds],
                "restore_s": None,
                "warm_up": _warm_up(None),
            },
            "aiockpt": {
                "rounds": [_round(steps, [0, 2], [1]) for steps in mine_rounds],
                "restore_s": 1.0,
                "warm_up": _warm_up(5),
            },
        },
    }
    summarise(report)
    return report


def test_bench_prints_a_faster_than_none_result_as_within_noise() -> None:
    report = _report(
        none_rounds=[[10.0] * 4, [6.0] * 4, [8.0] * 4],  # none itself varies by 1.7x
        mine_rounds=[[6.5] * 4, [6.4] * 4, [6.6] * 4],
    )
    summary = report["systems"]["aiockpt"]["summary"]
    noise = summary["throughput_vs_none"]
    assert noise["ratio"] > 1.2 and noise["within_noise"]
    row = next(line for line in bench_report.markdown(report).splitlines() if "| aiockpt |" in line)
    assert "within noise" in row
    json.dumps(report, allow_nan=False)  # the comparison is plain JSON


def test_bench_time_to_step_is_judged_against_none_s_own_drift() -> None:
    report = _report([[10.0] * 4] * 3, [[10.0] * 4] * 3)
    figure = report["systems"]["aiockpt"]["summary"]["time_to_step"]
    assert figure["seconds"] == 1.2 and figure["vs_none_s"] == pytest.approx(0.05)
    assert figure["none_drift_s"] == pytest.approx(0.3) and figure["within_noise"]
    assert report["systems"]["none"]["summary"]["time_to_step"]["drift_s"] == pytest.approx(0.3)
    text = bench_report.markdown(report)
    assert "Time to reach step 4 from making the system" in text
    assert "aiockpt 1.20 s (+0.05 s, within noise)" in text


def test_a_tiny_bench_run_times_every_system_from_a_cold_start(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    # fmt: off
    argv = [
        sys.executable, "-m", "aiockpt", "bench", "--preset", "tiny", "--cpu",
        "--systems", "none,aiockpt", "--steps", "4", "--checkpoint-interval", "2",
        "--rounds", "2", "--directory", str(tmp_path / "bench"), "--output", str(output),
    ]
    # fmt: on
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(output.read_text())
    seconds = report["cold_start"]["seconds"]
    assert len(seconds["none"]) == 2 and len(seconds["aiockpt-cpu"]) == 1
    figure = report["systems"]["aiockpt-cpu"]["summary"]["time_to_step"]
    assert figure["steps"] == 4 and isinstance(figure["within_noise"], bool)
    assert "Time to reach step 4" in done.stdout
    assert not (tmp_path / "bench").exists()  # everything it made is gone


# -- diagnose ------------------------------------------------------------------------------


def test_diagnose_marks_its_verdict_uncertain_when_training_varies_more_than_the_cost() -> None:
    # Tiny steps that vary by 5 ms while a checkpoint costs ~1 ms: no verdict can hold.
    m = healthy(
        timings__step_ms=3.0,
        timings__stall_ms=1.0,
        timings__call_ms=0.5,
        timings__plain_step_ms=3.0,
        timings__persisting_step_ms=3.0,
        timings__plain_step_ms_spread=5.0,
        timings__persist_seconds=0.01,
        timings__write_seconds=0.009,
        setup__state_bytes=1_000_000,
    )
    analysis = analyze(m)
    overhead = next(f for f in analysis.findings if f.code.startswith("overhead"))
    assert overhead.uncertain is not None and "vary by 5 ms" in overhead.uncertain
    assert "uncertain" in analysis.verdict and "uncertain" in overhead.line()
    assert overhead.to_dict()["uncertain"] == overhead.uncertain


def test_diagnose_is_uncertain_when_the_stall_interval_straddles_the_budget() -> None:
    # Every 50 steps of 60 ms at the 5% target: 150 ms per checkpoint is the budget, and
    # the slower steps while it persists cost ~33 ms besides the stall.
    m = healthy(timings__stall_ms=25.0, timings__stall_ms_low=5.0, timings__stall_ms_high=200.0)
    overhead = next(f for f in analyze(m).findings if f.code.startswith("overhead"))
    assert overhead.uncertain is not None and "both sides" in overhead.uncertain


def test_diagnose_is_sure_when_the_stall_is_known() -> None:
    m = healthy(timings__stall_ms_low=8.0, timings__stall_ms_high=10.0)
    m = dataclasses.replace(m, timings=dataclasses.replace(m.timings, plain_step_ms_spread=0.5))
    analysis = analyze(m)
    assert all(f.uncertain is None for f in analysis.findings)
    assert analysis.verdict == "no changes needed"
