"""SIGKILL at the points incremental checkpoints add: a shared file linked into a checkpoint
being written, the commit of a checkpoint that shares files, retention and ``aiockpt prune``
deleting checkpoints whose files later ones share.

The child checkpoints a state with a frozen part (never changes: shared from the first
checkpoint on) and a part that encodes its step. It wraps a few os functions *in its own
process*, before aiockpt is imported, so that the N-th event of the chosen point kills it
with a real SIGKILL. The parent then opens the directory as a restarted job would and
checks: nothing temporary survives the open, every committed checkpoint verifies, restore
returns a step at least as new as the newest the child recorded with exactly its values,
and the next checkpoint commits and shares again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import aiockpt
from aiockpt.cli.verify import verify_checkpoints

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs Linux (hard links, SIGKILL)"
)

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    directory, progress, point, nth = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    events = 0

    def event() -> None:
        global events
        events += 1
        if events == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    # Wrapped before aiockpt (and aiofiles, which binds os.rename at import) is imported.
    real_link, real_rename, real_unlink = os.link, os.rename, os.unlink

    def link(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        if point == "share":
            event()

    def rename(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        name = os.path.basename(os.fspath(dst))
        if point == "commit" and name.startswith("step-"):
            event()
        if point == "retention-trash" and name.startswith(".trash-step-"):
            event()

    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if point in ("retention-delete", "prune") and os.path.basename(
            os.fspath(path)
        ).startswith("data-"):
            event()

    os.link, os.rename, os.unlink = link, rename, unlink

    import torch
    import aiockpt
    from aiockpt.cli.main import main

    sys.path.insert(0, {here!r})
    from test_incremental_crash import State

    state = State()
    keep_last = None if point == "prune" else 2
    config = aiockpt.Config(directory=directory, keep_last=keep_last, num_threads=2,
                            chunk_size_mb=0.125)
    with aiockpt.SyncCheckpointer(config, state=state) as ckpt:
        for step in range(1, {steps} + 1):
            state.set_step(step)
            ckpt.checkpoint(step).wait()
            fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, b"%d\\n" % step)
            os.fsync(fd)
            os.close(fd)
    if point == "prune":
        main(["prune", str(directory), "--keep-last", "1"])
    """
)


class State:
    """A frozen part (shared from the first checkpoint on) and a part that is the step."""

    def __init__(self) -> None:
        self.frozen = torch.arange(96 * 1024, dtype=torch.float32) / 7
        self.table = torch.arange(8 * 1024, dtype=torch.int64) * 3
        self.adapter = torch.zeros(4 * 1024)
        self.step = 0

    @staticmethod
    def adapter_of(step: int) -> torch.Tensor:
        return torch.arange(4 * 1024, dtype=torch.float32) + step * 10_000

    def set_step(self, step: int) -> None:
        self.step = step
        self.adapter.copy_(self.adapter_of(step))

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "frozen": self.frozen,
            "table": self.table,
            "adapter": self.adapter,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        for name in ("frozen", "table", "adapter"):
            getattr(self, name).copy_(state[name])


def run_child(directory: Path, progress: Path, point: str, nth: int) -> int:
    script = CHILD.format(here=str(Path(__file__).parent), steps=STEPS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(directory), str(progress), point, str(nth)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-3000:])
    return max((int(line) for line in progress.read_text().split()), default=0)


@pytest.mark.parametrize(
    ("point", "nth"),
    [
        ("share", 1),  # the first shared file linked into step 2's temporary
        ("share", 4),
        ("commit", 2),  # step 2 renamed into place: the first commit that shares
        ("commit", 4),
        ("retention-trash", 1),  # step 1 (the bytes every later one shares) hidden
        ("retention-delete", 1),  # deleting it: its first file unlinked
        ("retention-delete", 3),
        ("prune", 2),  # `aiockpt prune` deleting shared files' first checkpoints
    ],
)
def test_a_kill_never_loses_shared_bytes(tmp_path: Path, point: str, nth: int) -> None:
    directory = tmp_path / "ckpt"
    recorded = run_child(directory, tmp_path / "progress", point, nth)
    state = State()
    state.frozen.fill_(-1)
    state.table.fill_(-1)
    state.adapter.fill_(-1)
    config = aiockpt.Config(directory=directory, keep_last=2, num_threads=2, chunk_size_mb=0.125)
    with aiockpt.SyncCheckpointer(config, state=state) as ckpt:
        leftovers = [p.name for p in directory.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        assert leftovers == []
        committed = sorted(directory.glob("step-*"), key=lambda p: int(p.name[5:]))
        verdicts = verify_checkpoints(committed)
        assert all(v.valid for v in verdicts), [p.describe() for v in verdicts for p in v.problems]
        step = ckpt.restore()
        assert step is not None and step >= recorded
        assert state.step == step
        assert torch.equal(state.frozen, torch.arange(96 * 1024, dtype=torch.float32) / 7)
        assert torch.equal(state.table, torch.arange(8 * 1024, dtype=torch.int64) * 3)
        assert torch.equal(state.adapter, State.adapter_of(step))
        # The run goes on: the next checkpoints commit, and share the frozen part with the
        # checkpoint restored (by the digests its manifest holds) and then with each other.
        shared = []
        for following in (step + 1, step + 2):
            state.set_step(following)
            handle = ckpt.checkpoint(following)
            handle.wait()
            shared.append(handle.metrics.shared_bytes)
        assert shared[0] > 0 and shared[1] > 0
    for verdict in verify_checkpoints(
        [directory / f"step-{step + 1}", directory / f"step-{step + 2}"]
    ):
        assert verdict.valid, verdict.problems
