"""`aiockpt diagnose`: real runs on the CPU (report structure, advice that follows the
inputs), and the rules that turn numbers into advice, checked against crafted numbers.

Timings are never asserted: on a CI machine they mean little. What is asserted is what the
inputs decide (a state that cannot persist within one 1 ms step is a backlog; 16 chunks on
2 writer threads queue) and the arithmetic of the rules."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

import aiockpt
from aiockpt.cli.main import build_parser, main
from aiockpt.tools.diagnose import build_config, report
from aiockpt.tools.diagnose_advice import (
    DEFAULT_INTERVAL_STEPS,
    analyze,
    checkpoint_interval,
    frequency_figures,
    pipeline_seconds,
    writers_needed,
)
from aiockpt.tools.diagnose_data import (
    Disk,
    IntervalRun,
    Measurements,
    Memory,
    Setup,
    Thresholds,
    Timings,
)

SECTIONS = {"frequency", "queueing", "copy", "memory"}
FAST = ("--rounds", "1", "--num-steps", "6")


def diagnose(capsys: pytest.CaptureFixture[str], directory: Path, *argv: str) -> dict[str, Any]:
    code = main(["diagnose", "--directory", str(directory), *FAST, *argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def codes(document: dict[str, Any]) -> set[str]:
    return {item["code"] for item in document["advice"]}


# -- real runs ------------------------------------------------------------------------------


def test_tiny_preset_report_has_every_section_and_leaves_the_directory_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "keep.txt").write_text("the user's")
    document = diagnose(
        capsys, directory, "--preset", "tiny", "--checkpoint-interval", "100000", "--num-steps", "3"
    )
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]  # scratch removed
    assert document["workload"] == "preset tiny" and document["device"] == "cpu"
    assert document["config"]["directory"] == str(directory)
    measured = document["measurements"]
    assert set(measured) == {"setup", "timings", "disk", "interval_run", "memory"}
    setup = measured["setup"]
    assert setup["state_bytes"] > 0 and setup["chunks"] >= 1 and setup["staging_mode"] == "cpu"
    assert setup["interval_steps"] == 100000
    assert setup["interval_source"] == "--checkpoint-interval"
    timings = measured["timings"]
    assert timings["persist_seconds"] > 0 and timings["step_ms"] > 0
    assert timings["chunk_write_ms"] > 0  # every chunk write was timed
    assert (
        measured["disk"]["parallel_write_gbps"] > 0 and measured["disk"]["single_writer_gbps"] > 0
    )
    assert measured["interval_run"]["steps"] == 3 and measured["interval_run"]["requested"] == 0
    assert measured["memory"]["pool_bytes"] >= setup["state_bytes"]
    assert set(document["thresholds"]) >= {"overhead_target", "host_pool_fraction"}
    assert set(document["analysis"]) == SECTIONS
    assert {f["section"] for f in document["findings"]} == SECTIONS
    for finding in document["findings"]:
        assert set(finding) == {
            "section", "code", "advice", "message", "change", "uncertain", "numbers"
        }  # fmt: skip
        assert finding["message"] and finding["advice"] == (finding["change"] is not None)
    # A checkpoint every 100000 steps of a 1.6 MB state is nothing to worry about (on a
    # busy machine the verdict may add that training's own steps vary too much to tell).
    assert document["advice"] == [] and document["verdict"].startswith("no changes needed")


def test_checkpointing_every_1ms_step_advises_on_the_backlog(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    document = diagnose(
        capsys,
        tmp_path / "ckpt",
        *("--step-ms", "1", "--state-gb", "0.02", "--checkpoint-interval", "1"),
    )
    assert not (tmp_path / "ckpt").exists()  # made for the run, removed after it
    assert "backlog" in codes(document)
    frequency = document["analysis"]["frequency"]
    assert frequency["backlog"] is True and frequency["min_interval_steps"] > 1
    backlog = next(a for a in document["advice"] if a["code"] == "backlog")
    assert f"every >= {frequency['min_interval_steps']} steps" in backlog["change"]
    assert "on_backpressure = 'skip'" in backlog["change"]
    run = document["measurements"]["interval_run"]
    assert run["requested"] == 6 and run["committed"] + run["skipped"] == run["requested"]


def test_many_chunks_on_few_writer_threads_advises_on_queueing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    document = diagnose(
        capsys,
        tmp_path / "ckpt",
        *("--step-ms", "2", "--state-gb", "0.004", "--checkpoint-interval", "100000"),
        # One thread: the disk takes more writers than that (tmpfs too: copies on 2 cores).
        *("--max-async", "1", "--chunk-count", "16", "--num-threads", "1"),
    )
    assert document["measurements"]["setup"]["chunks"] == 16
    assert codes(document) == {"writer_threads"}
    advice = document["advice"][0]
    assert advice["numbers"]["waves"] == 16 and advice["numbers"]["num_threads"] == 1
    assert "num_threads >= 16" in advice["change"]
    assert advice["numbers"]["chunk_wait_ms"] is not None  # measured, per chunk
    slots = next(f for f in document["findings"] if f["code"] == "write_slots_ok")
    assert "1 x 16 = 16 write slots >= 16 chunks in flight" in slots["message"]


def test_text_output_ends_with_the_advice(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(
        [
            "diagnose",
            *("--directory", str(tmp_path / "ckpt"), *FAST),
            *("--step-ms", "1", "--state-gb", "0.001", "--no-use-monitor"),
            *("--checkpoint-interval", "100000"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "[diagnose]" in err and "[diagnose]" not in out  # progress goes to stderr
    for title in ("frequency", "Queueing", "Stall", "Memory", "Advice"):
        assert title in out
    assert "set use_monitor = true" in out.split("Advice")[1]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "nothing to diagnose"),
        (["--step-ms", "60"], "--step-ms and --state-gb go together"),
        (["--preset", "tiny", "--state-gb", "1", "--step-ms", "5"], "both given"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--step-ms", "-1", "--state-gb", "1"], "not a positive number"),
        (["--preset", "tiny", "--checkpoint-interval", "0"], "must be at least 1"),
    ],
)
def test_bad_arguments_fail_with_a_hint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], expected: str
) -> None:
    assert main(["diagnose", "--directory", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and "hint:" in err
    assert list(tmp_path.iterdir()) == []  # failed before touching the directory


def test_a_state_larger_than_memory_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["diagnose", "--directory", str(tmp_path), "--step-ms", "1", "--state-gb", "1e6"])
    assert "more than the" in capsys.readouterr().err


def test_config_file_then_environment_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "aiockpt.toml"
    toml.write_text("[checkpoint]\nmax_async = 3\nchunk_count = 4\nnum_threads = 5\n")
    monkeypatch.setenv("AIOCKPT_NUM_THREADS", "6")
    args = build_parser().parse_args(
        ["diagnose", "--config", str(toml), "--preset", "tiny", "--chunk-size-mb", "64"]
    )
    config = build_config(args)
    assert (config.max_async, config.num_threads) == (3, 6)
    assert (config.chunk_size_mb, config.chunk_count) == (64, None)  # the flag wins
    args = build_parser().parse_args(
        ["diagnose", "--config", str(toml), "--preset", "tiny", "--no-use-monitor"]
    )
    assert build_config(args).use_monitor is False


# -- the rules, on crafted numbers ------------------------------------------------------------


def healthy(**changes: Any) -> Measurements:
    """A 4.46 GB state on a GPU, 60 ms steps, persisted in 2 s, checkpointed every 50 steps:
    the setup docs/BENCHMARKS.md measured, which needs no change. ``changes`` are
    ``group__field=value`` (``timings__step_ms=10``) or config keys."""
    groups: dict[str, dict[str, Any]] = {
        "setup": {},
        "timings": {},
        "disk": {},
        "run": {},
        "memory": {},
    }
    config_changes = {}
    for key, value in changes.items():
        group, _, name = key.partition("__")
        if name:
            groups[group][name] = value
        else:
            config_changes[key] = value
    config = aiockpt.Config(chunk_size_mb=256).replace(**config_changes)
    setup = Setup(
        config=config,
        device="NVIDIA H200",
        on_gpu=True,
        state_bytes=4_460_000_000,
        chunks=18,
        staging_mode="gpu",
        interval_steps=50,
        interval_source="interval_steps",
    )
    timings = Timings(
        step_ms=60.0,
        call_ms=8.4,
        call_ms_p99=10.5,
        stall_ms=9.0,
        stall_ms_p99=23.0,
        state_dict_ms=5.1,
        staging_ms=1.5,
        capture_ms=8.3,
        persist_seconds=2.0,
        write_seconds=1.9,
        commit_ms=12.0,
        first_checkpoint_ms=5100.0,
        copy_gbps=40.0,
        plain_step_ms=61.0,
        persisting_step_ms=62.0,
        persisting_steps=100,
        chunk_write_ms=800.0,
        chunk_wait_ms=0.1,
        chunk_wait_ms_max=0.3,
    )
    disk = Disk(parallel_write_gbps=2.4, writers=8, single_writer_gbps=0.6, d2h_pinned_gbps=55.0)
    memory = Memory(
        available_bytes=120_000_000_000,
        pool_bytes=4_608_000_000,
        pinned=True,
        gpu_free_bytes=60_000_000_000,
        gpu_total_bytes=80_000_000_000,
        gpu_room_bytes=52_000_000_000,
        gpu_headroom_fraction=0.1,
        gpu_staging_bytes=4_460_000_000,
        auto_staging="gpu",
    )
    return Measurements(
        dataclasses.replace(setup, **groups["setup"]),
        dataclasses.replace(timings, **groups["timings"]),
        dataclasses.replace(disk, **groups["disk"]),
        IntervalRun(**groups["run"]),
        dataclasses.replace(memory, **groups["memory"]),
    )


def advice_of(m: Measurements) -> dict[str, Any]:
    return {f.code: f for f in analyze(m).advice}


def test_the_benchmarked_setup_needs_no_change() -> None:
    analysis = analyze(healthy())
    assert analysis.advice == [] and analysis.verdict == "no changes needed"
    lines = {f.code: f.line() for f in analysis.findings}
    assert (
        "max_async x chunks = 2 x 18 = 36 write slots >= 36 chunks in flight"
        in (lines["write_slots_ok"])
    )
    assert lines["host_pool_ok"] == "pinned pool 4.61 GB of 120 GB available: fine"
    assert "'auto' picks gpu" in lines["staging_ok"]
    # 18 chunks on 8 threads queue, but 8 threads already fill a disk that takes 4 writers.
    assert "more would not persist faster" in lines["writer_threads_ok"]


def test_backlog_arithmetic() -> None:
    # Every 10 steps x 60 ms = 0.6 s, while the disk needs 4.46 GB / 2.4 GB/s = 1.86 s.
    m = healthy(setup__interval_steps=10)
    service = 4.46 / 2.4
    assert pipeline_seconds(m) == pytest.approx(service)  # disk-bound, not 2 s / 2
    f = frequency_figures(m, Thresholds())
    assert f.backlog and f.block_wait_ms == pytest.approx((service - 0.6) * 1e3)
    assert f.min_interval_steps == math.ceil(service / 0.06) == 31
    assert f.skip_keeps_one_in == 4 and f.skip_interval_steps == 40
    backlog = advice_of(m)["backlog"]
    assert backlog.change == (
        "checkpoint every >= 31 steps, or set on_backpressure = 'skip' (achieved interval ~ "
        "40 steps)"
    )
    assert backlog.numbers["block_wait_ms"] == pytest.approx((service - 0.6) * 1e3)
    # Already skipping: the advice is the interval, and the cost is per achieved interval.
    skipping = healthy(setup__interval_steps=10, on_backpressure="skip")
    assert "'skip'" not in advice_of(skipping)["backlog"].change
    assert frequency_figures(skipping, Thresholds()).effective_interval_steps == 40


def test_backlog_from_latency_suggests_more_checkpoints_in_flight() -> None:
    # A fast disk but a slow checkpoint (2 s): overlapping more of them keeps up.
    m = healthy(setup__interval_steps=10, disk__parallel_write_gbps=100.0, max_async=1)
    assert pipeline_seconds(m) == pytest.approx(2.0)
    assert advice_of(m)["backlog"].change.endswith("or max_async = 4")


def test_overhead_arithmetic_every_step_against_every_ten() -> None:
    # A 64 ms checkpoint every step costs more than a 277 ms one every 10 steps.
    same_steps = {"timings__persist_seconds": 0.05, "timings__persisting_step_ms": 61.0}
    cheap_often = healthy(setup__interval_steps=1, timings__stall_ms=64.0, **same_steps)
    dear_seldom = healthy(setup__interval_steps=10, timings__stall_ms=277.0, **same_steps)
    often, seldom = (frequency_figures(m, Thresholds()) for m in (cheap_often, dear_seldom))
    assert not often.backlog and not seldom.backlog
    assert often.overhead_ms_per_100_steps > seldom.overhead_ms_per_100_steps
    assert often.overhead_fraction > 1.0
    overhead = advice_of(cheap_often)["overhead"]
    assert "64 ms x 100 checkpoints = 6.40 s per 100 steps of 6.00 s training" in overhead.message
    # 64 ms within 5% of 60 ms steps: every ceil(64 / 3) = 22 steps.
    assert overhead.change.startswith("checkpoint every >= 22 steps")
    assert overhead.numbers["target_interval_steps"] == 22


def test_max_overhead_sets_the_target() -> None:
    m = healthy(max_overhead=0.001)
    assert Thresholds.for_config(m.setup.config).overhead_target == 0.001
    assert "overhead" in advice_of(m)


def test_writer_threads_follow_the_config_unless_the_disk_is_full() -> None:
    sixteen = {"setup__chunks": 16, "chunk_size_mb": None, "chunk_count": 16}
    few = healthy(num_threads=2, **sixteen)
    advice = advice_of(few)["writer_threads"]
    assert advice.numbers["waves"] == 8
    assert advice.change == few.setup.config.queueing_warnings(16)[0]
    assert "disk_parallelism" not in advice_of(few)  # said once
    assert "writer_threads" not in advice_of(healthy(num_threads=16, **sixteen))
    # 4 threads are the 4 writers the disk takes, writing at 90% of it: no more needed.
    full = healthy(num_threads=4, timings__write_seconds=4.46 / 2.16, **sixteen)
    assert "writer_threads" not in advice_of(full)


def test_disk_parallelism_only_when_writes_hold_training_back() -> None:
    slow = {
        "num_threads": 2,
        "setup__chunks": 2,
        "timings__write_seconds": 4.46 / 0.9,
        "timings__persist_seconds": 5.0,
    }
    assert writers_needed(healthy().disk) == 4
    advice = advice_of(healthy(**slow, setup__interval_steps=10))["disk_parallelism"]
    assert advice.change == "num_threads >= 4 and chunk_count >= 4 (chunk_size_mb <= 1.06e+03)"
    # The same slow writes, but checkpoints far apart: persisting faster would not help.
    assert "disk_parallelism" not in advice_of(healthy(**slow, setup__interval_steps=1000))


def test_contention_advice_needs_slower_steps_and_idle_writers() -> None:
    slowed = healthy(
        setup__interval_steps=40,
        timings__persisting_step_ms=80.0,
        disk__single_writer_gbps=1.2,  # two writers fill the disk
    )
    advice = advice_of(slowed)["fewer_writer_threads"]
    assert advice.change.startswith("num_threads = 2 and chunk_count = 2")
    assert advice.numbers["step_inflation_fraction"] == pytest.approx(19 / 61)
    # Steps as much slower, but checkpoints so far apart that it costs 1%: leave it.
    seldom = healthy(setup__interval_steps=1000, timings__persisting_step_ms=80.0)
    assert not advice_of(seldom)


def test_use_monitor_false_is_one_blocking_call() -> None:
    m = healthy(use_monitor=False, timings__call_ms=2000.0, timings__stall_ms=2000.0)
    advice = advice_of(m)
    assert "backlog" not in advice
    assert advice["use_monitor"].change == (
        "set use_monitor = true: training then waits only for the capture (~8.3 ms)"
    )


def test_memory_rules() -> None:
    tight = healthy(memory__available_bytes=6_000_000_000)
    pool = advice_of(tight)["host_pool"]
    assert pool.numbers["pool_fraction"] == pytest.approx(4.608 / 6)
    assert pool.change == "pinned_ratio = 0.67 (a pool of ~2.99 GB)"
    forced = advice_of(healthy(staging="host"))["host_staging_forced"]
    assert forced.change == "staging = 'auto' (gpu staging: one device-to-device copy)"
    assert "81.1 ms at the pinned rate" in forced.message
    no_room = healthy(
        staging="gpu", memory__gpu_room_bytes=1_000_000_000, memory__auto_staging="host"
    )
    assert "gpu_staging_no_room" in advice_of(no_room)
    auto_host = healthy(memory__gpu_room_bytes=1_000_000_000, memory__auto_staging="host")
    line = next(f for f in analyze(auto_host).findings if f.code == "staging_ok").message
    assert "'auto' picks host as the 4.46 GB buffer does not fit in the 1 GB free" in line


def test_checkpoint_interval_follows_the_configured_policy() -> None:
    steps, stalls = [0.06] * 10, [(5.0, 5.0)] + [(0.009, 2.0)] * 3  # first: setup
    config = aiockpt.Config()
    assert checkpoint_interval(config, 7, steps, stalls) == (7, "--checkpoint-interval")
    assert checkpoint_interval(config, None, steps, stalls)[0] == DEFAULT_INTERVAL_STEPS
    assert checkpoint_interval(config.replace(interval_steps=25), None, steps, stalls)[0] == 25
    assert checkpoint_interval(config.replace(interval_seconds=3.0), None, steps, stalls)[0] == 50
    # max_overhead 5%: ceil(9 ms / (0.05 x 60 ms)) = 3 steps, the first stall left out.
    interval, source = checkpoint_interval(config.replace(max_overhead=0.05), None, steps, stalls)
    assert interval == 3 and source.startswith("max_overhead = 0.05")


def test_report_is_strict_json_even_with_missing_figures() -> None:
    m = healthy(timings__stall_ms_p99=float("nan"), timings__plain_step_ms=None)
    th = Thresholds()
    document = report("crafted", m, th, analyze(m, th))
    json.dumps(document, allow_nan=False)
    assert document["measurements"]["timings"]["stall_ms_p99"] is None


def test_help_explains_the_sections(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["diagnose", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("frequency", "queueing", "copy", "memory", "examples:", "--checkpoint-interval"):
        assert word in out


def test_memory_tier_that_fits_in_ram_is_fine() -> None:
    m = healthy(
        memory={"keep_last": 2},
        memory__memory_tier_directory="/dev/shm/aiockpt-x",
        memory__memory_tier_free_bytes=100_000_000_000,
    )
    lines = {f.code: f.line() for f in analyze(m).findings}
    assert lines["memory_tier_ok"] == (
        "the memory tier holds up to 6 checkpoints (keep_last = 2 + 4 in flight or being "
        "copied on) x 4.46 GB = 26.8 GB: fits in RAM"
    )


def test_memory_tier_larger_than_its_tmpfs_is_advice() -> None:
    m = healthy(
        memory={"keep_last": 4},
        memory__memory_tier_directory="/dev/shm/aiockpt-x",
        memory__memory_tier_free_bytes=30_000_000_000,
    )
    finding = advice_of(m)["memory_tier"]
    assert "8 checkpoints" in finding.message and "35.7 GB" in finding.message
    assert "free on the tmpfs of /dev/shm/aiockpt-x" in finding.message
    assert finding.change == "memory.keep_last = 2"  # 30 GB holds 6 states: 4 are in flight
    tight = healthy(
        memory={"keep_last": 1},
        memory__memory_tier_directory="/dev/shm/aiockpt-x",
        memory__memory_tier_free_bytes=100_000_000_000,
        memory__available_bytes=20_000_000_000,
    )
    finding = advice_of(tight)["memory_tier"]
    assert "of host memory available beside the staging pool" in finding.message
    assert finding.change is not None and "leave out [checkpoint.memory]" in finding.change
