"""``aiockpt ls``: the committed checkpoints of a directory, and what else lies there.

Without ``--verify`` a checkpoint's status is what can be known cheaply: its manifest
parses and passes its own checksum, and every data file has the size the manifest lists
("unverified": the tensor bytes were not read). ``--verify`` reads every byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._engine.reader import read_manifest, validate_checkpoint
from .._format.manifest import Manifest
from .._util.console import (
    byte_progress,
    human_bytes,
    human_time,
    iso_time,
    print_json,
    stdout_console,
)
from .._util.location import Location, local_directory, storage_location
from .._util.shm import derived_memory_directory
from ..errors import AiockptError
from ..storage import open_storage
from ..storage.local import CheckpointInfo
from ..storage.sharing import disk_usage
from .scan import (
    WriterState,
    checkpoint_exists,
    committed_checkpoints,
    probe_writer,
    scan_leftovers,
)
from .verify import verify_checkpoints

__all__ = ["list_directory", "list_tiers", "run"]


def _quick_check(info: CheckpointInfo) -> tuple[Manifest | None, list[str]]:
    """The checks restore makes before reading tensor bytes (``validate_checkpoint``):
    a forged, torn or half-deleted checkpoint shows up, cheaply."""
    try:
        return validate_checkpoint(info.path), []
    except AiockptError as exc:
        # Still describe it from its manifest when that alone is fine.
        try:
            manifest: Manifest | None = read_manifest(info.path)
        except AiockptError:
            manifest = None
        return manifest, [str(exc)]


def list_directory(
    root: Location, *, verify: bool = False, threads: int = 8, progress: bool = False
) -> dict[str, Any]:
    """The ``ls`` report as a JSON-ready dict."""
    committed = committed_checkpoints(root)
    writer = probe_writer(root)
    # A hint: anything odd about it reads as none. Looking takes no lock.
    latest = open_storage(root, durable=False).latest_name()
    rows = []
    # Incremental checkpoints share files: what each adds on disk beyond older ones.
    usage = (
        disk_usage([Path(info.path) for info in committed])
        if isinstance(root, Path)
        else [(info.nbytes, 0, info.nbytes) for info in committed]
    )
    for info, (_, _, added) in zip(committed, usage, strict=True):
        manifest, problems = _quick_check(info)
        # Renamed away by a live writer's retention while we looked: gone, not corrupt.
        vanished = bool(problems) and not checkpoint_exists(info.path)
        rows.append(
            {
                "step": info.step,
                "path": str(info.path),
                "created": manifest.created if manifest else info.mtime,
                "created_iso": iso_time(manifest.created if manifest else info.mtime),
                "nbytes": info.nbytes,
                "logical_bytes": sum(t.nbytes for t in manifest.tensors) if manifest else None,
                "physical_bytes": added,
                "world_size": manifest.world_size if manifest else None,
                "tensors": len(manifest.tensors) if manifest else None,
                "files": len(manifest.files) if manifest else None,
                "keys": list(manifest.state) if manifest else None,
                "status": "removed" if vanished else "corrupt" if problems else "unverified",
                "valid": False if problems and not vanished else None,
                "latest": info.path.name == latest,
                "problems": [] if vanished else problems,
            }
        )
    if verify:
        # Those already found corrupt by the quick check need no reading.
        todo = [
            (r, i)
            for r, i in zip(rows, committed, strict=True)
            if r["valid"] is None and r["status"] != "removed"
        ]
        with byte_progress(0, "verifying", enabled=progress) as count:
            paths = [info.path for _, info in todo]
            verdicts = verify_checkpoints(
                paths, threads=threads, on_bytes=count, on_total=count.set_total
            )
        for (row, _), verdict in zip(todo, verdicts, strict=True):
            row["status"] = verdict.status
            row["valid"] = verdict.valid if not verdict.vanished else None
            row["problems"] = [p.describe() for p in verdict.problems]
    leftovers = [
        {
            "name": left.name_under(root),
            "path": str(left.path),
            "kind": left.kind,
            "step": left.step,
            "nbytes": left.nbytes,
            "in_progress": writer.live and left.kind != "no-manifest",
            "explanation": left.explain(writer),
        }
        for left in scan_leftovers(root)
    ]
    return {
        "directory": str(root),
        "writer": {"live": writer.live, "pid": writer.pid},
        "latest": latest,
        "verified": verify,
        "checkpoints": rows,
        "physical_bytes": sum(added for _, _, added in usage),
        "leftovers": leftovers,
    }


def list_tiers(
    root: Location,
    *,
    memory_dir: Path | None = None,
    remote: Location | None = None,
    verify: bool = False,
    threads: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """The ``ls`` report of the primary ``root``, with a ``tiers`` list: the memory tier
    (``memory_dir``, else the location derived from ``root``) when it exists, and the
    remote tier when given, each a report of its own plus the steps it holds."""
    report = list_directory(root, verify=verify, threads=threads, progress=progress)
    memory = memory_dir if memory_dir is not None else derived_memory_directory(root)
    tiers: list[tuple[str, Location, bool]] = [("memory", memory, memory_dir is None)]
    if remote is not None:
        tiers.append(("remote", remote, False))
    report["tiers"] = []
    for name, location, derived in tiers:
        # An object-store prefix has no directory to look for: its listing says.
        if isinstance(location, Path) and not location.is_dir():
            report["tiers"].append(
                {
                    "tier": name,
                    "directory": str(location),
                    "derived": derived,
                    "exists": False,
                    "steps": [],
                }
            )
            continue
        sub = list_directory(location, verify=verify, threads=threads, progress=progress)
        sub.update(tier=name, derived=derived, exists=True)
        sub["steps"] = [row["step"] for row in sub["checkpoints"]]
        report["tiers"].append(sub)
    return report


def render_tiers(report: dict[str, Any]) -> None:
    console = stdout_console()
    render(report)
    for tier in report["tiers"]:
        if tier["derived"] and not tier["exists"]:
            continue  # a run without a memory tier: nothing to say about one
        derived = " (derived from the primary directory)" if tier["derived"] else ""
        console.print(f"\n[bold]{tier['tier']} tier[/bold]{derived}:")
        if not tier["exists"]:
            console.print(f"{tier['directory']}: nothing there")
            continue
        render(tier)


def render(report: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    writer = WriterState(report["writer"]["live"], report["writer"]["pid"])
    console.print(f"[bold]{escape(report['directory'])}[/bold]  ({writer.describe()})")
    rows = report["checkpoints"]
    if not rows:
        console.print("no committed checkpoints")
    else:
        table = Table(box=None, pad_edge=False)
        for column, justify in (
            ("step", "right"),
            ("created", "left"),
            ("size", "right"),
            ("on disk", "right"),
            ("world", "right"),
            ("tensors", "right"),
            ("status", "left"),
            ("", "left"),
        ):
            table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        colour = {"valid": "green", "corrupt": "red", "removed": "yellow"}
        for row in rows:
            status = row["status"]
            style = colour.get(status)
            table.add_row(
                str(row["step"]),
                human_time(row["created"]),
                human_bytes(row["nbytes"]),
                human_bytes(row["physical_bytes"]),
                str(row["world_size"] or "?"),
                str(row["tensors"] if row["tensors"] is not None else "?"),
                f"[{style}]{status}[/{style}]" if style else status,
                "latest" if row["latest"] else "",
            )
        console.print(table)
        console.print(
            f"on disk: {human_bytes(report['physical_bytes'])} in all ('on disk': what each "
            "checkpoint adds beyond older ones; incremental checkpoints share unchanged bytes)"
        )
        for row in rows:
            for problem in row["problems"]:
                console.print(f"  [red]step {row['step']}[/red]: {escape(problem)}")
        if not report["verified"]:
            console.print(
                "status 'unverified': manifest and file sizes are fine, tensor bytes not read "
                "(`--verify` reads them)"
            )
    if report["leftovers"]:
        console.print("\n[bold]not checkpoints[/bold] (readers ignore these):")
        table = Table(box=None, pad_edge=False, show_header=False)
        table.add_column("name", no_wrap=True)
        table.add_column("size", justify="right", no_wrap=True)
        table.add_column("what", no_wrap=True)
        for left in report["leftovers"]:
            size = human_bytes(left["nbytes"])
            table.add_row(escape(f"  {left['name']}"), size, escape(left["explanation"]))
        console.print(table)
        if not writer.live:
            console.print(
                "leftovers of a dead writer are deleted when a writer next opens the "
                "directory, or by `aiockpt prune`"
            )


def run(args: Any) -> int:
    report = list_tiers(
        storage_location(args.directory),
        memory_dir=None if args.memory_dir is None else local_directory(args.memory_dir),
        remote=None if args.remote is None else storage_location(args.remote),
        verify=args.verify,
        threads=args.threads,
        progress=not args.json,
    )
    if args.json:
        print_json(report)
    else:
        render_tiers(report)
    reports = [report, *(tier for tier in report["tiers"] if tier["exists"])]
    corrupt = any(row["status"] == "corrupt" for r in reports for row in r["checkpoints"])
    return 1 if corrupt else 0
