"""A process that saves generation after generation to one path, until it is killed.

Run by tests/crash/test_path_save_crash.py. Every value of generation ``g`` says ``g``
(``generation``); after each save is durable, ``g`` is appended to the progress file and
fsync'd, so the test knows the newest generation that must survive a kill.

``--kill-at`` makes the process SIGKILL itself at one point of the commit of the second
generation, so that a checkpoint is being replaced: ``aside`` right after the old one was
renamed out of the way, ``in`` right after the new one was renamed into place (the old
copy not yet deleted). The kill is a real SIGKILL of this process, sent by itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiofiles.os
import torch

import aiockpt

ELEMENTS = 1_500_000  # 6 MiB of float32 and 6 MiB of int64 (a few chunks each)


def generation(value: int) -> dict[str, Any]:
    return {
        "weights": {
            "a": torch.full((ELEMENTS,), float(value)),
            "b": torch.full((ELEMENTS // 2,), value, dtype=torch.int64),
        },
        "meta": {"generation": value, "name": f"gen-{value}"},
    }


def kill_at(point: str, path: Path) -> None:
    """SIGKILL this process right after the commit's rename that ``point`` names."""
    real = os.rename
    armed = {"commits": 0}

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real(src, dst, *args, **kwargs)
        source, target = Path(os.fspath(src)), Path(os.fspath(dst))
        if point == "aside" and source == path and target.name.startswith(".trash-replace-"):
            os.kill(os.getpid(), signal.SIGKILL)
        if point == "in" and target == path:
            armed["commits"] += 1
            if armed["commits"] == 2:  # the first commit replaced nothing
                os.kill(os.getpid(), signal.SIGKILL)

    # The commit awaits renames through aiofiles, whose functions bound the real one.
    aiofiles.os.rename = aiofiles.os.wrap(rename)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", type=Path)
    parser.add_argument("progress", type=Path)
    parser.add_argument("--start", type=int, default=1)
    parser.add_argument("--kill-at", choices=["aside", "in"])
    args = parser.parse_args()
    if args.kill_at:
        kill_at(args.kill_at, args.path)
    config = aiockpt.Config(chunk_size_mb=2, num_threads=2, max_async=2)
    value = args.start
    fd = os.open(args.progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    print("ready", flush=True)
    previous = None
    while True:
        handle = aiockpt.save(generation(value), args.path, config=config)
        if previous is not None:  # two in flight: the one before is durable first
            committed = previous.wait()
            assert committed == args.path, committed
            os.write(fd, f"{value - 1}\n".encode())
            os.fsync(fd)
        previous = handle
        value += 1
        if value > 10_000:
            sys.exit("never killed")


if __name__ == "__main__":
    main()
