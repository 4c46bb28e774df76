"""Child process for the crash tests: checkpoints forever until it is SIGKILLed.

Not a test module (pytest collects only ``test_*.py``). Run as::

    python tests/crash/crash_child.py DIR SEED [--progress FILE] [--keep-last N] ...

It builds a deterministic state of a few MiB whose every tensor encodes the step it
belongs to (see :func:`expected_tensors`), then checkpoints step 1, 2, 3, ... into DIR
with up to ``max_async`` checkpoints in flight. After each checkpoint is *committed*
(its handle resolved), the step is appended to the progress file (default
``DIR/../progress``) with flush + fsync, so the parent knows a lower bound of what was
committed when it killed this process. Between checkpoints the state is overwritten with
the next step's values right after ``checkpoint()`` returns, as training would, so a
snapshot that is not exact also shows up as a torn mix of two steps.

The parent imports this file for :func:`expected_tensors` and :class:`CrashState`.

``python tests/crash/crash_child.py --serve`` is a fork server for the tests: it pays for
``import torch`` once, then forks a fresh child per request line
``spawn {"argv": [...], "log": PATH}`` on stdin (it answers the child's pid) and reaps
it on ``reap PID`` (it answers the exit code, negative for a signal). Each forked child is an
ordinary process that the parent SIGKILLs like any other; only startup time is saved.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import aiockpt  # noqa: E402

# name -> (number of elements, dtype); ~8.3 MiB in all, odd sizes on purpose.
SPECS: dict[str, tuple[int, torch.dtype]] = {
    "w0": (384 * 1024, torch.float32),
    "w1": (384 * 1024 + 3, torch.float32),
    "w2": (256 * 1024, torch.float32),
    "w3": (512 * 1024 - 5, torch.float32),
    "ids": (128 * 1024 + 1, torch.int64),
    "f64": (96 * 1024, torch.float64),
    "bytes": (200 * 1024 + 7, torch.uint8),
    "tiny": (7, torch.float32),
}
# float32 holds step * 1024 + pattern exactly while that stays below 2**24.
MAX_STEP = 16000


@functools.lru_cache(maxsize=4)
def _patterns(seed: int) -> tuple[torch.Tensor, ...]:
    """Per tensor, values in 0..1020 that differ between neighbours (never mutated)."""
    out = []
    for index, (numel, _) in enumerate(SPECS.values()):
        arange = torch.arange(numel, dtype=torch.int64)
        out.append((arange * (2 * index + 1) + seed * 7919 + index) % 1021)
    return tuple(out)


def expected_tensors(step: int, seed: int) -> dict[str, torch.Tensor]:
    """The exact tensor values of ``step``: no two steps share any element's value."""
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step {step} outside 0..{MAX_STEP}")
    out = {}
    for base, (name, (_, dtype)) in zip(_patterns(seed), SPECS.items(), strict=True):
        if dtype == torch.float32:
            value = (base + step * 1024).to(dtype)
        elif dtype == torch.int64:
            value = base + step * (1 << 20)
        elif dtype == torch.float64:
            value = step + base.to(dtype) / 1024
        else:  # uint8: wraps every 256 steps, the other tensors disambiguate
            value = ((base + step) % 256).to(dtype)
        out[name] = value.reshape(-1, 1) if name == "f64" else value
    return out


def expected_extras(step: int, seed: int) -> dict[str, Any]:
    """The non-tensor values saved with ``step``."""
    return {"step": step, "tag": f"step-{step}", "meta": [step, seed, {"seed": seed}]}


class CrashState:
    """A Stateful holding :func:`expected_tensors` of one step, updated in place."""

    def __init__(self, seed: int, step: int = 0) -> None:
        self.seed = seed
        self.step = step
        self.extras = expected_extras(step, seed)
        self.tensors = expected_tensors(step, seed)

    def set_step(self, step: int) -> None:
        self.step = step
        self.extras = expected_extras(step, seed=self.seed)
        for name, value in expected_tensors(step, self.seed).items():
            self.tensors[name].copy_(value)

    def poison(self) -> None:
        """Values that no step has, so a restore that skips a tensor is caught."""
        self.step = -1
        self.extras = {}
        for tensor in self.tensors.values():
            tensor.fill_(255 if tensor.dtype == torch.uint8 else -7)

    def state_dict(self) -> dict[str, Any]:
        return {**self.extras, "tensors": dict(self.tensors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.extras = {k: v for k, v in state.items() if k != "tensors"}
        self.step = self.extras["step"]
        for name, tensor in self.tensors.items():
            tensor.copy_(state["tensors"][name])


def mismatches(state: dict[str, Any], step: int, seed: int) -> list[str]:
    """What in a loaded ``state`` differs from the exact values of ``step`` (empty: none)."""
    problems = []
    extras = {k: v for k, v in state.items() if k != "tensors"}
    if extras != expected_extras(step, seed):
        problems.append(f"non-tensor values {extras!r}")
    tensors = state.get("tensors", {})
    if sorted(tensors) != sorted(SPECS):
        problems.append(f"tensor names {sorted(tensors)}")
    for name, want in expected_tensors(step, seed).items():
        got = tensors.get(name)
        if got is None:
            continue
        if got.dtype != want.dtype or got.shape != want.shape:
            problems.append(
                f"{name}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}"
            )
        elif not torch.equal(got, want):
            bad = (got != want).nonzero()
            problems.append(f"{name}: {len(bad)} elements differ, first at {bad[0].tolist()}")
    return problems


def _record(progress_fd: int, step: int) -> None:
    os.write(progress_fd, f"{step}\n".encode())
    os.fsync(progress_fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("seed", type=int)
    parser.add_argument("--progress", type=Path, help="default: DIR/../progress")
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--max-async", type=int, default=2)
    parser.add_argument("--chunk-mb", type=float, default=0.25)
    parser.add_argument(
        "--max-seconds", type=float, default=120.0, help="exit on its own after this long"
    )
    args = parser.parse_args(argv)
    progress = args.progress or args.directory.resolve().parent / "progress"

    config = aiockpt.Config(
        directory=args.directory,
        chunk_size_mb=args.chunk_mb,
        max_async=args.max_async,
        keep_last=args.keep_last,
        durable=True,
    )
    state = CrashState(args.seed)
    deadline = time.monotonic() + args.max_seconds
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    pending: collections.deque[aiockpt.SyncCheckpointHandle] = collections.deque()
    with aiockpt.SyncCheckpointer(config, state=state) as ckpt:
        step = 0
        while time.monotonic() < deadline and step < MAX_STEP:
            step += 1
            state.set_step(step)
            pending.append(ckpt.checkpoint(step))
            # Handles resolve in commit order; record each as soon as it is known committed.
            while pending and (pending[0].done() or len(pending) > args.max_async):
                handle = pending.popleft()
                handle.wait()  # raises if that checkpoint failed: the parent sees rc != 0
                _record(fd, handle.step)
        while pending:
            handle = pending.popleft()
            handle.wait()
            _record(fd, handle.step)
    os.close(fd)
    return 0


def run_in_forked_child(log: str, body: Callable[[], int]) -> NoReturn:
    """In a freshly forked child: own log, no stdin, run ``body``, never return.

    Shared by this script's fork server and tests/crash/kill_harness.py's.
    """
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = body()
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkServer:
    """The parent's end of a ``SCRIPT --serve`` fork server: one request line, one reply.

    The server imports torch once and forks one child per kill, which saves the import
    (seconds) per child; each child is still a real process, really SIGKILLed.
    """

    def __init__(self, script: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply or reply.startswith("error"):
            raise RuntimeError(f"fork server answered {reply!r} to {line[:200]!r}")
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the server kills and reaps any child still running
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve() -> int:
    """Fork server loop: ``spawn {"argv": [...], "log": PATH}`` -> pid; ``reap PID`` -> code."""
    children: set[int] = set()
    try:
        for line in sys.stdin:
            command, _, rest = line.strip().partition(" ")
            if command == "spawn":
                request = json.loads(rest)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    run_in_forked_child(
                        request["log"], lambda request=request: main(request["argv"])
                    )
                children.add(pid)
                reply = str(pid)
            elif command == "reap":
                pid = int(rest)
                _, status = os.waitpid(pid, 0)
                children.discard(pid)
                reply = str(os.waitstatus_to_exitcode(status))
            else:
                reply = f"error unknown command {command!r}"
            print(reply, flush=True)
    finally:
        for pid in children:  # the parent went away: leave no orphan writing forever
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
