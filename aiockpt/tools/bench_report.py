"""Render an ``aiockpt bench`` report (its JSON document) as Markdown tables and a PNG.

Both work from the JSON alone, so ``aiockpt bench --from-json report.json --markdown
report.md --plot report.png`` redraws a run made elsewhere. The PNG needs matplotlib
(``pip install 'aiockpt[bench]'``); :func:`plot_available` says whether it is there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .._util.units import human_bytes

__all__ = ["markdown", "plot", "plot_available"]

_MISSING = "-"


def _num(value: float | int | None, fmt: str = ".2f", suffix: str = "") -> str:
    return _MISSING if value is None else f"{value:{fmt}}{suffix}"


def _x(value: float | None) -> str:
    """A ratio, as "0.98x"."""
    return _MISSING if value is None else f"{value:.3g}x"


def _gb(nbytes: float | int | None) -> str:
    """Bytes in decimal units, like the GB/s rates next to them."""
    return _MISSING if nbytes is None else human_bytes(nbytes, decimal=True)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


def _with_ratio(value: str, ratio: float | None) -> str:
    return value if value == _MISSING else f"{value} ({_x(ratio)})"


def _pair(a: float | None, b: float | None, fmt: str = ".1f") -> str:
    if a is None:
        return _MISSING
    return f"{a:{fmt}} / {_num(b, fmt)}"


def _header(report: dict[str, Any]) -> list[str]:
    env, model = report["environment"], report["model"]
    settings, limits = report["settings"], report["limits"]
    lines = [
        f"# aiockpt bench: {model['name']} on {env['device']}",
        "",
        f"- {_count(model['parameters'])} parameters, {_gb(model['state_bytes'])} "
        f"of state, {model['samples_per_step']} samples per step; torch {env['torch']}, "
        f"aiockpt {env['aiockpt']}, {env['cpus']} CPU cores; {report['created']}.",
        f"- {settings['steps']} steps x {settings['rounds']} rounds per system, a checkpoint "
        f"every {settings['checkpoint_interval']} steps; systems interleaved round by round "
        "after a warm-up; medians.",
        f"- Limits measured in this run: "
        f"device-to-device {_num(limits.get('d2d_gbps'), '.0f', ' GB/s')}, "
        f"device-to-host pinned {_num(limits.get('d2h_pinned_gbps'), '.1f', ' GB/s')}, "
        f"host-to-device pinned {_num(limits.get('h2d_pinned_gbps'), '.1f', ' GB/s')}, "
        f"host memcpy {_num(limits.get('host_copy_gbps'), '.1f', ' GB/s')}, "
        f"fsync'd writes ({limits.get('threads') or '?'} files at once) "
        f"{_num(limits.get('fsync_write_gbps'), '.2f', ' GB/s')}, "
        f"page-cache writes {_num(limits.get('pagecache_write_gbps'), '.2f', ' GB/s')}, "
        f"cold reads {_num(limits.get('read_gbps'), '.2f', ' GB/s')}.",
    ]
    return lines


def _main_table(systems: dict[str, Any]) -> list[str]:
    lines = [
        "| system | samples/s (vs none) | stall ms p50 / p99 | next step slower by ms "
        "p50 / p99 | persist GB/s (vs fsync'd write) | achieved interval | restore s "
        "(vs bound) | host memory | staging memory kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, system in systems.items():
        s = system["summary"]
        vs_none = 1.0 if name == "none" else s["vs"].get("none", {}).get("samples_per_second")
        limits = s["vs_limits"]
        if s["staging_bytes"] is not None:
            staging = _gb(s["staging_bytes"]) + (" pinned" if s["staging_pinned"] else "")
        elif s["pinned_held_bytes"]:  # pinned by torch's own allocator, e.g. for copies
            staging = _gb(s["pinned_held_bytes"]) + " pinned"
        else:
            staging = _MISSING
        interval = _num(s["achieved_interval"], ".1f")
        if s["checkpoints_skipped"]:
            interval += f" ({s['checkpoints_skipped']} skipped)"
        noise = s.get("throughput_vs_none")
        against = _x(vs_none) if noise is None else _against(noise)
        lines.append(
            f"| {name} | {_num(s['samples_per_second'], '.1f')} ({against}) "
            f"| {_pair(s['stall_ms_median'], s['stall_ms_p99'], '.2f')} "
            f"| {_pair(s['step_inflation_ms_median'], s['step_inflation_ms_p99'])} "
            f"| {_with_ratio(_num(s['persist_gbps']), limits['persist_vs_fsync_write'])} "
            f"| {interval} "
            f"| {_with_ratio(_num(s['restore_s']), limits['restore_vs_bound'])} "
            f"| {_gb(s['host_memory_bytes'])} | {staging} |"
        )
    return lines


def _against(noise: dict[str, Any]) -> str:
    """A ratio with the range the rounds allow: "within noise" when that range holds 1."""
    span = f"{noise['low']:.2f}x-{noise['high']:.2f}x"
    if noise["within_noise"]:
        return f"{noise['ratio']:.2f}x, within noise: {span}"
    return f"{noise['ratio']:.2f}x, {span}"


def _time_to_step_lines(systems: dict[str, Any]) -> list[str]:
    figures = {n: s["summary"].get("time_to_step") for n, s in systems.items()}
    figures = {n: f for n, f in figures.items() if f}
    if not figures:
        return []
    steps = next(iter(figures.values()))["steps"]
    parts = []
    for name, f in figures.items():
        text = f"{name} {f['seconds']:.2f} s"
        if "drift_s" in f:
            text += f" (drift {f['drift_s']:.2f} s between its two runs)"
        if "vs_none_s" in f:
            verdict = {True: ", within noise", False: "", None: ", noise unknown"}
            text += f" ({f['vs_none_s']:+.2f} s{verdict[f['within_noise']]})"
        parts.append(text)
    return [
        f"Time to reach step {steps} from making the system (set-up included): "
        + "; ".join(parts)
        + "."
    ]


def _ratio_table(systems: dict[str, Any]) -> list[str]:
    lines = [
        "| system | against | samples/s | stall p50 | stall p99 | persist GB/s | restore s "
        "| host memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, system in systems.items():
        for base, r in system["summary"]["vs"].items():
            if base == "none":
                continue  # none has only throughput, already in the first table
            lines.append(
                f"| {name} | {base} | {_x(r['samples_per_second'])} | {_x(r['stall_ms_median'])} "
                f"| {_x(r['stall_ms_p99'])} | {_x(r['persist_gbps'])} | {_x(r['restore_s'])} "
                f"| {_x(r['host_memory_bytes'])} |"
            )
    return lines if len(lines) > 2 else []


def _aiockpt_table(systems: dict[str, Any]) -> list[str]:
    lines = [
        "| system | state_dict + flatten ms | copies issued ms | queue wait ms | stall vs "
        "capture bound | steps while persisting vs quiet ms | copy / write GB/s | first "
        "checkpoint ms (durable s) | GPU memory kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, system in systems.items():
        s = system["summary"]
        if "staging_ms_median" not in s:
            continue
        lines.append(
            f"| {name} | {_num(s['state_dict_ms_median'])} | {_num(s['staging_ms_median'])} "
            f"| {_num(s['queue_wait_ms_median'])} "
            f"| {_x(s['vs_limits']['stall_vs_capture_bound'])} "
            f"| {_num(s['persisting_step_ms_median'], '.1f')} vs "
            f"{_num(s['quiet_step_ms_median'], '.1f')} "
            f"| {_num(s.get('copy_gbps_median'))} / {_num(s.get('write_gbps_median'))} "
            f"| {_num(s['first_checkpoint_ms'], '.0f')} ({_num(s['first_durable_s'])}) "
            f"| {_gb(s['gpu_held_bytes'])} |"
        )
    return lines if len(lines) > 2 else []


def markdown(report: dict[str, Any]) -> str:
    systems = report["systems"]
    parts = [*_header(report), "", *_main_table(systems)]
    cold = _time_to_step_lines(systems)
    if cold:
        parts += ["", *cold]
    ratios = _ratio_table(systems)
    if ratios:
        parts += ["", "Ratios (this system / the baseline; below 1 is less):", "", *ratios]
    breakdown = _aiockpt_table(systems)
    if breakdown:
        parts += ["", "aiockpt's stall and background stages (medians):", "", *breakdown]
    failed = report.get("failed") or {}
    if failed:
        parts += ["", "Failed, and left out of the tables:", ""]
        parts += [f"- {name}, during {f['during']}: {f['error']}" for name, f in failed.items()]
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in report["phases_s"].items())
    parts += [
        "",
        "Stall: what the training thread spent in the checkpoint call (for dcp, with the "
        "wait on the previous save). Next step slower by: that step against the quiet steps "
        "of its round. Persist: state bytes / time from the call to durable. Restore: from "
        "disk with the page cache dropped; its bound is bytes / cold read + bytes / "
        "host-to-device. Host memory: resident memory the system keeps plus its peak "
        "growth during a round; staging memory kept: its host buffers between checkpoints.",
        "",
        f"Phases: {phases}.",
    ]
    return "\n".join(parts) + "\n"


def _two_and_five(value: float, _: object) -> str:
    leading = f"{value:.0e}"[0]
    return f"{value:g}" if leading in "25" else ""


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Step time over the run per system (checkpoints marked), and stall per system."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import FuncFormatter

    systems = report["systems"]
    figure = Figure(figsize=(12, 8), layout="constrained")
    timeline, stalls = figure.subplots(2, 1, height_ratios=(3, 2))
    colors = [f"C{i}" for i in range(10)]
    for (name, system), color in zip(systems.items(), colors * 10, strict=False):
        x: list[int] = []
        y: list[float] = []
        marks: list[int] = []
        for r in system["rounds"]:
            offset = len(y)
            x += range(offset, offset + len(r["step_ms"]))
            y += r["step_ms"]
            marks += [offset + i for i in r["checkpoint_at"]]
        timeline.plot(x, y, color=color, linewidth=0.8, label=name)
        timeline.scatter(marks, [y[i] for i in marks], color=color, marker="v", s=28, zorder=3)
    steps = report["settings"]["steps"]
    for boundary in range(steps, steps * report["settings"]["rounds"], steps):
        timeline.axvline(boundary, color="0.8", linestyle=":", linewidth=0.8)
    timeline.set_yscale("log")
    timeline.set_xlabel("training step (rounds one after another; ▼ = checkpoint)")
    timeline.set_ylabel("step time (ms)")
    timeline.set_title(
        f"{report['model']['name']} on {report['environment']['device']}: "
        f"a checkpoint every {report['settings']['checkpoint_interval']} steps"
    )
    timeline.legend(loc="upper right", fontsize="small")

    names = [n for n, s in systems.items() if s["summary"]["stall_ms_median"] is not None]
    p50 = [systems[n]["summary"]["stall_ms_median"] for n in names]
    p99 = [systems[n]["summary"]["stall_ms_p99"] for n in names]
    positions = range(len(names))
    stalls.bar([p - 0.2 for p in positions], p50, width=0.4, label="median", color="C0")
    stalls.bar([p + 0.2 for p in positions], p99, width=0.4, label="p99", color="C1")
    for p, a, b in zip(positions, p50, p99, strict=True):
        stalls.annotate(f"{a:.3g}", (p - 0.2, a), ha="center", va="bottom", fontsize=8)
        stalls.annotate(f"{b:.3g}", (p + 0.2, b), ha="center", va="bottom", fontsize=8)
    stalls.set_xticks(list(positions), names)
    if names:
        stalls.set_yscale("log")
        # Plain numbers (20, 50, 100 ms), not 2 x 10^1: minor ticks at 2 and 5 only.
        stalls.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        stalls.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
    stalls.set_ylabel("stall per checkpoint (ms)")
    stalls.set_title("time the training thread was blocked by each checkpoint")
    stalls.legend(fontsize="small")
    figure.savefig(path, dpi=110)
