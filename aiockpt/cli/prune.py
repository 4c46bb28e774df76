"""``aiockpt prune``: delete old checkpoints by rule, never the one a restart would need.

Safety rules, in order:

- The newest *valid* checkpoint is never removed, whatever the rules say. Validity is
  checked the way restore checks it (every checksum), newest first, stopping at the first
  valid one; if none verifies, nothing is removed, so the bytes stay for salvage.
- A directory with a live writer is left alone unless ``--force``: the writer prunes by
  its own ``keep_last``, and may be reading an older step to restore it. With ``--force``
  only committed checkpoints are removed, never the writer's temporaries or ``latest``.
- Otherwise prune takes the writer lock itself for the few milliseconds it works, so no
  writer can start in the middle; opening the directory as a writer also clears a dead
  writer's temporaries (and restores an interrupted replace), as FORMAT.md requires.
- Removal is the store's rename-then-delete: a checkpoint never looks half-deleted, and
  ``latest`` names a surviving checkpoint (or is gone) before the first removal.
- Steps a resumed run superseded (``.superseded-step-<N>-*``) are deleted like any other
  leftover of a writer that is no longer alive.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .._util.console import byte_progress, human_bytes, note, print_json, stdout_console
from .._util.location import Location, local_directory, storage_location
from .._util.shm import derived_memory_directory
from ..errors import DirectoryLockedError, UsageError
from ..storage import open_storage
from ..storage.local import CheckpointInfo
from .scan import Leftover, WriterState, committed_checkpoints, probe_writer, scan_leftovers
from .verify import verify_checkpoints

__all__ = ["free_memory_tier", "prune", "run"]


def _rules(
    committed: list[CheckpointInfo], keep_last: int, keep_every: int | None
) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {info.step: [] for info in committed}
    for info in committed[len(committed) - keep_last :] if keep_last else []:
        reasons[info.step].append(f"last {keep_last}")
    if keep_every:
        for info in committed:
            if info.step % keep_every == 0:
                reasons[info.step].append(f"every {keep_every}")
    return reasons


def _newest_valid(
    committed: list[CheckpointInfo], threads: int, progress: bool
) -> tuple[int | None, list[dict[str, Any]]]:
    """Verify newest first until one is valid; (its step, the corrupt ones passed over)."""
    corrupt: list[dict[str, Any]] = []
    for info in reversed(committed):
        with byte_progress(0, f"verifying step {info.step}", enabled=progress) as count:
            (verdict,) = verify_checkpoints(
                [info.path], threads=threads, on_bytes=count, on_total=count.set_total
            )
        if verdict.valid:
            return info.step, corrupt
        if not verdict.vanished:
            corrupt.append(
                {"step": info.step, "problems": [p.describe() for p in verdict.problems]}
            )
    return None, corrupt


def _leftover_action(left: Leftover, writer: WriterState, committed_steps: set[int]) -> str:
    if writer.live or left.kind == "no-manifest":
        return "keep"
    if left.kind == "trash-replace" and left.step not in committed_steps:
        return "restore"
    return "delete"


def prune(
    root: Location,
    *,
    keep_last: int,
    keep_every: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    threads: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Apply the rules to ``root``; the JSON-ready report of what was (or would be) done.

    Raises ``UsageError`` for rules out of range or a ``root`` that is no directory, and
    ``DirectoryLockedError`` while a live writer holds ``root`` (unless ``force`` or
    ``dry_run``).
    """
    if keep_last < 0 or (keep_every is not None and keep_every < 1):
        raise UsageError(
            "--keep-last must be 0 or more and --keep-every 1 or more",
            hint="e.g. --keep-last 3 --keep-every 1000",
        )
    committed = committed_checkpoints(root)
    writer = probe_writer(root)
    if writer.live and not force and not dry_run:
        raise DirectoryLockedError(
            f"{root} is being written right now ({writer.describe()}); its writer prunes "
            "by its own keep_last, and may be restoring from an older checkpoint",
            hint="stop the training job first, set keep_last in its config, or pass --force "
            "to remove committed checkpoints anyway (the writer's temporaries and its newest "
            "checkpoint are never touched); --dry-run shows the plan",
        )
    leftovers = scan_leftovers(root)
    steps = {info.step for info in committed}
    left_plan = [(left, _leftover_action(left, writer, steps)) for left in leftovers]

    store = open_storage(root, durable=True)
    locked = False
    if not dry_run and not writer.live:
        try:
            store.open()  # the writer lock; also clears the dead writer's leftovers
        except DirectoryLockedError as exc:
            raise DirectoryLockedError(
                str(exc).split(";")[0] + " (it started just now)",
                hint="run prune again once that writer is done, or pass --force",
            ) from exc
        locked = True
        committed = committed_checkpoints(root)  # an interrupted replace may be back
    try:
        reasons = _rules(committed, keep_last, keep_every)
        newest_valid: int | None = None
        corrupt: list[dict[str, Any]] = []
        doomed = [info for info in committed if not reasons[info.step]]
        if doomed:
            newest_valid, corrupt = _newest_valid(committed, threads, progress)
            if newest_valid is None:
                for info in doomed:
                    reasons[info.step].append("no checkpoint verifies: nothing is removed")
            else:
                reasons[newest_valid].append("newest valid")
            doomed = [info for info in committed if not reasons[info.step]]
        removed = []
        if not dry_run and locked:
            # `latest` is pointed at the newest survivor (or removed) before anything goes.
            survivors = [info for info in committed if reasons[info.step]]
            gone = store.remove_all([info.path for info in doomed], survivors)
            removed = [info.step for info in doomed if info.path in gone]
            for left, action in left_plan:
                if left.kind == "superseded" and action == "delete":
                    store.remove(left.path)
        elif not dry_run:
            for info in doomed:  # --force beside a live writer: its `latest` is its own
                try:
                    store.remove(info.path)
                except FileNotFoundError:
                    continue  # the live writer's own retention got there first
                removed.append(info.step)
    finally:
        if locked:
            store.close()
    doomed_steps = {info.step for info in doomed}
    return {
        "directory": str(root),
        "dry_run": dry_run,
        "forced": force and writer.live,
        "writer": {"live": writer.live, "pid": writer.pid},
        "newest_valid": newest_valid,
        "corrupt": corrupt,
        "checkpoints": [
            {
                "step": info.step,
                "path": str(info.path),
                "nbytes": info.nbytes,
                "action": "remove" if info.step in doomed_steps else "keep",
                "reasons": reasons[info.step],
            }
            for info in committed
        ],
        "removed": removed,
        "leftovers": [
            {
                "name": left.name_under(root),
                "kind": left.kind,
                "nbytes": left.nbytes,
                "action": action,
                "explanation": left.explain(writer),
            }
            for left, action in left_plan
        ],
        "freed_bytes": sum(info.nbytes for info in doomed)
        + sum(left.nbytes for left, action in left_plan if action == "delete"),
    }


def free_memory_tier(
    root: Location,
    memory_dir: Path | None = None,
    *,
    dry_run: bool = False,
    force: bool = False,
    threads: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Delete every checkpoint of ``root``'s memory tier (and the derived directory).

    Refused (DirectoryLockedError) while a writer holds the tier, and (UsageError) while
    it holds a step newer than the newest valid checkpoint of ``root``, unless ``force``.
    """
    derived = memory_dir is None
    location = derived_memory_directory(root) if memory_dir is None else memory_dir
    report: dict[str, Any] = {
        "directory": str(root),
        "memory_directory": str(location),
        "derived": derived,
        "dry_run": dry_run,
        "removed": [],
        "freed_bytes": 0,
    }
    if not location.is_dir():
        return report
    in_memory = committed_checkpoints(location)
    report["steps"] = [info.step for info in in_memory]
    writer = probe_writer(location)
    if writer.live and not force:
        raise DirectoryLockedError(
            f"the memory tier {location} is held by a live training job ({writer.describe()})",
            hint="it frees the tier itself when it closes after a checkpoint reached "
            f"{root}; or stop it first",
        )
    on_disk = committed_checkpoints(root) if not isinstance(root, Path) or root.is_dir() else []
    newest_kept, _ = _newest_valid(on_disk, threads, progress)
    newer = [i.step for i in in_memory if newest_kept is None or i.step > newest_kept]
    if newer and not force:
        raise UsageError(
            f"the memory tier {location} holds step(s) {newer}, newer than the newest valid "
            f"checkpoint of {root} ({newest_kept}): a restart would resume from them",
            hint="resume the run (its next checkpoint reaches the disk), or pass --force to "
            "free the memory anyway",
        )
    report["freed_bytes"] = sum(info.nbytes for info in in_memory)
    if dry_run:
        return report
    store = open_storage(location, durable=False)
    if not writer.live:
        store.open()
    try:
        gone = store.remove_all([info.path for info in in_memory], [])
        report["removed"] = [info.step for info in in_memory if info.path in gone]
    finally:
        store.close()
    if derived and not writer.live:
        shutil.rmtree(location, ignore_errors=True)  # the derived directory is all ours
    return report


def render(report: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    writer = WriterState(report["writer"]["live"], report["writer"]["pid"])
    dry = report["dry_run"]
    heading = f"[bold]{escape(report['directory'])}[/bold] ({writer.describe()})"
    console.print(heading + (": dry run, nothing changed" if dry else ""))
    for bad in report["corrupt"]:
        console.print(f"  [red]step {bad['step']} is corrupt[/red]: {escape(bad['problems'][0])}")
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("why", no_wrap=True)
    verb = "would remove" if dry else "removed"
    for row in report["checkpoints"]:
        action = f"[red]{verb}[/red]" if row["action"] == "remove" else "keep"
        why = ", ".join(row["reasons"]) if row["action"] == "keep" else ""
        table.add_row(f"step {row['step']}", action, human_bytes(row["nbytes"]), escape(why))
    console.print(table if report["checkpoints"] else "no committed checkpoints")
    if report["leftovers"]:
        console.print("not checkpoints:")
        table = Table(box=None, pad_edge=False, show_header=False)
        for _ in range(4):
            table.add_column(no_wrap=True)
        verbs = {
            "delete": "would delete" if dry else "deleted",
            "restore": "would restore" if dry else "restored",
            "keep": "keep",
        }
        for left in report["leftovers"]:
            size = human_bytes(left["nbytes"])
            name = escape(f"  {left['name']}")
            table.add_row(name, verbs[left["action"]], size, escape(left["explanation"]))
        console.print(table)
    freed = human_bytes(report["freed_bytes"])
    console.print(f"{'would free' if dry else 'freed'} {freed}")
    if dry and writer.live:
        console.print("a live writer holds the directory: a real run needs --force")


def run(args: Any) -> int:
    if args.memory:
        memory = free_memory_tier(
            storage_location(args.directory),
            None if args.memory_dir is None else local_directory(args.memory_dir),
            dry_run=args.dry_run,
            force=args.force,
            threads=args.threads,
            progress=not args.json,
        )
        if args.json:
            print_json(memory)
        else:
            verb = "would free" if args.dry_run else "freed"
            stdout_console().print(
                f"memory tier {memory['memory_directory']}: {verb} "
                f"{human_bytes(memory['freed_bytes'])} (steps {memory.get('steps', [])})"
            )
        return 0
    if args.keep_last is None:
        raise UsageError(
            "prune needs --keep-last N (or --memory to free the memory tier)",
            hint="e.g. aiockpt prune checkpoints --keep-last 3",
        )
    report = prune(
        storage_location(args.directory),
        keep_last=args.keep_last,
        keep_every=args.keep_every,
        dry_run=args.dry_run,
        force=args.force,
        threads=args.threads,
        progress=not args.json,
    )
    if report["forced"]:
        note("--force: a live writer holds this directory; only committed checkpoints were touched")
    if args.json:
        print_json(report)
    else:
        render(report)
    return 0
