"""Flags from Config's own keys, and one precedence for every way of making a Config.

Highest first: keyword arguments or flags, then ``AIOCKPT_*`` variables, then the
``--config`` file, then the defaults. Parsing only: no benchmark or diagnosis runs here.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from aiockpt._util.console import CliError
from aiockpt.cli.main import build_parser as cli_parser
from aiockpt.cli.main import main as cli_main
from aiockpt.config import (
    _KEYS,
    Config,
    add_config_arguments,
    config_from_arguments,
    resolve_config,
)
from aiockpt.errors import ConfigError
from aiockpt.tools import bench, bench_cli, bench_ranks, diagnose

BuildConfig = Callable[[list[str], Path], Config]


def _bench(argv: list[str], root: Path) -> Config:
    return bench.build_config(bench_cli.build_parser().parse_args(argv), root)


def _bench_subcommand(argv: list[str], root: Path) -> Config:
    return bench.build_config(cli_parser().parse_args(["bench", *argv]), root)


def _diagnose(argv: list[str], root: Path) -> Config:
    args = cli_parser().parse_args(
        ["diagnose", "--preset", "tiny", "--directory", str(root), *argv]
    )
    return diagnose.build_config(args)


def _bench_ranks(argv: list[str], root: Path) -> Config:
    return bench_ranks.build_config(bench_ranks.build_parser().parse_args(argv), root)


TOOLS: dict[str, BuildConfig] = {
    "bench": _bench,
    "aiockpt bench": _bench_subcommand,
    "diagnose": _diagnose,
    "bench_ranks": _bench_ranks,
}


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "aiockpt.toml"
    path.write_text("[checkpoint]\n" + text)
    return str(path)


@pytest.mark.parametrize("tool", TOOLS)
def test_flag_beats_env_beats_file_beats_default(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = toml(tmp_path, 'max_async = 3\nnum_threads = 6\non_backpressure = "skip"\n')
    monkeypatch.setenv("AIOCKPT_MAX_ASYNC", "4")
    monkeypatch.setenv("AIOCKPT_NUM_THREADS", "7")
    config = TOOLS[tool](["--config", file, "--max-async", "5"], tmp_path / "run")
    assert config.max_async == 5  # flag over env over file
    assert config.num_threads == 7  # env over file
    assert config.on_backpressure == "skip"  # file over default
    assert config.durable is True and config.chunk_size_mb is None  # defaults


@pytest.mark.parametrize("tool", TOOLS)
def test_without_flags_every_tool_has_configs_defaults(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TOOLS[tool]([], tmp_path / "run")
    # Only what a tool must decide itself differs (its scratch directory; bench_ranks
    # keeps two checkpoints); bench_ranks used to skip on backpressure, bench to block.
    fixed = {"directory", "keep_last"}
    mine = {k: v for k, v in config.to_dict().items() if k not in fixed}
    defaults = {k: v for k, v in Config.from_env(environ={}).to_dict().items() if k not in fixed}
    assert mine == defaults and config.on_backpressure == "block"


@pytest.mark.parametrize("tool", ["bench", "aiockpt bench", "bench_ranks"])
def test_a_tools_own_directory_beats_the_environment_and_the_file(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # These tools delete what they write: a directory of real checkpoints named by
    # AIOCKPT_DIRECTORY or a file must never be where they write.
    monkeypatch.setenv("AIOCKPT_DIRECTORY", str(tmp_path / "precious"))
    file = toml(tmp_path, f'directory = "{tmp_path / "precious"}"\n')
    config = TOOLS[tool](["--config", file], tmp_path / "run")
    assert tmp_path / "run" in (config.directory, config.directory.parent)


def test_diagnose_takes_the_directory_from_flag_then_env_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = toml(tmp_path, f'directory = "{tmp_path / "file"}"\n')
    args = cli_parser().parse_args(["diagnose", "--preset", "tiny", "--config", file])
    assert diagnose.build_config(args).directory == tmp_path / "file"
    monkeypatch.setenv("AIOCKPT_DIRECTORY", str(tmp_path / "env"))
    assert diagnose.build_config(args).directory == tmp_path / "env"
    args = cli_parser().parse_args(
        ["diagnose", "--preset", "tiny", "--config", file, "--directory", str(tmp_path / "flag")]
    )
    assert diagnose.build_config(args).directory == tmp_path / "flag"


@pytest.mark.parametrize("tool", TOOLS)
def test_a_chunk_flag_replaces_the_other_chunk_key_below_it(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = toml(tmp_path, "chunk_size_mb = 64\n")
    monkeypatch.setenv("AIOCKPT_CHUNK_SIZE_MB", "32")
    config = TOOLS[tool](["--config", file, "--chunk-count", "4"], tmp_path / "run")
    assert (config.chunk_count, config.chunk_size_mb) == (4, None)
    with pytest.raises(SystemExit) as exited:  # both on one command line: bad usage
        TOOLS[tool](["--chunk-count", "4", "--chunk-size-mb", "8"], tmp_path / "run")
    assert exited.value.code == 2


@pytest.mark.parametrize("tool", TOOLS)
def test_a_bad_setting_anywhere_names_it(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        TOOLS[tool](["--max-async", "0"], tmp_path / "run")
    assert exited.value.code == 2
    assert "--max-async" in capsys.readouterr().err
    # The tools refuse settings from the environment or a file with an error of their
    # own (a CliError for the commands), naming the variable or the key.
    monkeypatch.setenv("AIOCKPT_NUM_THREADS", "many")
    with pytest.raises((ConfigError, CliError), match="AIOCKPT_NUM_THREADS='many'"):
        TOOLS[tool]([], tmp_path / "run")
    monkeypatch.delenv("AIOCKPT_NUM_THREADS")
    bad_file = toml(tmp_path, "max_async = 0\n")
    with pytest.raises((ConfigError, CliError), match="max_async = 0 is out of range"):
        TOOLS[tool](["--config", bad_file], tmp_path / "run")


# -- the generated flags --------------------------------------------------------------------

# A value written as text for each key, and what Config makes of it.
SAMPLES: dict[str, tuple[str, object]] = {
    "directory": ("ckpt/run-1", Path("ckpt/run-1")),
    "interval_steps": ("50", 50),
    "interval_seconds": ("1.5", 1.5),
    "max_overhead": ("0.05", 0.05),
    "keep_last": ("none", None),
    "max_async": ("4", 4),
    "chunk_size_mb": ("64", 64.0),
    "chunk_count": ("16", 16),
    "num_threads": ("12", 12),
    "pinned_ratio": ("2", 2.0),
    "staging": ("host", "host"),
    "on_backpressure": ("skip", "skip"),
    "on_error": ("warn", "warn"),
    "rank_timeout_s": ("60", 60.0),
    "preemption_signals": ("SIGTERM, usr1", ("SIGTERM", "SIGUSR1")),
    "preemption_grace_s": ("12.5", 12.5),
}
BOOLS = ("use_monitor", "durable", "incremental", "verbose")
# Tiers are tables of their own keys: TOML sub-tables or dicts, never one flag's value.
TABLES = ("memory", "remote")
FLAG_KEYS = [key for key in _KEYS if key not in TABLES]


def all_flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_config_arguments(parser, FLAG_KEYS)
    return parser


def test_every_key_has_a_flag_of_its_type() -> None:
    assert set(SAMPLES) | set(BOOLS) | set(TABLES) == set(_KEYS)
    for key, (text, value) in SAMPLES.items():
        if key == "chunk_size_mb":
            continue  # exclusive with chunk_count, checked below
        args = all_flags().parse_args(["--" + key.replace("_", "-"), text])
        config = config_from_arguments(args, FLAG_KEYS)
        assert getattr(config, key) == value, key
    for key in BOOLS:
        flag = "--" + key.replace("_", "-")
        for argv, value in (([flag], True), (["--no-" + flag[2:]], False)):
            config = config_from_arguments(all_flags().parse_args(argv), FLAG_KEYS)
            assert getattr(config, key) is value, key
    args = all_flags().parse_args(["--chunk-size-mb", "64"])
    assert config_from_arguments(args, FLAG_KEYS).chunk_size_mb == 64.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-async", "65"], "max_async = 65 is out of range: expected an integer from 1 to 64"),
        (["--num-threads", "two"], "expected an integer from 1 to 256"),
        (["--num-threads", "none"], "expected an integer from 1 to 256"),
        (["--pinned-ratio", "nan"], "pinned_ratio = nan is out of range"),
        (["--staging", "cpu"], "invalid choice: 'cpu'"),
        (["--directory", ""], "directory = '' is empty"),
    ],
)
def test_a_bad_flag_is_a_usage_error_naming_what_is_allowed(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        all_flags().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err and message in err


def test_flag_help_comes_from_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        all_flags().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    defaults = Config.from_env(environ={})
    for key in FLAG_KEYS:
        assert f"Config key {key};" in out, key
    assert (
        f"--max-async N checkpoints in flight at once (Config key max_async; default "
        f"{defaults.max_async})" in out
    )
    assert "--staging {auto,gpu,host}" in out and "--keep-last N|none" in out


def test_unknown_key_for_flags_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="did you mean 'max_async'"):
        add_config_arguments(argparse.ArgumentParser(), ["max_asyn"])


# -- Config(...) and the environment --------------------------------------------------------


def test_config_reads_the_environment_for_keys_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOCKPT_MAX_ASYNC", "8")
    monkeypatch.setenv("AIOCKPT_NUM_THREADS", "16")
    monkeypatch.setenv("AIOCKPT_KEEP_LAST", "none")
    config = Config(max_async=4)
    assert (config.max_async, config.num_threads, config.keep_last) == (4, 16, None)
    assert Config().max_async == 8
    assert resolve_config(None, "Checkpointer").num_threads == 16


def test_config_keyword_for_one_chunk_key_drops_the_others_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIOCKPT_CHUNK_SIZE_MB", "64")
    assert Config().chunk_size_mb == 64
    config = Config(chunk_count=4)
    assert (config.chunk_count, config.chunk_size_mb) == (4, None)


@pytest.mark.parametrize(
    ("var", "raw", "fragment"),
    [
        ("AIOCKPT_MAX_ASYNC", "two", "expected an integer from 1 to 64"),
        ("AIOCKPT_USE_MONITOR", "maybe", "expected 1/0, true/false, yes/no or on/off"),
        ("AIOCKPT_STAGING", "cpu", "staging = 'cpu' is not allowed"),
        ("AIOCKPT_MAX_ASNYC", "4", "did you mean 'AIOCKPT_MAX_ASYNC'"),
    ],
)
def test_config_refuses_a_bad_variable_as_from_env_does(
    var: str, raw: str, fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(var, raw)
    with pytest.raises(ConfigError) as from_config:
        Config(directory="ckpt")
    with pytest.raises(ConfigError) as from_env:
        Config.from_env()
    assert str(from_config.value) == str(from_env.value)
    assert var in str(from_config.value) and fragment in str(from_config.value)


def test_a_misspelt_keyword_is_a_config_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'max_asnyc'.*did you mean 'max_async'"):
        Config(max_asnyc=4)  # type: ignore[call-arg]


def test_a_made_config_keeps_its_values_when_the_environment_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = Config(max_async=3)
    monkeypatch.setenv("AIOCKPT_NUM_THREADS", "16")
    changed = config.replace(max_async=4)
    assert (changed.max_async, changed.num_threads) == (4, config.num_threads)
    assert pickle.loads(pickle.dumps(config)) == config
    assert dataclasses.asdict(pickle.loads(pickle.dumps(config))) == dataclasses.asdict(config)


def test_from_toml_without_env_ignores_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOCKPT_NUM_THREADS", "16")
    file = toml(tmp_path, "max_async = 3\n")
    assert Config.from_toml(file, env=False).num_threads == 8
    assert Config.from_toml(file).num_threads == 16
    assert Config.from_toml(file, num_threads=4).num_threads == 4


# -- bench as a subcommand ------------------------------------------------------------------


def test_bench_help_is_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["bench", "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert "aiockpt bench" in out and "examples:" in out and "--config TOML" in out


def test_bench_usage_errors_are_the_clis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A CliError of bench (a bad --systems) goes through the command line's own mapping.
    argv = ["bench", "--cpu", "--systems", "zfs", "--directory", str(tmp_path / "run")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "aiockpt bench: error: --systems 'zfs'" in err
    assert not (tmp_path / "run").exists()


# -- one helper where there were several ----------------------------------------------------


def test_bytes_in_human_units_one_formatter_two_conventions() -> None:
    from aiockpt._util.console import human_bytes as console_bytes
    from aiockpt._util.units import human_bytes
    from aiockpt.tools.bench_report import _gb
    from aiockpt.tools.diagnose_advice import format_bytes

    assert console_bytes is human_bytes
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 GiB",
    ]
    assert [human_bytes(n, decimal=True) for n in (999, 1500, 4.46e9, 120e9)] == [
        "999 B",
        "1.5 kB",
        "4.46 GB",
        "120 GB",
    ]
    assert format_bytes(4.61e9) == _gb(4.61e9) == "4.61 GB"
    assert _gb(None) == "-"


def test_median_and_p99_of_nothing_are_none() -> None:
    from aiockpt._util.stats import median, p99

    assert median([]) is None and p99(iter([])) is None
    assert median(x for x in (3.0, 1.0, 2.0)) == 2.0
    assert p99(range(100)) == 98 and p99([5.0]) == 5.0


def test_the_lock_helper_tells_held_from_failed(tmp_path: Path) -> None:
    import os

    from aiockpt.storage.locking import try_lock, unlock

    path = tmp_path / ".aiockpt.lock"
    path.write_text("")
    writer = os.open(path, os.O_RDWR)
    probe = os.open(path, os.O_RDONLY)  # another open file: flock sees another holder
    try:
        assert try_lock(writer)
        assert not try_lock(probe, shared=True)
        unlock(writer)
        assert try_lock(probe, shared=True)
        assert not try_lock(writer)  # a shared holder keeps an exclusive one out
        unlock(probe)
    finally:
        os.close(writer)
        os.close(probe)
    with pytest.raises(OSError):  # not "held": a real failure is raised
        try_lock(writer)


def test_a_live_writer_is_seen_by_the_probe(tmp_path: Path) -> None:
    import os

    from aiockpt import SyncCheckpointer
    from aiockpt.cli.scan import WriterState, probe_writer

    assert not probe_writer(tmp_path).live
    model = torch.nn.Linear(2, 2)
    with SyncCheckpointer(Config(directory=tmp_path), model=model) as ckpt:
        ckpt.checkpoint(1).wait()
        assert probe_writer(tmp_path) == WriterState(True, os.getpid())
    assert not probe_writer(tmp_path).live


def test_one_workload_for_bench_and_diagnose() -> None:
    from aiockpt.tools import bench_ranks, bench_systems, diagnose_measure, workloads

    assert bench_systems.Workload is diagnose_measure.Workload is workloads.Workload
    assert bench_systems.sync is diagnose_measure.sync is bench_ranks.sync is workloads.sync
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    preset = workloads.preset_workload("tiny", cpu)
    preset.warm_up(1)
    model = preset.model
    # The head is tied to the embedding: one tensor, counted once.
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.state_dict().values()}
    optimizer_bytes = sum(
        t.numel() * t.element_size()
        for state in preset.optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    assert preset.state_bytes() == sum(unique.values()) + optimizer_bytes
    assert set(preset.state()) == {"model", "optimizer"} and preset.device == cpu
    synthetic = diagnose_measure.synthetic_workload(1.0, 1 << 20, cpu)
    assert set(synthetic.state()) == {"model"}
    assert synthetic.state_bytes() == 1 << 20 and "1.05 MB" in synthetic.name
