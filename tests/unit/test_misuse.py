"""The runtime under misuse: bad settings and config files, a config given as a path, an
RNGState handed to the Trainer, Ctrl-C with checkpoints in flight, several threads at once.

Every refusal is an aiockpt error whose message names what was wrong and what to do.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_state_equal, clone_state, make_config, run
from torch import nn

import aiockpt
from aiockpt.config import _KEYS, Config
from aiockpt.errors import AiockptError, ConfigError, EventLoopError, UsageError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: bytes | str, name: str = "aiockpt.toml") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# -- Config: every key, every way of getting it wrong -----------------------------------------
def test_misspelt_keyword_suggests_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        Config(directry="x")  # type: ignore[call-arg]
    msg = str(info.value)
    assert "unknown key 'directry' passed to Config()" in msg
    assert "did you mean 'directory'?" in msg and "valid keys are: directory," in msg


def test_positional_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"keyword arguments only.*Config\(directory='x'"):
        Config("x")  # type: ignore[misc]


def test_config_still_copies_and_replaces() -> None:
    import copy
    import pickle

    c = Config(directory="d", max_async=3)
    assert copy.deepcopy(c) == c and pickle.loads(pickle.dumps(c)) == c
    assert c.replace(max_async=4).max_async == 4


# One wrong type and one out-of-range value (where a range exists) for every key.
WRONG = {
    "directory": [b"raw-bytes", "nul\x00inside", ""],
    "interval_steps": [10.0, "10", -1, 0],
    "interval_seconds": ["60", -5, 10**400, float("nan")],
    "max_overhead": ["0.1", 1.5, -0.1],
    "keep_last": [3.0, "3", -1],
    "max_async": [2.0, "2", True, -2, 10**30],
    "chunk_size_mb": ["64", -1, 10**400],
    "chunk_count": [8.0, "8", -3],
    "num_threads": [4.5, "4", -4],
    "pinned_ratio": ["1", -1.0, 10**400],
    "staging": [1, "cuda"],
    "use_monitor": ["false", 0],
    "on_backpressure": [True, "wait"],
    "on_error": [None, "ignore"],
    "durable": ["true", 1.0],
    "incremental": ["yes", 0],
    "verbose": ["no", None],
    "rank_timeout_s": ["30", -1, float("inf"), 10**400],
    # A tier's sub-keys are named as memory.<key>: tests/unit/test_tiers.py.
    "memory": [5, "interval_steps=5", [2]],
    "remote": [True, "/mnt/nfs/run-1"],
    "preemption_signals": ["SIGTERM", ["SIGKILL"], ["SIGTREM"], [15], None],
    "preemption_grace_s": ["30", 0, -1.0, float("nan")],
}


def test_every_key_has_wrong_values_listed() -> None:
    assert set(WRONG) == set(_KEYS)


@pytest.mark.parametrize(
    ("key", "value"), [(k, v) for k, values in WRONG.items() for v in values], ids=repr
)
def test_wrong_value_names_key_value_and_what_is_allowed(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**{key: value})
    msg = str(info.value)
    shown = repr(value)
    assert msg.startswith(f"{key} = {shown if len(shown) <= 80 else shown[:40]}")
    assert "expected " in msg
    assert len(msg) < 400  # a 400-digit number is not spelt out in full


def test_hints_for_the_usual_slips() -> None:
    with pytest.raises(ConfigError, match=r"a bool, not the string 'false'"):
        Config(use_monitor="false")
    with pytest.raises(ConfigError, match=r"write 10, without the fraction"):
        Config(interval_steps=10.0)
    with pytest.raises(ConfigError, match="NUL byte"):
        Config(directory="a\x00b")


def test_huge_integer_for_a_float_key_is_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"pinned_ratio = 1000.*is out of range"):
        Config(pinned_ratio=10**400)


# -- Config files that are not what they should be --------------------------------------------
def test_toml_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, b'[checkpoint]\ndirectory = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="is not UTF-8") as info:
        Config.from_toml(path)
    assert str(path) in str(info.value)


def test_toml_with_a_nul_in_directory_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[checkpoint]\ndirectory = "run\\u0000one"\n')
    with pytest.raises(ConfigError, match="directory = 'run\\\\x00one' contains a NUL") as info:
        Config.from_toml(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text", ["[checkpoint\n", "[checkpoint]\nmax_async = = 2\n", "x = " + "[" * 3000]
)
def test_toml_that_does_not_parse(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        Config.from_toml(path)
    assert str(path) in str(info.value)


def test_toml_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory") as info:
        Config.from_toml(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_toml_path_is_a_fifo_fails_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "aiockpt.toml"
    os.mkfifo(fifo)  # reading it would wait for a writer that never comes
    with pytest.raises(ConfigError, match="is not a regular file") as info:
        Config.from_toml(fifo)
    assert str(fifo) in str(info.value)


@pytest.mark.parametrize("path", [None, 3, b"aiockpt.toml"])
def test_toml_path_of_the_wrong_type(path: Any) -> None:
    with pytest.raises(ConfigError, match=r"config file path .* has the wrong type"):
        Config.from_toml(path)


def test_quoted_bool_in_toml_says_to_drop_the_quotes(tmp_path: Path) -> None:
    path = write(tmp_path, '[checkpoint]\nuse_monitor = "false"\n')
    with pytest.raises(ConfigError, match="in TOML write it without quotes") as info:
        Config.from_toml(path)
    assert "use_monitor = 'false'" in str(info.value) and str(path) in str(info.value)


# -- A config file path wherever a Config goes -------------------------------------------------
@pytest.mark.parametrize("as_text", [True, False], ids=["str", "PathLike"])
@pytest.mark.parametrize("front", ["sync", "async"])
def test_checkpointers_take_a_toml_path(tmp_path: Path, front: str, as_text: bool) -> None:
    directory = tmp_path / "from-file"
    path = write(tmp_path, f'[checkpoint]\ndirectory = "{directory}"\nkeep_last = 5\n')
    source: Any = str(path) if as_text else path
    model = nn.Linear(3, 2)
    if front == "sync":
        with aiockpt.SyncCheckpointer(source, model=model) as sync:
            assert sync.config.keep_last == 5
            sync.checkpoint(1).wait()
    else:

        async def main() -> None:
            async with aiockpt.Checkpointer(source, model=model) as ckpt:
                assert ckpt.config.keep_last == 5
                await (await ckpt.checkpoint(1))

        run(main())
    assert [i.step for i in aiockpt.list_checkpoints(directory)] == [1]


@pytest.mark.parametrize("cls", [aiockpt.Checkpointer, aiockpt.SyncCheckpointer])
def test_checkpointer_config_of_the_wrong_type(tmp_path: Path, cls: Any) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\(config=dict\) has the wrong type"):
        cls({"directory": str(tmp_path)}, model=model)
    # The objects to save given positionally: the message says they are keywords.
    with pytest.raises(ConfigError, match="the objects to save are keyword arguments"):
        cls(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="does not exist"):
        cls(str(tmp_path / "missing.toml"), model=model)
    assert not (tmp_path / "checkpoints").exists()


def test_checkpointer_needs_stateful_objects(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    with pytest.raises(UsageError, match="at least one object"):
        aiockpt.SyncCheckpointer(cfg)
    with pytest.raises(UsageError, match="model=int has no state_dict"):
        aiockpt.SyncCheckpointer(cfg, model=3)


# -- The Trainer and an RNGState of the caller's own ------------------------------------------
class DropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.4), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def noisy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    # Dropout draws from torch's RNG; the weights below from Python's and numpy's, so a
    # resume is exact only if all three come back.
    x, y = batch
    weight = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
    return nn.functional.cross_entropy(model(x), y) * weight


def make_trainer(directory: Path, **kw: Any) -> aiockpt.Trainer:
    torch.manual_seed(0)
    model = DropNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = aiockpt.Config(directory=directory, interval_steps=3, keep_last=None, num_threads=2)
    return aiockpt.Trainer(model, optimizer, noisy_loss, config=cfg, **kw)


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))] * count


def test_trainer_takes_an_rngstate_and_resumes_bit_exact(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    data = batches(9)

    async def first_run() -> tuple[list[float], dict[str, Any]]:
        torch.manual_seed(11), random.seed(11), np.random.seed(11)
        losses = []
        async with make_trainer(directory, rng=aiockpt.RNGState()) as trainer:
            for batch in data:
                losses.append((await trainer.train_step(batch)).item())
            await trainer.wait()
            state = clone_state(
                {"model": trainer.model.state_dict(), "opt": trainer.optimizer.state_dict()}
            )
        return losses, state

    async def resumed(step: int) -> tuple[list[float], dict[str, Any]]:
        # Different seeds: only the checkpoint can bring the generators back.
        torch.manual_seed(99), random.seed(99), np.random.seed(99)
        losses = []
        async with make_trainer(directory, rng=aiockpt.RNGState()) as trainer:
            assert await trainer.resume(step) == step
            for batch in data[step:]:
                losses.append((await trainer.train_step(batch)).item())
            state = clone_state(
                {"model": trainer.model.state_dict(), "opt": trainer.optimizer.state_dict()}
            )
        return losses, state

    losses, state = run(first_run())
    assert [i.step for i in aiockpt.list_checkpoints(directory)] == [3, 6, 9]
    saved = aiockpt.load(directory / "step-3")
    # The RNG is saved once, under `rng`, and nowhere else.
    assert sorted(saved) == ["model", "optimizer", "rng", "trainer"]
    assert sorted(saved["rng"]) == ["numpy", "python", "torch"]
    again, state_again = run(resumed(3))
    assert again == losses[3:]
    assert_state_equal(state_again, state)


def test_trainer_refuses_a_second_rng_or_a_stranger_under_rng(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="would save them twice; pass it as rng="):
        make_trainer(tmp_path / "a", rngs=aiockpt.RNGState())
    with pytest.raises(UsageError, match=r"rng=Generator: .* takes an aiockpt.RNGState"):
        make_trainer(tmp_path / "b", rng=torch.Generator())
    with pytest.raises(UsageError, match="a GradScaler goes in grad_scaler="):
        make_trainer(tmp_path / "c", scaler=torch.amp.GradScaler("cpu"))
    # None under rng means the Trainer's own, as when it is left out.
    trainer = make_trainer(tmp_path / "d", rng=None)
    run(trainer.close())


def test_errors_are_aiockpt_errors() -> None:
    assert issubclass(UsageError, AiockptError) and issubclass(UsageError, TypeError)
    assert issubclass(aiockpt.EventLoopError, AiockptError)


# -- Ctrl-C while checkpoints are in flight, without the monitor thread -----------------------
# The child trains a small model on CPU, checkpoints every step, and is sent SIGINT at a
# random instant. Training step k is a pure function of k, so the test can replay it.
def recipe() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 32))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 32, generator=g)
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def sigint_config(directory: Path) -> Config:
    # Every checkpoint writes its bytes (the state does not change between them, which an
    # incremental checkpoint would share instead): Ctrl-C must land mid-write.
    return Config(
        directory=directory,
        use_monitor=False,
        keep_last=2,
        chunk_count=4,
        num_threads=2,
        incremental=False,
    )


async def async_child(directory: Path) -> None:
    model, optimizer = recipe()
    async with aiockpt.Checkpointer(
        sigint_config(directory), model=model, optimizer=optimizer
    ) as ckpt:
        step = 0
        while True:
            step += 1
            train_step(model, optimizer, step)
            await ckpt.checkpoint(step)
            await asyncio.sleep(0)  # the pipeline runs on this loop: let it move
            if step == 2:
                await ckpt.wait()
                (directory / "ready").touch()


def sync_child(directory: Path) -> None:
    model, optimizer = recipe()
    with aiockpt.SyncCheckpointer(
        sigint_config(directory), model=model, optimizer=optimizer
    ) as ckpt:
        step = 0
        while True:
            step += 1
            train_step(model, optimizer, step)
            ckpt.checkpoint(step)
            if step == 2:
                (directory / "ready").touch()


def child_main(front: str, directory: Path) -> int:
    try:
        if front == "sync":
            sync_child(directory)
        else:
            asyncio.run(async_child(directory))
    except KeyboardInterrupt:
        return 3  # interrupted, and close() returned
    return 1


def serve_trials() -> None:
    """Fork one child per trial: torch is imported once, each child is a real process.

    Reads ``FRONT DIRECTORY`` lines; answers ``pid N`` at once and ``exit CODE`` when the
    child has ended.
    """
    recipe()  # the first model built pays seconds of lazy initialisation: not per child
    for line in sys.stdin:
        front, directory = line.split()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                code = child_main(front, Path(directory))
            finally:
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


def expected_model(step: int) -> dict[str, Any]:
    model, optimizer = recipe()
    for k in range(1, step + 1):
        train_step(model, optimizer, k)
    return clone_state(model.state_dict())


def read_line(server: subprocess.Popen[str], timeout: float) -> str | None:
    assert server.stdout is not None
    ready, _, _ = select.select([server.stdout], [], [], timeout)
    return server.stdout.readline().strip() if ready else None


@pytest.mark.slow
@pytest.mark.parametrize(("front", "trials"), [("sync", 20), ("async", 10)])
def test_sigint_with_checkpoints_in_flight_always_exits(
    tmp_path: Path, front: str, trials: int
) -> None:
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    server = subprocess.Popen(
        [sys.executable, __file__, "sigint-server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stdin is not None
    try:
        for trial in range(trials):
            directory = tmp_path / f"trial-{trial}"
            server.stdin.write(f"{front} {directory}\n")
            server.stdin.flush()
            answer = read_line(server, 60)
            assert answer is not None and answer.startswith("pid "), answer
            pid = int(answer.split()[1])
            deadline = time.monotonic() + 60
            while not (directory / "ready").exists():
                assert time.monotonic() < deadline, f"trial {trial}: the child never got ready"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGINT)
            ended = read_line(server, 30)
            if ended is None:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"trial {trial}: the child still runs 30 s after SIGINT")
            assert ended == "exit 3", f"trial {trial}: {ended}"
            steps = [info.step for info in aiockpt.list_checkpoints(directory)]
            assert steps, f"trial {trial}: nothing committed"
            model, optimizer = recipe()
            with aiockpt.SyncCheckpointer(
                Config(directory=directory), model=model, optimizer=optimizer
            ) as ckpt:
                assert ckpt.restore() == steps[-1]
            assert_state_equal(clone_state(model.state_dict()), expected_model(steps[-1]))
    finally:
        server.stdin.close()
        server.wait(timeout=30)


class SlowWrites:
    """Holds every chunk write for ``seconds``: time for Ctrl-C to land mid-checkpoint."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        self.seconds = seconds
        self.real = os.pwrite
        monkeypatch.setattr(os, "pwrite", self)

    def __call__(self, fd: int, data: Any, offset: int) -> int:
        time.sleep(self.seconds)
        return self.real(fd, data, offset)


def sigint_after(*delays: float) -> None:
    def send() -> None:
        for delay in delays:
            time.sleep(delay)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=send, daemon=True).start()


@pytest.fixture
def default_sigint() -> None:
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("the test runner replaced the SIGINT handler")


@pytest.mark.usefixtures("default_sigint")
def test_first_ctrl_c_lets_the_checkpoint_finish_then_interrupts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = recipe()
    with aiockpt.SyncCheckpointer(
        sigint_config(tmp_path / "ckpt"), model=model, optimizer=optimizer
    ) as ckpt:
        ckpt.checkpoint(1)
        SlowWrites(monkeypatch, 0.3)
        sigint_after(0.1)
        with pytest.raises(KeyboardInterrupt):
            ckpt.checkpoint(2)
        # Raised once the call was done: step 2 is durable, and the checkpointer still works.
        assert [i.step for i in aiockpt.list_checkpoints(tmp_path / "ckpt")] == [1, 2]
        monkeypatch.undo()
        ckpt.checkpoint(3)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("default_sigint")
def test_second_ctrl_c_abandons_the_checkpoint_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = recipe()
    directory = tmp_path / "ckpt"
    with aiockpt.SyncCheckpointer(
        sigint_config(directory), model=model, optimizer=optimizer
    ) as ckpt:
        ckpt.checkpoint(1)
        SlowWrites(monkeypatch, 1.0)
        sigint_after(0.1, 0.1)
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            ckpt.checkpoint(2)
        assert time.monotonic() - started < 5
        monkeypatch.undo()
        # Nothing of step 2 became visible, and the next checkpoint is not stuck behind it.
        assert [i.step for i in aiockpt.list_checkpoints(directory)] == [1]
        ckpt.checkpoint(3)
    assert [i.step for i in aiockpt.list_checkpoints(directory)] == [1, 3]
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp")) == []


# -- several threads at once -------------------------------------------------------------------
@pytest.mark.parametrize("use_monitor", [False, True], ids=["direct", "monitor"])
def test_sync_checkpointer_serialises_threads(tmp_path: Path, use_monitor: bool) -> None:
    model, optimizer = recipe()
    directory = tmp_path / "ckpt"
    cfg = Config(directory=directory, use_monitor=use_monitor, keep_last=None, num_threads=2)
    errors: list[BaseException] = []
    handles: list[Any] = []
    with aiockpt.SyncCheckpointer(cfg, model=model, optimizer=optimizer) as ckpt:
        start = threading.Barrier(4)

        def worker(first: int) -> None:
            try:
                start.wait()
                for step in range(first, first + 20, 4):
                    handles.append(ckpt.checkpoint(step))
                ckpt.wait()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a thread is stuck"
        assert errors == []
    assert sorted(h.wait().step for h in handles) == list(range(20))
    assert [i.step for i in aiockpt.list_checkpoints(directory)] == list(range(20))
    assert_state_equal(aiockpt.load(directory / "step-19")["model"], model.state_dict())


def test_async_checkpointer_without_monitor_refuses_a_second_loop(tmp_path: Path) -> None:
    model, optimizer = recipe()
    cfg = sigint_config(tmp_path / "ckpt")
    ckpt = aiockpt.Checkpointer(cfg, model=model, optimizer=optimizer)

    async def first() -> None:
        await (await ckpt.checkpoint(1))

    async def from_another_thread() -> None:
        await ckpt.checkpoint(2)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(first())
    outcome: list[BaseException] = []
    thread = threading.Thread(
        target=lambda: outcome.append(_raised(lambda: asyncio.run(from_another_thread())))
    )
    thread.start()
    thread.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], EventLoopError), outcome
    message = str(outcome[0])
    assert "binds a checkpointer to the one event loop" in message
    assert "use_monitor = true" in message
    loop.run_until_complete(ckpt.close())
    loop.close()
    assert [i.step for i in aiockpt.list_checkpoints(cfg.directory)] == [1]


def test_async_checkpointer_refuses_a_second_thread_while_one_is_in_a_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = recipe()
    directory = tmp_path / "ckpt"
    cfg = Config(directory=directory, keep_last=None, num_threads=2)  # with the monitor
    held, writing = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def held_pwrite(fd: int, data: Any, offset: int) -> int:
        writing.set()
        held.wait(30)
        return real_pwrite(fd, data, offset)

    async def checkpoint_and_wait(ckpt: aiockpt.Checkpointer, step: int) -> None:
        await ckpt.checkpoint(step)
        await ckpt.wait()

    ckpt = aiockpt.Checkpointer(cfg, model=model, optimizer=optimizer)
    monkeypatch.setattr(os, "pwrite", held_pwrite)
    first = threading.Thread(target=lambda: asyncio.run(checkpoint_and_wait(ckpt, 1)))
    first.start()
    assert writing.wait(30)
    # The first thread is inside wait(): a second thread is refused at once.
    error = _raised(lambda: asyncio.run(ckpt.checkpoint(2)))
    assert isinstance(error, EventLoopError), error
    assert "one thread (and its event loop) at a time" in str(error)
    assert "SyncCheckpointer" in str(error)
    held.set()
    first.join(30)
    assert not first.is_alive()
    # One thread after the other is fine.
    asyncio.run(checkpoint_and_wait(ckpt, 2))
    asyncio.run(ckpt.close())
    assert [i.step for i in aiockpt.list_checkpoints(directory)] == [1, 2]


def _raised(call: Any) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


def test_async_checkpointer_without_a_running_loop(tmp_path: Path) -> None:
    model, _ = recipe()
    ckpt = aiockpt.Checkpointer(sigint_config(tmp_path / "ckpt"), model=model)
    coro = ckpt.checkpoint(1)
    with pytest.raises(EventLoopError, match="call aiockpt from inside a running loop"):
        coro.send(None)
    coro.close()
    asyncio.run(ckpt.close())  # the first loop it runs on is the one it keeps


if __name__ == "__main__" and sys.argv[1:2] == ["sigint-server"]:
    serve_trials()
