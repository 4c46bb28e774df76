"""The command line of ``aiockpt bench``: its flags and help, shared by ``aiockpt bench``
and ``python -m aiockpt.tools.bench``.

Free of torch, so that building ``aiockpt``'s parser (for ``aiockpt ls`` too) stays fast;
the aiockpt settings are generated from Config's keys, like every command's.
"""

from __future__ import annotations

import argparse

from ..config import add_config_arguments
from .presets import PRESETS

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_SYSTEMS",
    "DESCRIPTION",
    "EPILOG",
    "STAGINGS",
    "SYSTEMS",
    "add_arguments",
    "build_parser",
]

DESCRIPTION = (
    "aiockpt, torch.save and DCP side by side in a training run, against this machine's limits."
)

SYSTEMS = ("none", "torch.save", "dcp", "aiockpt", "tiered")
# What runs without --systems: the tiered system is asked for by name.
DEFAULT_SYSTEMS = SYSTEMS[:4]
# The Config keys that bench takes as flags. Not directory (the bench writes into a
# scratch directory of its own) nor staging (--staging names the aiockpt systems to run).
CONFIG_KEYS = (
    "max_async",
    "chunk_size_mb",
    "chunk_count",
    "num_threads",
    "pinned_ratio",
    "use_monitor",
    "on_backpressure",
)
STAGINGS = ("gpu", "host", "auto", "cpu")

EPILOG = """\
systems (--systems): none (no checkpoint), torch.save (blocking, fsync'd), dcp
(torch.distributed.checkpoint.async_save, FileSystemWriter with --num-threads threads and
cache_staged_state_dict=True, waiting on the previous save), aiockpt (one system per
--staging mode).

--model package.module:function trains your own model: the function gets the
torch.device and returns (model, optimizer, step_fn) or (model, optimizer, step_fn,
samples_per_step), where step_fn() runs one whole training step.

Defaults per preset (--steps / --checkpoint-interval / --rounds): tiny 20/5/2,
350m 200/50/3 (sized for about 6 minutes on one H100), 1.3b 100/100/2,
--model 200/50/3.

examples:
  aiockpt bench                                  350m on a GPU, tiny on the CPU
  aiockpt bench --preset 1.3b --output r.json --markdown r.md --plot r.png
  aiockpt bench --systems none,aiockpt --staging gpu --checkpoint-interval 10
  aiockpt bench --model mytrain:bench_workload --steps 300
  aiockpt bench --from-json r.json --markdown r.md --plot r.png   redraw a saved run"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to train")
    what.add_argument(
        "--preset", choices=sorted(PRESETS), help="built-in model (default: 350m on a GPU, tiny)"
    )
    what.add_argument("--model", metavar="MODULE:FUNCTION", help="your own model (see below)")
    what.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    run_group = parser.add_argument_group("how to measure")
    run_group.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        metavar="LIST",
        help=f"comma-separated, of {', '.join(SYSTEMS)} (default: all but tiered, aiockpt "
        "with a shared-memory tier)",
    )
    run_group.add_argument(
        "--steps", type=int, metavar="N", help="training steps per system and round"
    )
    run_group.add_argument(
        "--checkpoint-interval", type=int, metavar="N", help="a checkpoint every N steps"
    )
    run_group.add_argument(
        "--rounds", type=int, metavar="N", help="rounds, systems interleaved in each"
    )
    run_group.add_argument(
        "--warmup-steps", type=int, default=3, metavar="N", help="steps before anything is measured"
    )
    run_group.add_argument(
        "--directory", default="bench-checkpoints", metavar="DIR", help="where files go"
    )
    run_group.add_argument(
        "--no-cold-start",
        dest="cold_start",
        action="store_false",
        help="skip the time to reach --steps steps from a fresh system (set-up included)",
    )
    knobs = parser.add_argument_group(
        "aiockpt settings (override AIOCKPT_* variables and --config)"
    )
    knobs.add_argument(
        "--staging",
        metavar="LIST",
        help="comma-separated aiockpt systems: gpu, host, auto (default gpu,host), or cpu on "
        "the CPU",
    )
    add_config_arguments(knobs, CONFIG_KEYS)
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="FILE", help="write the JSON report here")
    out.add_argument("--json", action="store_true", help="print only the JSON report")
    out.add_argument("--markdown", metavar="FILE", help="write the Markdown tables here")
    out.add_argument("--plot", metavar="FILE", help="draw step times and stalls (PNG)")
    out.add_argument("--from-json", metavar="FILE", help="render a saved report instead of running")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m aiockpt.tools.bench`` (``aiockpt bench`` adds the same
    arguments to its subcommand)."""
    parser = argparse.ArgumentParser(
        prog="aiockpt bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser
