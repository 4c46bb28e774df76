"""``aiockpt bench``: aiockpt, torch.save and DCP side by side, against this machine's limits.

One process, one model, every figure measured in the same run:

1. build the model (a preset, or ``--model package.module:function``) and train a few steps;
2. measure the limits: device-to-device, device-to-host and host-to-device copy rates,
   host memcpy, parallel fsync'd and page-cache writes and cold reads of the directory;
3. warm up every system with a first checkpoint (it allocates and pins what later ones
   reuse), recording what it holds;
4. rounds: each system trains ``--steps`` steps with a checkpoint every
   ``--checkpoint-interval`` steps, systems interleaved round by round (A B A B ...) so
   drift in the machine's speed hits them alike; every step is timed;
5. in the last round, right after its training, each system restores from disk with the
   page cache dropped; then its files are deleted and its memory released.

Reported per system, as medians with ratios to every baseline and to the limits:
samples/s, stall per checkpoint (p50, p99), how much slower the checkpointed step was,
persist GB/s, the checkpoint interval achieved, restore time, host and staging memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .._util.console import CliError, TaskProgress, iso_time, task_progress
from .._util.location import local_directory
from .._version import __version__
from ..config import Config, config_from_arguments
from ..errors import ConfigError
from .bench_cli import CONFIG_KEYS, STAGINGS, SYSTEMS, build_parser
from .bench_report import markdown, plot, plot_available
from .bench_summary import summarise
from .bench_systems import (
    AiockptSystem,
    DcpSystem,
    NoCheckpoint,
    System,
    TieredSystem,
    TorchSave,
    cold_starts,
    restore_timed,
    train_round,
    warm_up,
)
from .limits import measure_limits
from .workloads import (
    DEFAULT_INTERVAL,
    DEFAULT_ROUNDS,
    DEFAULT_STEPS,
    PRESETS,
    Preset,
    TinyGPT,
    Workload,
    build_preset,
    load_workload,
    make_step,
    preset_workload,
)

# The presets' names stay importable from here: diagnose and bench_ranks build on them.
__all__ = [
    "PRESETS",
    "Preset",
    "TinyGPT",
    "build_config",
    "build_preset",
    "command",
    "main",
    "make_step",
]


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


class _Phases:
    """Wall time per phase, added up when a phase comes back (restores are spread out)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str, *, log: bool = True) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + spent
            if log:
                self.log(f"{name}: {spent:.1f} s")

    def log(self, message: str) -> None:
        _log(self.args, f"{message} (elapsed {self.elapsed():.1f} s)")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def build_config(args: argparse.Namespace, root: Path) -> Config:
    """The aiockpt systems' settings: flags, AIOCKPT_* variables, --config, defaults.

    The directory is always the bench's own scratch directory ``root``: a directory from
    the environment or a file must never receive (and lose) the bench's files.
    """
    try:
        return config_from_arguments(args, CONFIG_KEYS, directory=root)
    except ConfigError as exc:
        raise CliError(str(exc), code=2) from None


def _factories(
    args: argparse.Namespace, workload: Workload, root: Path, config: Config
) -> list[Callable[[], System]]:
    """One maker per system to measure, in the order asked."""
    makers: list[Callable[[], System]] = []
    for name in args.systems:
        if name == "none":
            makers.append(partial(NoCheckpoint, workload, root / "none"))
        elif name == "torch.save":
            makers.append(partial(TorchSave, workload, root / "torch_save"))
        elif name == "dcp":
            makers.append(partial(DcpSystem, workload, root / "dcp", config.num_threads))
        elif name == "tiered":
            for staging in args.staging:
                directory = root / f"aiockpt-{staging}-tiered"
                makers.append(partial(TieredSystem, workload, directory, staging, config))
        else:
            for staging in args.staging:
                directory = root / f"aiockpt-{staging}"
                makers.append(partial(AiockptSystem, workload, directory, staging, config))
    return makers


def _systems(makers: list[Callable[[], System]]) -> list[System]:
    systems: list[System] = []
    try:
        for make in makers:
            systems.append(make())
    except BaseException:
        for system in systems:
            system.close()
        raise
    return systems


def _resolve(args: argparse.Namespace, device: torch.device) -> None:
    """Fill in the defaults that depend on the device and preset; reject bad usage."""
    if args.model and args.preset:
        raise CliError("--model and --preset both name what to train: give one of them", code=2)
    if args.model:
        defaults = (DEFAULT_STEPS, DEFAULT_INTERVAL, DEFAULT_ROUNDS)
    else:
        if args.preset is None:
            args.preset = "350m" if device.type == "cuda" else "tiny"
        preset = PRESETS[args.preset]
        defaults = (preset.steps, preset.checkpoint_interval, preset.rounds)
    for key, value in zip(("steps", "checkpoint_interval", "rounds"), defaults, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
        elif getattr(args, key) < 1:
            raise CliError(f"--{key.replace('_', '-')} must be at least 1", code=2)
    args.systems = _names(args.systems, SYSTEMS, "--systems")
    staging = "gpu,host" if device.type == "cuda" else "cpu"
    args.staging = _names(args.staging or staging, STAGINGS, "--staging")
    if device.type == "cuda" and "cpu" in args.staging:
        raise CliError("--staging cpu is for CPU training; on a GPU use gpu, host or auto", code=2)
    if device.type == "cpu" and set(args.staging) - {"cpu"}:
        raise CliError(
            f"--staging {','.join(args.staging)} needs a CUDA device; on the CPU use cpu", code=2
        )


def _names(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise CliError(
            f"{option} {text!r}: unknown {unknown or 'empty list'}; "
            f"choose from {', '.join(allowed)}",
            code=2,
        )
    return list(dict.fromkeys(names))  # in the given order, each once


def _settings(args: argparse.Namespace, config: Config, systems: list[System]) -> dict[str, Any]:
    return {
        "steps": args.steps,
        "checkpoint_interval": args.checkpoint_interval,
        "rounds": args.rounds,
        "warmup_steps": args.warmup_steps,
        "systems": [s.name for s in systems],
        "staging": args.staging,
        **{key: getattr(config, key) for key in CONFIG_KEYS},
        "per_system": {s.name: s.settings() for s in systems},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    _resolve(args, device)
    # Bad settings fail before any work; the bench measures a local disk (never a URL).
    config = build_config(args, local_directory(args.directory))
    phases = _Phases(args)
    with phases("build"):
        torch.manual_seed(0)
        workload = (
            load_workload(args.model, device)
            if args.model
            else preset_workload(args.preset, device)
        )
        workload.warm_up(args.warmup_steps)
        state_bytes = workload.state_bytes()
    parameters = sum(p.numel() for p in workload.model.parameters())
    _log(args, f"{workload.name}: {parameters:,} parameters, {state_bytes / 1e6:,.1f} MB of state")
    base = local_directory(args.directory)
    created = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    # A directory of its own inside the one given: the bench deletes only what it made.
    root = Path(tempfile.mkdtemp(prefix="aiockpt-bench-", dir=base))
    systems: list[System] = []
    try:
        with phases("limits"):
            limits = measure_limits(root / "limits", state_bytes, config.num_threads).to_dict()
        _log(args, "limits: " + _limits_line(limits))
        makers = _factories(args, workload, root, config)
        cold: dict[str, Any] = {}
        if args.cold_start:
            with phases("cold start"):
                cold = cold_starts(
                    makers,
                    workload,
                    steps=args.steps,
                    interval=args.checkpoint_interval,
                    device=device,
                    log=partial(_log, args),
                )
        systems = _systems(makers)
        report = _report(args, config, workload, device, parameters, state_bytes, limits, systems)
        report["cold_start"] = cold
        restores = sum(s.checkpoints for s in systems)
        units = (1 + args.rounds) * len(systems) + restores
        with task_progress(units, enabled=not args.json) as progress:
            _measure(args, workload, device, systems, report, phases, progress)
    finally:
        for system in systems:  # closed already, unless the run was cut short
            with contextlib.suppress(Exception):
                system.close()
        shutil.rmtree(root, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                base.rmdir()
    report["phases_s"] = {**phases.seconds, "total": phases.elapsed()}
    summarise(report)
    return report


def _report(
    args: argparse.Namespace,
    config: Config,
    workload: Workload,
    device: torch.device,
    parameters: int,
    state_bytes: int,
    limits: dict[str, Any],
    systems: list[System],
) -> dict[str, Any]:
    return {
        "schema": 2,
        "created": iso_time(time.time()),
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "aiockpt": __version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "model": {
            "name": workload.name,
            "parameters": parameters,
            "state_bytes": state_bytes,
            "samples_per_step": workload.samples_per_step,
        },
        "settings": _settings(args, config, systems),
        "limits": limits,
        "systems": {s.name: {"warm_up": None, "rounds": [], "restore_s": None} for s in systems},
        "failed": {},
    }


def _measure(
    args: argparse.Namespace,
    workload: Workload,
    device: torch.device,
    systems: list[System],
    report: dict[str, Any],
    phases: _Phases,
    progress: TaskProgress,
) -> None:
    results = report["systems"]
    active = list(systems)

    def attempt(system: System, what: str, work: Callable[[], None]) -> None:
        # One system failing (a torch API that differs, a full disk) must not cost the
        # figures of the others: it is reported and left out of the rounds to come.
        try:
            work()
        except Exception as exc:
            report["failed"][system.name] = {
                "during": what,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=-8),
            }
            _log(args, f"{system.name} failed during {what}: {type(exc).__name__}: {exc}")
            active.remove(system)
            with contextlib.suppress(Exception):
                system.close()

    def first(system: System) -> None:
        results[system.name]["warm_up"] = warm_up(system, device)
        record = results[system.name]["warm_up"]["first_checkpoint"]
        if record:
            _log(args, f"warm-up {system.name}: first checkpoint {record['stall_s']:.2f} s")

    def train(system: System, index: int) -> None:
        with phases("rounds", log=False):
            result = train_round(
                system, workload, steps=args.steps, interval=args.checkpoint_interval, device=device
            )
        results[system.name]["rounds"].append(result)
        _log(args, f"round {index + 1} {system.name}: {_brief(result)}")

    def restore(system: System) -> None:
        with phases("restore", log=False):
            seconds = restore_timed(system, device)
        results[system.name]["restore_s"] = seconds
        _log(args, f"restore {system.name}: {seconds:.2f} s")

    with phases("warm-up"):
        for system in list(active):
            progress.show(f"warm-up: {system.name}")
            attempt(system, "warm-up", partial(first, system))
            progress.advance()
    for index in range(args.rounds):
        last = index == args.rounds - 1
        start = time.perf_counter()
        for system in list(active):
            progress.show(f"round {index + 1}/{args.rounds}: {system.name}")
            attempt(system, f"round {index + 1}", partial(train, system, index))
            progress.advance()
            if last and system.checkpoints and system in active:
                progress.show(f"restore: {system.name}")
                attempt(system, "restore", partial(restore, system))
                progress.advance()
            if system in active:
                attempt(system, "cleanup", system.discard)
            if last and system in active:
                system.close()  # its memory goes back before the next system's round
        spent = time.perf_counter() - start
        left = args.rounds - 1 - index
        phases.log(
            f"round {index + 1}/{args.rounds}: {spent:.1f} s"
            + (f", about {spent * left:.0f} s to go" if left else "")
        )
    for name in report["failed"]:
        del results[name]


def _limits_line(limits: dict[str, Any]) -> str:
    return ", ".join(
        f"{key.removesuffix('_gbps')} {value:.2f} GB/s"
        for key, value in limits.items()
        if key.endswith("_gbps") and value is not None
    )


def _brief(result: dict[str, Any]) -> str:
    stalls = [c["stall_s"] * 1e3 for c in result["checkpoints"] if not c["skipped"]]
    text = f"{result['samples_per_second']:.1f} samples/s"
    if stalls:
        text += f", stall {min(stalls):.1f}-{max(stalls):.1f} ms"
    skipped = sum(c["skipped"] for c in result["checkpoints"])
    return text + (f", {skipped} skipped" if skipped else "")


def _write(report: dict[str, Any], args: argparse.Namespace) -> None:
    text = markdown(report)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        if plot_available():
            plot(report, args.plot)
        else:
            print(
                f"aiockpt bench: matplotlib is not installed, so no plot was drawn in "
                f"{args.plot}; everything else was written. pip install 'aiockpt[bench]'",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(text, end="")


def _load(path: str) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"--from-json {path}: cannot read a report: {exc}", code=2) from exc
    if not isinstance(report, dict) or report.get("schema") != 2:
        raise CliError(
            f"--from-json {path}: not a report of this version of aiockpt bench (schema 2)",
            hint="run the bench again with --output FILE",
            code=2,
        )
    return report


def command(args: argparse.Namespace) -> int:
    """``aiockpt bench`` with parsed arguments; bad usage raises CliError."""
    if args.from_json:
        _write(_load(args.from_json), args)
        return 0
    if args.plot and not plot_available():
        print(
            "aiockpt bench: matplotlib is not installed: the run goes on, but --plot will "
            "draw nothing (pip install 'aiockpt[bench]')",
            file=sys.stderr,
        )
    report = run(args)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, allow_nan=False))
    _write(report, args)
    for name, failure in report["failed"].items():
        note = f"aiockpt bench: {name} failed during {failure['during']}, left out of the report"
        print(f"{note}:\n{failure['traceback']}", file=sys.stderr)
    return 1 if report["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aiockpt.tools.bench``: the same as ``aiockpt bench``."""
    args = build_parser().parse_args(argv)
    try:
        return command(args)
    except CliError as exc:
        print(f"aiockpt bench: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
