"""Path-level saves: ``aiockpt.save(state, path)`` / ``save_async`` and ``aiockpt.load(path)``.

Real files on the real filesystem throughout; failures come from the OS-call boundary
(``os.fsync`` failing with EIO on one file), as a failing disk would give them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MixedModel, assert_state_equal, clone_state

import aiockpt


def small_config(**overrides: Any) -> aiockpt.Config:
    base: dict[str, Any] = dict(chunk_size_mb=0.25, num_threads=4)
    return aiockpt.Config(**{**base, **overrides})


@pytest.fixture
def saver() -> Iterator[aiockpt.PathSaver]:
    with aiockpt.PathSaver(small_config()) as owner:
        yield owner


def generation(value: int, n: int = 200_000) -> dict[str, Any]:
    """Plain state whose every value says ``value``."""
    return {
        "weights": {
            "a": torch.full((n,), float(value)),
            "b": torch.full((n // 7, 7), value, dtype=torch.int64),
        },
        "meta": {"generation": value, "name": f"gen-{value}"},
    }


def assert_generation(state: dict[str, Any], value: int) -> None:
    """Every tensor and value of ``state`` is of one generation: ``value``."""
    assert state["meta"] == {"generation": value, "name": f"gen-{value}"}
    assert bool((state["weights"]["a"] == float(value)).all()), "torn: mixed generations"
    assert bool((state["weights"]["b"] == value).all()), "torn: mixed generations"


def siblings(path: Path) -> list[str]:
    return sorted(os.listdir(path.parent))


# -- round trips ---------------------------------------------------------------------------
def test_round_trip_is_bit_exact(tmp_path: Path, saver: aiockpt.PathSaver) -> None:
    model = MixedModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    plain = {
        "state_dict": OrderedDict((k, v.clone()) for k, v in model.state_dict().items()),
        "epoch": 3,
        "versions": ("2.6", None, 1.5, float("nan")),
        "lists": [[torch.arange(5, dtype=torch.int16)], {"x": torch.tensor(2.5)}],
        "bf16": torch.randn(33, 3).bfloat16(),
        "empty": {},
    }
    expected = {
        "model": clone_state(model.state_dict()),
        "optimizer": clone_state(optimizer.state_dict()),
        **clone_state(plain),
    }
    handle = saver.save({"model": model, "optimizer": optimizer, **plain}, tmp_path / "one")
    assert handle.wait() == tmp_path / "one"
    assert not handle.skipped and handle.done()
    assert_state_equal(aiockpt.load(tmp_path / "one"), expected)
    assert siblings(tmp_path / "one") == ["one"]  # no temporary left beside it


def test_the_snapshot_is_taken_when_save_returns(tmp_path: Path, saver: aiockpt.PathSaver) -> None:
    state = generation(1, n=2_000_000)
    handle = saver.save(state, tmp_path / "snap")
    # Training goes on at once: every tensor changes before the bytes reach the disk.
    state["weights"]["a"].fill_(99.0)
    state["weights"]["b"].fill_(99)
    state["meta"]["generation"] = 99
    handle.wait()
    assert_generation(aiockpt.load(tmp_path / "snap"), 1)


def test_the_module_level_save_and_save_async(tmp_path: Path) -> None:
    try:
        first = aiockpt.save(generation(1), tmp_path / "sync", step=12, config=small_config())
        assert first.wait(timeout=60) == tmp_path / "sync"

        async def main() -> Path | None:
            handle = await aiockpt.save_async(
                generation(2), tmp_path / "async", config=small_config()
            )
            return await handle

        assert asyncio.run(main()) == tmp_path / "async"
    finally:
        aiockpt.close_saves()
    assert_generation(aiockpt.load(tmp_path / "sync"), 1)
    assert_generation(aiockpt.load(tmp_path / "async"), 2)
    manifest = (tmp_path / "sync" / "manifest.json").read_text()
    assert '"step":12' in manifest


def test_a_step_name_and_its_step_must_agree(tmp_path: Path, saver: aiockpt.PathSaver) -> None:
    saver.save(generation(1), tmp_path / "step-40").wait()  # step 40 by default
    assert aiockpt.list_checkpoints(tmp_path)[0].step == 40
    with pytest.raises(aiockpt.ConfigError, match="step-<N> must hold step 41"):
        saver.save(generation(1), tmp_path / "step-41", step=7)
    assert not (tmp_path / "step-41").exists()


def test_staging_memory_is_kept_while_the_structure_holds(
    tmp_path: Path, saver: aiockpt.PathSaver
) -> None:
    saver.save(generation(1), tmp_path / "a").wait()
    staging, layout = saver.staging, saver.layout
    assert staging is not None and layout is not None and staging.host_pool_bytes > 0
    for value in range(2, 5):  # new paths, same structure: nothing is set up again
        saver.save(generation(value), tmp_path / f"p{value}").wait()
        assert saver.layout == layout
        assert saver.staging is not None
        assert saver.staging.host_pool_bytes == staging.host_pool_bytes
    assert saver.stats.committed == 4
    saver.close()
    assert saver.staging is None and saver.layout is None
    with pytest.raises(aiockpt.CheckpointError, match="closed"):
        saver.save(generation(5), tmp_path / "late")


# -- replacing, refusing ---------------------------------------------------------------------
def test_a_save_replaces_the_checkpoint_at_its_path(
    tmp_path: Path, saver: aiockpt.PathSaver
) -> None:
    path = tmp_path / "run" / "latest-weights"  # parents are made
    for value in (1, 2, 3):
        saver.save(generation(value), path).wait()
        assert_generation(aiockpt.load(path), value)
        assert siblings(path) == ["latest-weights"]


@pytest.mark.parametrize("kind", ["file", "symlink", "full-directory", "file-as-parent"])
def test_a_path_holding_something_else_is_refused_untouched(
    tmp_path: Path, saver: aiockpt.PathSaver, kind: str
) -> None:
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("precious")
    elif kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    elif kind == "full-directory":
        target.mkdir()
        (target / "notes.txt").write_text("precious")
        (target / "manifest.json").write_text('{"not": "ours"}')
    else:
        target.write_text("precious")
        target = target / "child"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(aiockpt.ConfigError, match="cannot save to") as caught:
        saver.save(generation(1), target)
    assert str(target) in str(caught.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert saver.stats.requested == 0


def test_an_empty_directory_is_taken(tmp_path: Path, saver: aiockpt.PathSaver) -> None:
    (tmp_path / "empty").mkdir()
    saver.save(generation(1), tmp_path / "empty").wait()
    assert_generation(aiockpt.load(tmp_path / "empty"), 1)


def test_bad_state_is_refused_before_anything_is_written(
    tmp_path: Path, saver: aiockpt.PathSaver
) -> None:
    class Opaque:
        pass

    with pytest.raises(aiockpt.UnsupportedStateError, match=r"callbacks.*Opaque"):
        saver.save({"callbacks": {"mine": Opaque()}}, tmp_path / "bad")
    with pytest.raises(aiockpt.UnsupportedStateError, match="ema/model"):
        saver.save({"ema/model": {}}, tmp_path / "bad")
    with pytest.raises(aiockpt.UsageError, match="non-empty mapping"):
        saver.save([torch.zeros(3)], tmp_path / "bad")  # type: ignore[arg-type]
    with pytest.raises(aiockpt.ConfigError, match=r"str or os\.PathLike"):
        saver.save(generation(1), 42)  # type: ignore[arg-type]
    with pytest.raises(aiockpt.UnsupportedStateError):
        saver.save({"when": Path("x")}, tmp_path / "new" / "bad")
    assert os.listdir(tmp_path) == []  # not even the parent directories were made


# -- concurrency ----------------------------------------------------------------------------
def test_saves_in_flight_to_one_path_commit_in_order(tmp_path: Path) -> None:
    path = tmp_path / "hot"
    with aiockpt.PathSaver(small_config(max_async=3)) as saver:
        handles = [saver.save(generation(value), path) for value in range(1, 9)]
        assert [h.wait() for h in handles] == [path] * 8
    assert_generation(aiockpt.load(path), 8)  # the later one wins
    assert siblings(path) == ["hot"]


def test_two_savers_racing_on_one_path_never_tear_it(tmp_path: Path) -> None:
    path = tmp_path / "shared"
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            with aiockpt.PathSaver(small_config(max_async=2)) as saver:
                for value in range(offset, offset + 12, 2):
                    saver.save(generation(value), path)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(start,)) for start in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    state = aiockpt.load(path)  # verifies every checksum
    assert state["meta"]["generation"] in (11, 12)  # the last of one saver or the other
    assert_generation(state, state["meta"]["generation"])
    assert siblings(path) == ["shared"]


# -- failures -----------------------------------------------------------------------------
class FailingFsync:
    """``os.fsync`` of the N-th data file written beside ``path`` fails with EIO."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path, nth: int = 1) -> None:
        self.pattern = re.compile(re.escape(f"/.tmp-{path.name}-p") + r"\d+-\w+/data-")
        self.nth, self.seen, self.armed = nth, 0, True
        self.raised: list[OSError] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if self.armed and self.pattern.search(target):
                self.seen += 1
                if self.seen == self.nth:
                    error = OSError(errno.EIO, os.strerror(errno.EIO), target)
                    self.raised.append(error)
                    raise error
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_a_failed_save_is_raised_by_wait_and_leaves_the_old_one(
    tmp_path: Path, saver: aiockpt.PathSaver, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt"
    saver.save(generation(1), path).wait()
    fault = FailingFsync(monkeypatch, path, nth=2)
    handle = saver.save(generation(2), path)
    with pytest.raises(aiockpt.BackgroundError, match=r"save to .*ckpt failed") as caught:
        handle.wait()
    assert caught.value.__cause__ is fault.raised[0]
    assert_generation(aiockpt.load(path), 1)  # the old checkpoint is intact
    assert siblings(path) == ["ckpt"]
    fault.armed = False
    saver.save(generation(3), path).wait()  # reported once; saving goes on
    assert_generation(aiockpt.load(path), 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_a_failure_nobody_waited_for_is_raised_by_the_next_save(
    tmp_path: Path, saver: aiockpt.PathSaver, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt"
    fault = FailingFsync(monkeypatch, path)
    unwatched = saver.save(generation(1), path)
    while not unwatched.done():
        threading.Event().wait(0.01)
    fault.armed = False
    with pytest.raises(aiockpt.BackgroundError) as caught:
        saver.save(generation(2), path)
    assert caught.value.__cause__ is fault.raised[0]
    saver.save(generation(2), path).wait()
    assert_generation(aiockpt.load(path), 2)


EXIT_SCRIPT = """
import errno, os, sys, torch, aiockpt
path = sys.argv[1]
if sys.argv[2] == "fail":
    real = os.fsync
    def fsync(fd):
        if "/.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "injected", path)
        real(fd)
    os.fsync = fsync
state = {"w": torch.arange(3_000_000, dtype=torch.float32), "note": "exit"}
aiockpt.save(state, path, config=aiockpt.Config(chunk_size_mb=1, num_threads=2))
print("returned", flush=True)
# no wait(), no close(): the interpreter exits with the save in flight
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_saves_in_flight_finish_at_exit_and_failures_are_said(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "at-exit"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(EXIT_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(aiockpt.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), str(path), mode],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "returned" in done.stdout, done.stderr
    if mode == "ok":
        assert done.returncode == 0, done.stderr
        state = aiockpt.load(path)
        assert torch.equal(state["w"], torch.arange(3_000_000, dtype=torch.float32))
    else:
        assert "failed in the background" in done.stderr, done.stderr
        assert "OSError" in done.stderr and "injected" in done.stderr
        assert not path.exists()
    assert siblings(path) == (["at-exit", "child.py"] if mode == "ok" else ["child.py"])


def test_remove_waits_for_the_save_and_refuses_what_is_not_ours(
    tmp_path: Path, saver: aiockpt.PathSaver
) -> None:
    path = tmp_path / "gone"
    saver.save(generation(1, n=2_000_000), path)
    saver.wait(path)
    assert_generation(aiockpt.load(path), 1)
    saver.save(generation(2, n=2_000_000), path)
    assert saver.remove(path)  # after the save in flight, not under it
    assert siblings(path) == []
    assert not saver.remove(path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("precious")
    with pytest.raises(aiockpt.ConfigError, match="no aiockpt"):
        saver.remove(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "precious"


# -- GPU state (tests/gpu runs these on a CUDA machine) ----------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("staging", ["gpu", "host"])
def test_gpu_state_saved_as_plain_tensors_is_the_state_at_the_call(
    tmp_path: Path, staging: str
) -> None:
    """A framework's checkpoint dict: plain tensors, no optimizer object to hook. Training
    goes on on the same stream the moment save() returns; the bytes saved are the ones
    at the call, with gpu staging (stream order) and host staging (the stream waits)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 512)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def train(steps: int) -> None:
        for _ in range(steps):
            model(torch.randn(256, 2048, device="cuda")).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    train(2)
    expected = clone_state({"state_dict": model.state_dict(), "opt": [optimizer.state_dict()]})
    config = small_config(chunk_size_mb=1, staging=staging)
    with aiockpt.PathSaver(config) as saver:
        handle = saver.save(
            {"state_dict": model.state_dict(), "opt": [optimizer.state_dict()]}, tmp_path / "g"
        )
        train(3)  # in place, on the current stream, before the copies are known done
        assert handle.wait() == tmp_path / "g"
        assert saver.staging is not None
        modes = saver.staging.modes  # Adam's step counters stay on the CPU
        assert {mode for device, mode in modes.items() if device.startswith("cuda")} == {staging}
    loaded = aiockpt.load(tmp_path / "g")
    assert_state_equal(loaded, clone_state(_to_cpu(expected)))


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, OrderedDict):
        copy = OrderedDict((k, _to_cpu(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            copy._metadata = value._metadata  # type: ignore[attr-defined]
        return copy
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
