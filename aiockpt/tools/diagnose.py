"""``aiockpt diagnose``: what will slow training down under these settings, and what to change.

From a config (a TOML file, the environment, flags) and a model (one of ``aiockpt
bench``'s presets, or the user's own step time and state size), one short run on the
target directory measures checkpoint frequency against persist time, queueing of chunks
and writer threads, the stall and the contention while a checkpoint persists, and
memory headroom; :mod:`aiockpt.tools.diagnose_advice` turns the numbers into findings and
advice. The run happens in a scratch directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from .._util.console import json_number, note
from ..config import Config, add_config_arguments, config_from_arguments
from ..errors import ConfigError, UsageError
from .diagnose_advice import analyze, format_bytes
from .diagnose_data import Analysis, Measurements, Thresholds

if TYPE_CHECKING:
    import torch

    from .workloads import Workload

__all__ = ["CONFIG_KEYS", "add_arguments", "build_config", "report", "run"]

# The Config keys that diagnose takes as flags: the ones its measurements depend on.
CONFIG_KEYS = (
    "directory",
    "chunk_count",
    "chunk_size_mb",
    "max_async",
    "num_threads",
    "staging",
    "pinned_ratio",
    "on_backpressure",
    "use_monitor",
)

SECTIONS = {
    "frequency": "Checkpoint frequency and backlog",
    "queueing": "Queueing: write slots, writer threads, the disk",
    "copy": "Stall, copies and contention",
    "memory": "Memory headroom and staging",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to diagnose (one of)")
    what.add_argument(
        "--preset", metavar="NAME", help="a model of `aiockpt bench`: tiny, 350m, 1.3b"
    )
    what.add_argument("--step-ms", type=float, metavar="X", help="your training step, in ms")
    what.add_argument("--state-gb", type=float, metavar="Y", help="your checkpoint state, in GB")
    knobs = parser.add_argument_group("settings (override AIOCKPT_* variables and --config)")
    add_config_arguments(knobs, CONFIG_KEYS)
    knobs.add_argument(
        "--checkpoint-interval", type=int, metavar="STEPS", help="checkpoint every STEPS steps"
    )
    run_group = parser.add_argument_group("the run")
    run_group.add_argument(
        "--num-steps",
        type=int,
        default=50,
        metavar="N",
        help="steps trained at the checkpoint interval (default 50)",
    )
    run_group.add_argument(
        "--rounds", type=int, default=3, metavar="N", help="isolated checkpoints (default 3)"
    )
    run_group.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        metavar="S",
        help="stop the interval run after this long (default 120)",
    )
    run_group.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead of text"
    )


def build_config(args: argparse.Namespace) -> Config:
    """The settings of the flags, the AIOCKPT_* variables and the --config file."""
    try:
        return config_from_arguments(args, CONFIG_KEYS)
    except ConfigError as exc:
        raise ConfigError(
            str(exc), hint="fix that setting in the file, the AIOCKPT_* variable or the flag"
        ) from exc


def _check_args(args: argparse.Namespace) -> None:
    from .presets import PRESETS

    synthetic = args.step_ms is not None or args.state_gb is not None
    if args.preset is not None and synthetic:
        raise UsageError(
            "--preset and --step-ms/--state-gb both given",
            hint="diagnose a preset model, or your own step time and state size, not both",
        )
    if args.preset is None and not synthetic:
        raise UsageError(
            "nothing to diagnose",
            hint="pass --preset tiny|350m|1.3b, or your own --step-ms X --state-gb Y",
        )
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(
            f"unknown preset {args.preset!r}", hint=f"one of: {', '.join(sorted(PRESETS))}"
        )
    if synthetic and (args.step_ms is None or args.state_gb is None):
        raise UsageError(
            "--step-ms and --state-gb go together",
            hint="measure both in your training (a step's time, and the bytes of its state)",
        )
    for name, value in (("--step-ms", args.step_ms), ("--state-gb", args.state_gb)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{name} {value:g} is not a positive number", hint="e.g. 60 or 4.5")
    for name, value in (("--num-steps", args.num_steps), ("--rounds", args.rounds)):
        if value < 1:
            raise UsageError(f"{name} {value} must be at least 1", hint="e.g. 50 steps, 3 rounds")
    if not args.max_seconds > 0:
        raise UsageError(f"--max-seconds {args.max_seconds:g} must be positive", hint="e.g. 120")
    if args.checkpoint_interval is not None and args.checkpoint_interval < 1:
        raise UsageError(
            f"--checkpoint-interval {args.checkpoint_interval} must be at least 1",
            hint="checkpoint every N >= 1 steps",
        )


def _device(args: argparse.Namespace) -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def _workload(args: argparse.Namespace, device: torch.device) -> Workload:
    from .diagnose_measure import WARMUP_STEPS, host_memory_available, synthetic_workload
    from .workloads import preset_workload

    if args.preset is not None:
        import torch

        torch.manual_seed(0)
        workload = preset_workload(args.preset, device)
        workload.warm_up(WARMUP_STEPS)
        workload.name = f"preset {args.preset}"
        return workload
    nbytes = int(args.state_gb * 1e9)
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        # The state itself must fit; where its staging copy goes is what "auto" decides.
        need, room, where = nbytes, 0.9 * free, "free GPU memory (less 10%)"
    else:
        # The state and the host pool that CPU checkpoints are copied into.
        need, where = 2 * nbytes, "available host memory"
        room = host_memory_available() or float(need)
    if need > room:
        raise UsageError(
            f"--state-gb {args.state_gb:g} needs {need / 1e9:.3g} GB here, more than the "
            f"{room / 1e9:.3g} GB of {where}",
            hint="diagnose a smaller state, or on the machine that trains",
        )
    return synthetic_workload(args.step_ms, nbytes, device)


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float):
        return json_number(value)
    return value


def report(
    label: str, measurements: Measurements, thresholds: Thresholds, analysis: Analysis
) -> dict[str, Any]:
    """The JSON document: what was run, every measurement, the thresholds, the findings."""
    setup = measurements.setup
    return _finite(
        {
            "workload": label,
            "device": setup.device,
            "config": setup.config.to_dict(),
            "measurements": measurements.to_dict(),
            "thresholds": thresholds.to_dict(),
            "analysis": analysis.numbers,
            "findings": [f.to_dict() for f in analysis.findings],
            "advice": [f.to_dict() for f in analysis.advice],
            "verdict": analysis.verdict,
        }
    )


def render(label: str, measurements: Measurements, analysis: Analysis) -> None:
    from rich.markup import escape

    from .._util.console import stdout_console

    console = stdout_console()
    setup = measurements.setup
    console.print(
        f"[bold]{escape(label)}[/bold] on {escape(setup.device)}: "
        f"{format_bytes(setup.state_bytes)} of state in {setup.chunks} chunk"
        f"{'s' * (setup.chunks != 1)}, {measurements.timings.step_ms:.3g} ms steps, "
        f"checkpoint every {setup.interval_steps} step{'s' * (setup.interval_steps != 1)} "
        f"({escape(setup.interval_source)})"
    )
    for section, title in SECTIONS.items():
        console.print(f"\n[bold]{title}[/bold]")
        for finding in analysis.findings:
            if finding.section == section:
                mark = "[yellow]![/yellow]" if finding.is_advice else "[green]ok[/green]"
                if finding.uncertain:
                    mark = "[magenta]?[/magenta]"
                console.print(
                    f"  {mark} {escape(finding.line() if finding.uncertain else finding.message)}"
                )
    console.print("\n[bold]Advice[/bold]")
    if not analysis.advice:
        console.print("  no changes needed")
    for finding in analysis.advice:
        doubt = " (uncertain: see above)" if finding.uncertain else ""
        console.print(f"  - {escape(finding.change or '')}{doubt}  [dim]({finding.code})[/dim]")


def run(args: argparse.Namespace) -> int:
    from .._util.console import print_json
    from .diagnose_measure import measure

    _check_args(args)
    config = build_config(args)
    device = _device(args)
    note(f"[diagnose] building the workload on {device}")
    workload = _workload(args, device)
    measurements = measure(
        workload,
        config,
        rounds=args.rounds,
        num_steps=args.num_steps,
        max_seconds=args.max_seconds,
        interval_override=args.checkpoint_interval,
        progress=lambda message: note(f"[diagnose] {message}"),
    )
    thresholds = Thresholds.for_config(config)
    analysis = analyze(measurements, thresholds)
    if args.json:
        print_json(report(workload.name, measurements, thresholds, analysis))
    else:
        render(workload.name, measurements, analysis)
    return 0
