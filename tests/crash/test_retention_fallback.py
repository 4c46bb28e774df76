"""Retention after a restore fell back, and steps the checkpoint format cannot hold.

The rule under test (FORMAT.md sections 1 and 7): restore takes the newest valid step;
the run then goes on from there, and its first commit moves every step above the one it
restored aside (``.superseded-step-<M>-<hex>``, ignored by readers), so that what restore
finds next, and what retention keeps, is the live run's timeline. Retention never deletes
the step just committed, nor anything newer in commit order, and never keeps a step that
restore already found corrupt as "the newest".
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import Bag

import aiockpt
from aiockpt.cli.ls import list_directory
from aiockpt.cli.main import main
from aiockpt.errors import ConfigError
from aiockpt.storage.local import SUPERSEDED_PREFIX, read_latest

REPO = Path(__file__).resolve().parents[2]


def _values(step: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(step)
    return {"w": torch.randn(32, 32, generator=generator), "step": step}


def save(root: Path, steps: list[int], keep_last: int | None = None, resume: bool = False) -> Bag:
    bag = Bag()
    config = aiockpt.Config(directory=root, keep_last=keep_last, num_threads=2)
    with aiockpt.SyncCheckpointer(config, bag=bag) as ckpt:
        if resume:
            ckpt.restore()
        for step in steps:
            bag.state = _values(step)
            ckpt.checkpoint(step).wait()
    return bag


def restore(root: Path, step: int | None = None) -> tuple[int | None, Bag]:
    bag = Bag()
    with aiockpt.SyncCheckpointer(aiockpt.Config(directory=root, keep_last=None), bag=bag) as c:
        return c.restore(step), bag


def steps_in(root: Path) -> list[int]:
    return [info.step for info in aiockpt.list_checkpoints(root)]


def superseded(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(SUPERSEDED_PREFIX))


def tear(step_dir: Path) -> None:
    data = next(step_dir.glob("data-*.bin"))
    os.truncate(data, data.stat().st_size // 2)


@pytest.fixture
def torn(tmp_path: Path) -> Path:
    """Steps 100 and 200, the newest torn: restore falls back to 100."""
    root = tmp_path / "ckpt"
    save(root, [100, 200])
    tear(root / "step-200")
    return root


def test_retention_after_a_fallback_keeps_the_resumed_run(torn: Path) -> None:
    bag = Bag()
    config = aiockpt.Config(directory=torn, keep_last=1, num_threads=2)
    with aiockpt.SyncCheckpointer(config, bag=bag) as ckpt:
        assert ckpt.restore() == 100
        bag.state = _values(150)
        ckpt.checkpoint(150).wait()
        # The torn step 200 is moved aside (kept), step 100 goes by keep_last = 1, and
        # the step just committed stays.
        assert steps_in(torn) == [150]
        assert [name.rsplit("-", 1)[0] for name in superseded(torn)] == [".superseded-step-200"]
        assert read_latest(torn) == "step-150"
    step, restored = restore(torn)
    assert step == 150 and restored.state["step"] == 150
    assert torch.equal(restored.state["w"], _values(150)["w"])
    leftovers = list_directory(torn)["leftovers"]
    assert [(left["kind"], left["step"]) for left in leftovers] == [("superseded", 200)]
    assert "superseded" in leftovers[0]["explanation"]


def test_superseded_steps_go_once_the_resumed_run_passes_them(torn: Path) -> None:
    save(torn, [150, 190], keep_last=2, resume=True)
    assert steps_in(torn) == [150, 190] and len(superseded(torn)) == 1
    save(torn, [200, 210], keep_last=2, resume=True)
    assert steps_in(torn) == [200, 210] and superseded(torn) == []
    assert restore(torn)[0] == 210


def test_a_rewind_supersedes_the_valid_steps_above_it(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save(root, [100, 200, 300])
    bag = Bag()
    with aiockpt.SyncCheckpointer(aiockpt.Config(directory=root, keep_last=None), bag=bag) as c:
        assert c.restore(step=100) == 100
        bag.state = _values(150)
        c.checkpoint(150).wait()
    assert steps_in(root) == [100, 150]
    assert len(superseded(root)) == 2  # kept for salvage, never restored
    assert restore(root)[0] == 150


def test_a_run_that_did_not_restore_never_loses_its_own_commit(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save(root, [100, 200])
    # A writer that did not restore commits a lower step: retention (keep_last = 1) must
    # neither delete it (the newest in commit order) nor move step 200 aside.
    save(root, [150], keep_last=1)
    assert steps_in(root) == [150, 200]
    assert superseded(root) == []


def test_prune_deletes_superseded_steps(torn: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save(torn, [150], keep_last=None, resume=True)
    assert len(superseded(torn)) == 1
    assert main(["prune", str(torn), "--keep-last", "1"]) == 0
    capsys.readouterr()
    assert superseded(torn) == [] and steps_in(torn) == [150]
    assert read_latest(torn) == "step-150"


# -- steps the format cannot hold -----------------------------------------------------------


@pytest.mark.parametrize("bad", [2**63, 2**64 + 5, -1, True, 1.0, "3"])
def test_a_step_outside_the_format_is_refused_before_anything_changes(
    tmp_path: Path, bad: object
) -> None:
    root = tmp_path / "ckpt"
    save(root, [1])
    before = sorted(p.name for p in root.iterdir())
    bag = Bag(_values(2))
    config = aiockpt.Config(directory=root, keep_last=1, num_threads=2)
    with aiockpt.SyncCheckpointer(config, bag=bag) as ckpt:
        with pytest.raises(ConfigError, match=r"non-negative int, at most 9223372036854775807"):
            ckpt.checkpoint(bad)  # type: ignore[arg-type]
        ckpt.wait()
    assert sorted(p.name for p in root.iterdir()) == before
    assert restore(root)[0] == 1


def test_the_largest_step_the_format_holds_round_trips(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save(root, [1, 2**63 - 1], keep_last=1)
    assert steps_in(root) == [2**63 - 1]
    step, bag = restore(root)
    assert step == 2**63 - 1 and bag.state["step"] == 2**63 - 1


# -- SIGKILL at random points of a resumed run: restore never finds nothing ------------------

_RESUMED_RUN = textwrap.dedent(
    """
    import sys
    import torch
    import aiockpt
    from conftest import Bag
    root, keep_last = sys.argv[1], int(sys.argv[2])
    bag = Bag()
    config = aiockpt.Config(directory=root, keep_last=keep_last, num_threads=2)
    ckpt = aiockpt.SyncCheckpointer(config, bag=bag)
    start = ckpt.restore()
    print("RESTORED", start, flush=True)
    step = start
    while True:
        step += 7
        generator = torch.Generator().manual_seed(step)
        bag.state = {"w": torch.randn(32, 32, generator=generator), "step": step}
        ckpt.checkpoint(step).wait()
        print("COMMITTED", step, flush=True)
    """
)


def _run_and_kill(root: Path, keep_last: int, delay: float) -> tuple[int, list[int]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    child = subprocess.Popen(
        [sys.executable, "-c", _RESUMED_RUN, str(root), str(keep_last)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    first = child.stdout.readline().split()
    assert first[:1] == ["RESTORED"], first
    try:
        child.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
    child.wait()
    committed = [int(line.split()[1]) for line in child.stdout if line.startswith("COMMITTED")]
    return int(first[1]), committed


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_during_a_resumed_run_always_leaves_a_checkpoint(torn: Path, seed: int) -> None:
    rng = random.Random(seed)
    resumed_from = 100
    for _ in range(3):
        start, committed = _run_and_kill(torn, keep_last=1, delay=rng.uniform(0.0, 0.6))
        assert start >= resumed_from
        step, bag = restore(torn)
        assert step is not None, "nothing restores after the kill"
        # The newest commit that was reported durable (or one in flight past it) comes back.
        assert step >= max(committed, default=start)
        assert bag.state["step"] == step
        assert torch.equal(bag.state["w"], _values(step)["w"])
        latest = read_latest(torn)
        assert latest is None or (torn / latest).is_dir()
        resumed_from = step


_KILLED_PRUNE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import aiockpt.storage.local
    from aiockpt.cli.prune import prune
    # Die for real right after the first checkpoint was renamed to trash, before any
    # byte of it is deleted: the instant at which `latest` used to dangle.
    aiockpt.storage.local.shutil.rmtree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    prune(Path(sys.argv[1]), keep_last=0)
    """
)


def test_prune_killed_mid_removal_leaves_latest_naming_a_checkpoint(torn: Path) -> None:
    assert read_latest(torn) == "step-200"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", _KILLED_PRUNE, str(torn)], env=env, timeout=240)
    assert result.returncode == -signal.SIGKILL
    assert not (torn / "step-200").exists()
    assert read_latest(torn) == "step-100"
    assert restore(torn)[0] == 100
