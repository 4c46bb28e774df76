"""From the raw measurements of ``aiockpt bench`` to the figures it reports, and ratios.

Every figure is a median over the run (p99 where asked), and every figure comes again as
a ratio to each baseline that ran (``none``, ``torch.save``, ``dcp``) and to the machine's
limits measured in the same run. Missing figures are None (JSON null), never NaN.
"""

from __future__ import annotations

import statistics
from typing import Any

from .._util.stats import median, p99
from .limits import capture_bound_seconds, restore_bound_seconds
from .noise import compare

__all__ = ["BASELINES", "COMPARED", "median", "p99", "summarise"]

BASELINES = ("none", "torch.save", "dcp")
# Figures held against the same figure of every baseline: mine / theirs.
COMPARED = (
    "samples_per_second",
    "stall_ms_median",
    "stall_ms_p99",
    "persist_gbps",
    "restore_s",
    "host_memory_bytes",
    "staging_bytes",
)


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    return a / b if a is not None and b else None


def _round_steps(r: dict[str, Any]) -> tuple[list[float], list[float], list[float]]:
    """Step times of one round: at a checkpoint, while one persists, and quiet."""
    marked = set(r["checkpoint_at"])
    busy = set(r["persisting"]) - marked
    at = [t for i, t in enumerate(r["step_ms"]) if i in marked]
    persisting = [t for i, t in enumerate(r["step_ms"]) if i in busy]
    quiet = [t for i, t in enumerate(r["step_ms"]) if i not in marked and i not in busy]
    return at, persisting, quiet


def _system(raw: dict[str, Any], state_bytes: int, limits: dict[str, Any]) -> dict[str, Any]:
    rounds = raw["rounds"]
    taken = [c for r in rounds for c in r["checkpoints"] if not c["skipped"]]
    inflation, persisting, quiet = [], [], []
    for r in rounds:
        at, busy, calm = _round_steps(r)
        reference = median(calm)
        if reference is not None:
            # Only checkpoints that were taken: a skipped request costs microseconds.
            skipped = {c["at"] for c in r["checkpoints"] if c["skipped"]}
            inflation += [
                t - reference
                for i, t in zip(r["checkpoint_at"], at, strict=True)
                if i not in skipped
            ]
        persisting += busy
        quiet += calm
    steps = sum(len(r["step_ms"]) for r in rounds)
    persist_s = median(c["persist_s"] for c in taken if c["persist_s"] is not None)
    stall_ms = [c["stall_s"] * 1e3 for c in taken]
    warm = raw["warm_up"]
    memory = warm["memory"]
    growth = [r["memory"]["rss_peak_growth"] for r in rounds]
    peak_growth = max(growth) if growth and None not in growth else None
    host_memory = None
    if memory["rss_held"] is not None and peak_growth is not None:
        host_memory = max(memory["rss_held"], 0) + max(peak_growth, 0)
    restore_s = raw.get("restore_s")
    restore_bound = restore_bound_seconds(state_bytes, limits) if restore_s is not None else None
    summary: dict[str, Any] = {
        "samples_per_second": median(r["samples_per_second"] for r in rounds),
        "step_ms_median": median(t for r in rounds for t in r["step_ms"]),
        "quiet_step_ms_median": median(quiet),
        "persisting_step_ms_median": median(persisting),
        "checkpoints_requested": sum(len(r["checkpoints"]) for r in rounds),
        "checkpoints_taken": len(taken),
        "checkpoints_skipped": sum(c["skipped"] for r in rounds for c in r["checkpoints"]),
        "achieved_interval": steps / len(taken) if taken else None,
        "stall_ms_median": median(stall_ms),
        "stall_ms_p99": p99(stall_ms),
        "wait_ms_median": median(c["wait_s"] * 1e3 for c in taken),
        "step_inflation_ms_median": median(inflation),
        "step_inflation_ms_p99": p99(inflation),
        "persist_s_median": persist_s,
        "persist_gbps": state_bytes / persist_s / 1e9 if persist_s else None,
        "restore_s": restore_s,
        "restore_bound_s": restore_bound,
        "first_checkpoint_ms": _first(warm, "stall_s"),
        "first_durable_s": _first(warm, "durable_s", scale=1.0),
        "host_memory_bytes": host_memory,
        "rss_held_bytes": memory["rss_held"],
        "rss_peak_growth_bytes": peak_growth,
        "pinned_held_bytes": memory["pinned_held"],
        "gpu_held_bytes": memory["gpu_held"],
        "staging_bytes": warm["staging_bytes"],
        "staging_pinned": warm["staging_pinned"],
    }
    details = [c["detail"] for c in taken if c["detail"]]
    if details:  # aiockpt's own breakdown of its stall and of its background stages
        for key in ("state_dict_ms", "staging_ms", "queue_wait_ms", "copy_gbps", "write_gbps"):
            summary[f"{key}_median"] = median(d[key] for d in details if key in d)
    capture_bound = capture_bound_seconds(state_bytes, limits)
    summary["vs_limits"] = {
        "stall_vs_capture_bound": _ratio(summary["stall_ms_median"], capture_bound * 1e3),
        "persist_vs_fsync_write": _ratio(summary["persist_gbps"], limits.get("fsync_write_gbps")),
        "restore_vs_bound": _ratio(restore_s, restore_bound),
        "staging_vs_state": _ratio(summary["staging_bytes"], state_bytes),
        "host_memory_vs_state": _ratio(host_memory, state_bytes),
    }
    return summary


def _first(warm: dict[str, Any], key: str, scale: float = 1e3) -> float | None:
    first = warm.get("first_checkpoint")
    return first[key] * scale if first else None


def _throughput_vs_none(raw: dict[str, Any], none: dict[str, Any]) -> dict[str, Any] | None:
    """samples/s per round against none's: the ratio of medians, its range, and whether
    that range holds 1 (within noise: the rounds do not show a difference)."""
    found = compare(
        [r["samples_per_second"] for r in raw["rounds"]],
        [r["samples_per_second"] for r in none["rounds"]],
    )
    return None if found is None else found.to_dict()


def _time_to_step(cold: dict[str, Any], name: str) -> dict[str, Any] | None:
    """Seconds from making the system to reaching the cold start's step count, against
    none; within noise when the difference is no larger than none's own drift."""
    seconds = (cold.get("seconds") or {}).get(name)
    if not seconds:
        return None
    figure: dict[str, Any] = {"steps": cold["steps"], "seconds": median(seconds)}
    none = (cold.get("seconds") or {}).get("none")
    if none and name != "none":
        drift = max(none) - min(none) if len(none) > 1 else None
        extra = statistics.median(seconds) - statistics.median(none)
        figure.update(
            vs_none_s=extra,
            none_drift_s=drift,
            within_noise=None if drift is None else abs(extra) <= drift,
        )
    elif name == "none" and len(seconds) > 1:
        figure["drift_s"] = max(seconds) - min(seconds)
    return figure


def summarise(report: dict[str, Any]) -> None:
    """Add ``summary`` (with ``vs`` ratios to each baseline) to every system of ``report``."""
    state_bytes = report["model"]["state_bytes"]
    systems = report["systems"]
    for name, raw in systems.items():
        raw["summary"] = _system(raw, state_bytes, report["limits"])
        raw["summary"]["time_to_step"] = _time_to_step(report.get("cold_start") or {}, name)
        if "none" in systems and name != "none":
            raw["summary"]["throughput_vs_none"] = _throughput_vs_none(raw, systems["none"])
    for name, raw in systems.items():
        raw["summary"]["vs"] = {
            base: {
                key: _ratio(raw["summary"][key], systems[base]["summary"][key]) for key in COMPARED
            }
            for base in BASELINES
            if base in systems and base != name
        }
