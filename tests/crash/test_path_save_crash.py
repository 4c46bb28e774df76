"""A process saving to one path is SIGKILLed mid-save; the path must still load.

The child (tests/crash/path_save_child.py) saves generation 1, 2, 3, ... of a state whose
every value says its generation, each replacing the last at the same path, and records
each durable generation. It is killed with a real SIGKILL: by the test at seeded random
instants (data writes, fsyncs, commits, all alike), or by itself right after one of the
commit's two renames, where a replaced checkpoint is most exposed. Then, in this process:
``aiockpt.load(path)`` gives one whole generation, no older than the newest the child saw
durable, with every checksum verified; and the next save to the path commits and clears
what the killed one left.

Seeds: PATH_CRASH_SEED=N reruns with seeds N, N+1, ...
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import aiockpt

CHILD = Path(__file__).with_name("path_save_child.py")
BASE_SEED = int(os.environ.get("PATH_CRASH_SEED", "20261129"))
STARTUP_TIMEOUT = 120.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX renames")

sys.path.insert(0, str(CHILD.parent))
from path_save_child import generation  # noqa: E402


def start_child(path: Path, progress: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(aiockpt.__file__).parents[1])}
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(path), str(progress), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready", child.stderr.read()
    return child


def durable_generations(progress: Path) -> list[int]:
    if not progress.exists():
        return []
    return [int(line) for line in progress.read_text().split()]


def check_path(path: Path, progress: Path, what: str) -> int:
    """The path loads one whole generation, at least the newest recorded durable."""
    state = aiockpt.load(path)  # every checksum verified
    value = state["meta"]["generation"]
    assert state["meta"] == {"generation": value, "name": f"gen-{value}"}, what
    expected = generation(value)["weights"]
    for name, tensor in expected.items():
        assert bool((state["weights"][name] == tensor).all()), f"{what}: {name} torn"
    recorded = durable_generations(progress)
    assert value >= max(recorded, default=1), f"{what}: {value} older than {recorded[-1:]}"
    return int(value)


def save_again(path: Path, value: int) -> None:
    """A later run saves to the same path: it commits, and nothing is left beside it."""
    try:
        aiockpt.save(generation(value), path).wait(timeout=120)
    finally:
        aiockpt.close_saves()
    assert aiockpt.load(path)["meta"]["generation"] == value
    assert sorted(os.listdir(path.parent)) == sorted([path.name, "progress"])


@pytest.mark.parametrize("point", ["aside", "in"])
def test_sigkill_between_the_commit_renames_leaves_a_loadable_checkpoint(
    tmp_path: Path, point: str
) -> None:
    path, progress = tmp_path / "model.ckpt", tmp_path / "progress"
    child = start_child(path, progress, "--kill-at", point)
    try:
        child.wait(timeout=STARTUP_TIMEOUT)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    names = os.listdir(tmp_path)
    replaced = [n for n in names if n.startswith(".trash-replace-model.ckpt-")]
    assert len(replaced) == 1, names  # the old checkpoint, moved aside
    if point == "aside":
        assert "model.ckpt" not in names  # killed before the new one was renamed in
        assert check_path(path, progress, point) == 1  # load reads the old one
    else:
        assert check_path(path, progress, point) == 2  # the new one is in place
    save_again(path, 7)


def test_sigkill_at_random_instants_never_loses_the_path(tmp_path: Path) -> None:
    rng = random.Random(BASE_SEED)
    path, progress = tmp_path / "model.ckpt", tmp_path / "progress"
    seen: list[int] = []
    start = 1
    for kill in range(4):
        delay = rng.uniform(0.3, 2.0)
        what = f"kill {kill} (seed {BASE_SEED}, delay {delay:.2f} s)"
        child = start_child(path, progress, "--start", str(start))
        try:
            time.sleep(delay)
            if kill == 0:
                while not durable_generations(progress):  # something to replace
                    assert child.poll() is None, child.stderr.read() if child.stderr else ""
                    time.sleep(0.01)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        finally:
            child.kill()
        if os.path.lexists(path) or durable_generations(progress):
            seen.append(check_path(path, progress, what))
        start = max([start, *seen, *durable_generations(progress)]) + 10
    assert seen, "no save ever became durable"
    save_again(path, start)
