"""Preemption signals: configuration, the handlers' life, checkpoint_and_exit, the Trainer,
the choice of tier, and the ranks' agreement rule.

Signals here are real (``os.kill`` of this process); the handler only records them, and
the tests act on them at a step boundary as training would. The multi-process runs are in
tests/distributed/test_preemption_ranks.py and tests/crash/test_preemption_harness.py.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Bag, assert_state_equal, clone_state, make_config, run

import aiockpt
from aiockpt._engine.deadline import (
    FIRST_TIME_BYTES_PER_S,
    FIRST_TIME_OVERHEAD_S,
    PersistHistory,
    Tier,
    fastest_fitting,
)
from aiockpt.distributed.agreement import NO_PROGRESS, Agreed, RankRow, next_agreement

SIGUSR1 = signal.SIGUSR1


def _model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 3)


# -- configuration ------------------------------------------------------------------------------
def test_keys_from_toml_environment_and_their_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert aiockpt.Config().preemption_signals == ()
    assert aiockpt.Config().preemption_grace_s == 30.0
    path = tmp_path / "a.toml"
    path.write_text(
        '[checkpoint]\npreemption_signals = ["SIGTERM", "usr1"]\npreemption_grace_s = 5\n'
    )
    config = aiockpt.Config.from_toml(path)
    assert config.preemption_signals == ("SIGTERM", "SIGUSR1")
    assert config.preemption_grace_s == 5.0
    assert aiockpt.Config.from_toml(_written(tmp_path, config.to_toml())) == config
    monkeypatch.setenv("AIOCKPT_PREEMPTION_SIGNALS", "SIGUSR2,SIGINT")
    assert aiockpt.Config().preemption_signals == ("SIGUSR2", "SIGINT")
    monkeypatch.setenv("AIOCKPT_PREEMPTION_SIGNALS", "SIGKILL")
    with pytest.raises(
        aiockpt.ConfigError, match=r"AIOCKPT_PREEMPTION_SIGNALS='SIGKILL'.*cannot be caught"
    ):
        aiockpt.Config()


def _written(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "b.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["SIGSTOP"], "'SIGSTOP' cannot be caught by any process"),
        (["SIGTREM"], "'SIGTREM' is not a signal name.*did you mean 'SIGTERM'"),
        ("SIGTERM", r"has the wrong type \(str\).*write \['SIGTERM'\]"),
        ([15], "15 is not a signal name"),
    ],
)
def test_bad_signal_lists_name_key_value_and_what_is_allowed(value: object, message: str) -> None:
    with pytest.raises(aiockpt.ConfigError, match=message) as info:
        aiockpt.Config(preemption_signals=value)
    assert str(info.value).startswith("preemption_signals = ")
    assert "expected a list of signal names" in str(info.value)


# -- the handlers -------------------------------------------------------------------------------
def test_no_handler_unless_configured_and_the_previous_one_back_after_close(tmp_path: Path) -> None:
    before = signal.getsignal(SIGUSR1)
    with aiockpt.SyncCheckpointer(make_config(tmp_path), model=_model()):
        assert signal.getsignal(SIGUSR1) is before  # a library takes no signal unasked
    config = make_config(tmp_path, preemption_signals=["SIGUSR1"])
    with aiockpt.SyncCheckpointer(config, model=_model()) as ckpt:
        assert signal.getsignal(SIGUSR1) is not before
        assert ckpt.preempted is None
    assert signal.getsignal(SIGUSR1) is before


@pytest.fixture
def heard() -> Iterator[list[int]]:
    """The signals a handler of the program's own, installed before aiockpt's, receives."""
    received: list[int] = []
    previous = signal.signal(SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(SIGUSR1, previous)


def test_the_handler_records_and_nothing_else_runs(tmp_path: Path, heard: list[int]) -> None:
    config = make_config(tmp_path, preemption_signals=["SIGUSR1"])
    ckpt = aiockpt.SyncCheckpointer(config, model=_model())
    os.kill(os.getpid(), SIGUSR1)
    assert ckpt.preempted is SIGUSR1
    assert heard == []  # the previous handler is not chained: it might end the process
    ckpt.checkpoint(1).wait()  # checkpoints go on as before
    with pytest.raises(SystemExit):
        ckpt.checkpoint_and_exit(2)
    ckpt.close()
    assert heard == []  # answered: not raised again


def test_an_unanswered_signal_is_raised_again_at_close(tmp_path: Path, heard: list[int]) -> None:
    config = make_config(tmp_path, preemption_signals=["SIGUSR1"])
    ckpt = aiockpt.SyncCheckpointer(config, model=_model())
    os.kill(os.getpid(), SIGUSR1)
    assert heard == []
    ckpt.close()
    assert heard == [SIGUSR1]  # the process does what it would have done without us


def test_two_checkpointers_share_the_handler(tmp_path: Path) -> None:
    before = signal.getsignal(SIGUSR1)
    first = aiockpt.SyncCheckpointer(
        make_config(tmp_path, directory=tmp_path / "a", preemption_signals=["SIGUSR1"]),
        model=_model(),
    )
    second = aiockpt.SyncCheckpointer(
        make_config(tmp_path, directory=tmp_path / "b", preemption_signals=["SIGUSR1"]),
        model=_model(),
    )
    os.kill(os.getpid(), SIGUSR1)
    assert first.preempted is second.preempted is SIGUSR1
    for ckpt in (first, second):
        with pytest.raises(SystemExit):
            ckpt.checkpoint_and_exit(0)
    first.close()
    assert signal.getsignal(SIGUSR1) is not before  # the second one still needs it
    second.close()
    assert signal.getsignal(SIGUSR1) is before


def test_off_the_main_thread_is_refused_with_what_to_do(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def build() -> None:
        try:
            aiockpt.SyncCheckpointer(
                make_config(tmp_path, preemption_signals=["SIGUSR1"]), model=_model()
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=build, name="worker")
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], aiockpt.UsageError)
    assert "main thread" in str(errors[0]) and "'worker'" in str(errors[0])
    # Nothing was left open: the directory is free for another writer.
    aiockpt.SyncCheckpointer(make_config(tmp_path), model=_model()).close()


# -- checkpoint_and_exit ------------------------------------------------------------------------
@pytest.mark.parametrize("use_monitor", [True, False])
def test_checkpoint_and_exit_saves_the_step_and_exits_with_128_plus_the_signal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, use_monitor: bool
) -> None:
    model, bag = _model(), Bag({"epoch": 3})
    expected: dict[str, torch.Tensor] = {}
    config = make_config(tmp_path, preemption_signals=["SIGUSR1"], use_monitor=use_monitor)

    async def main() -> None:
        async with aiockpt.Checkpointer(config, model=model, bag=bag) as ckpt:
            await (await ckpt.checkpoint(1))
            os.kill(os.getpid(), SIGUSR1)
            assert ckpt.preempted is SIGUSR1
            with torch.no_grad():
                model.weight.add_(1.0)
            expected.update(clone_state(model.state_dict()))
            with pytest.raises(SystemExit) as info:
                await ckpt.checkpoint_and_exit(2)
            assert info.value.code == 128 + SIGUSR1
            assert ckpt.stats.committed == 2

    with caplog.at_level(logging.WARNING, logger="aiockpt"):
        run(main())
    assert [info.step for info in aiockpt.list_checkpoints(config.directory)] == [1, 2]
    assert_state_equal(dict(aiockpt.load(config.directory / "step-2")["model"]), expected)
    assert "SIGUSR1 at step 2: saved step 2" in caplog.text
    assert "Exiting with status 138" in caplog.text


def test_checkpoint_and_exit_goes_through_the_tiers(tmp_path: Path) -> None:
    # With a memory tier, the last save is planned like any checkpoint (written to the
    # memory tier first, each tier keeping its own retention) and goes on to the primary
    # although its interval does not divide the step: a preemption may take the machine.
    model, bag = _model(), Bag({"epoch": 3})
    memory_dir = tmp_path / "shm"
    config = make_config(
        tmp_path,
        preemption_signals=["SIGUSR1"],
        interval_steps=4,
        memory={"directory": memory_dir, "keep_last": 1},
    )
    with aiockpt.SyncCheckpointer(config, model=model, bag=bag) as ckpt:
        ckpt.checkpoint(1).wait()
        os.kill(os.getpid(), SIGUSR1)
        with torch.no_grad():
            model.weight.add_(1.0)
        expected = clone_state(dict(model.state_dict()))
        with pytest.raises(SystemExit) as info:
            ckpt.checkpoint_and_exit(2)
        assert info.value.code == 128 + SIGUSR1
        assert ckpt.stats.tiers["memory"].last_step == 2
        assert ckpt.stats.tiers["primary"].last_step == 2
        assert [i.step for i in aiockpt.list_checkpoints(memory_dir)] == [2]  # keep_last = 1
    assert 2 in [i.step for i in aiockpt.list_checkpoints(config.directory)]
    assert_state_equal(dict(aiockpt.load(config.directory / "step-2")["model"]), expected)


@pytest.mark.parametrize("use_monitor", [True, False])
def test_a_step_saved_already_is_not_saved_twice(tmp_path: Path, use_monitor: bool) -> None:
    config = make_config(tmp_path, preemption_signals=["SIGUSR1"], use_monitor=use_monitor)
    with aiockpt.SyncCheckpointer(config, model=_model()) as ckpt:
        ckpt.checkpoint(4)  # still in flight, maybe: it is waited for
        os.kill(os.getpid(), SIGUSR1)
        with pytest.raises(SystemExit):
            ckpt.checkpoint_and_exit(4)
        assert ckpt.stats.requested == 1 and ckpt.stats.committed == 1


def test_without_a_signal_it_saves_and_exits_with_status_0(tmp_path: Path) -> None:
    ckpt = aiockpt.SyncCheckpointer(make_config(tmp_path), model=_model())
    with ckpt, pytest.raises(SystemExit) as info:
        ckpt.checkpoint_and_exit(7)
    assert info.value.code == 0
    assert [i.step for i in aiockpt.list_checkpoints(tmp_path / "ckpt")] == [7]


def test_bad_step_is_refused_before_anything(tmp_path: Path) -> None:
    ckpt = aiockpt.SyncCheckpointer(make_config(tmp_path), model=_model())
    with ckpt, pytest.raises(aiockpt.ConfigError, match="step must be a non-negative int"):
        ckpt.checkpoint_and_exit(-1)


def test_no_time_left_writes_nothing_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        tmp_path, keep_last=1, preemption_signals=["SIGUSR1"], preemption_grace_s=1e-6
    )
    with aiockpt.SyncCheckpointer(config, model=_model()) as ckpt:
        ckpt.checkpoint(1).wait()
        os.kill(os.getpid(), SIGUSR1)
        with caplog.at_level(logging.ERROR, logger="aiockpt"), pytest.raises(SystemExit) as info:
            ckpt.checkpoint_and_exit(2)
        assert info.value.code == 128 + SIGUSR1
    assert "no tier can make the checkpoint" in caplog.text
    assert "preemption_grace_s = 1e-06" in caplog.text and "estimates: directory" in caplog.text
    # keep_last = 1, and still the one committed checkpoint is there: nothing started.
    assert [i.step for i in aiockpt.list_checkpoints(config.directory)] == [1]
    assert not [p for p in config.directory.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_save_that_fails_is_not_reported_as_saved(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    on_error: str,
) -> None:
    # Not incremental: an unchanged state would be shared with step 1, never written.
    config = make_config(
        tmp_path, preemption_signals=["SIGUSR1"], on_error=on_error, incremental=False
    )
    with aiockpt.SyncCheckpointer(config, model=_model()) as ckpt:
        ckpt.checkpoint(1).wait()

        def failing_disk(*args: Any) -> int:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "pwrite", failing_disk)
        os.kill(os.getpid(), SIGUSR1)
        if on_error == "raise":
            with pytest.raises(aiockpt.BackgroundError) as raised:
                ckpt.checkpoint_and_exit(2)
            assert isinstance(raised.value.__cause__, OSError)
        else:
            with (
                caplog.at_level(logging.ERROR, logger="aiockpt"),
                pytest.raises(SystemExit) as info,
            ):
                ckpt.checkpoint_and_exit(2)
            assert info.value.code == 128 + SIGUSR1
            assert "SIGUSR1 at step 2: the checkpoint failed" in caplog.text
            assert "saved step 2" not in caplog.text
        monkeypatch.undo()
    assert [i.step for i in aiockpt.list_checkpoints(config.directory)] == [1]


# -- the Trainer --------------------------------------------------------------------------------
def test_trainer_finishes_the_step_saves_it_and_exits(tmp_path: Path) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = make_config(tmp_path, interval_steps=100, preemption_signals=["SIGUSR1"])

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch).square().mean()

    with aiockpt.SyncTrainer(
        model, optimizer, loss_fn, config=config, grad_accumulation_steps=2
    ) as trainer:
        for _ in range(5):
            trainer.train_step(torch.ones(2, 6))
        assert trainer.step == 2 and trainer.micro_step == 1
        os.kill(os.getpid(), SIGUSR1)  # mid-accumulation: the window finishes first
        with pytest.raises(SystemExit) as info:
            trainer.train_step(torch.ones(2, 6))
        assert info.value.code == 128 + SIGUSR1
        assert trainer.step == 3 and trainer.micro_step == 0
        saved_model = clone_state(model.state_dict())
    assert [i.step for i in aiockpt.list_checkpoints(config.directory)] == [3]
    state = aiockpt.load(config.directory / "step-3")
    assert state["trainer"]["step"] == 3
    assert_state_equal(state["model"], saved_model)


# -- choosing a tier ----------------------------------------------------------------------------
def test_first_estimate_is_conservative_then_measured() -> None:
    history = PersistHistory()
    assert history.estimate(10**9) == pytest.approx(
        FIRST_TIME_OVERHEAD_S + 1e9 / FIRST_TIME_BYTES_PER_S
    )
    history.record(10**9, 2.0)
    history.record(10**9, 4.0)
    assert 4.0 < history.estimate(10**9) < 8.0  # the slowest, with a margin
    assert history.estimate(2 * 10**9) == pytest.approx(2 * history.estimate(10**9))


def test_fastest_tier_that_fits_is_chosen() -> None:
    slow, fast = PersistHistory(), PersistHistory()
    slow.record(100, 10.0)
    fast.record(100, 1.0)
    tiers = [Tier("directory", "ckpt", slow), Tier("memory", "/dev/shm/x", fast)]
    choice, estimates = fastest_fitting(tiers, 100, seconds_left=30.0)
    assert choice is not None and choice.tier.name == "memory"
    assert [e.tier.name for e in estimates] == ["memory", "directory"]
    choice, _ = fastest_fitting(tiers, 100, seconds_left=1.0)
    assert choice is None


# -- the ranks' agreement ---------------------------------------------------------------------
def _rows(*rows: tuple[int, int]) -> list[RankRow]:
    return [RankRow(signal, 5, progress, False) for signal, progress in rows]


def test_agreement_waits_for_every_rank_then_proposes_and_confirms() -> None:
    agreed = next_agreement(Agreed(), _rows((0, 9), (0, 9)))
    assert agreed == Agreed()  # no signal: nothing to agree
    agreed = next_agreement(agreed, _rows((0, NO_PROGRESS), (15, 7)))
    assert agreed.signal == 15 and agreed.proposal is None  # rank 0 could be anywhere
    agreed = next_agreement(agreed, _rows((0, 12), (15, 8)))
    assert agreed.proposal == 12 and agreed.stop_step is None
    agreed = next_agreement(agreed, _rows((0, 12), (15, 10)))
    assert agreed.stop_step == 12  # nobody went past it: everyone can reach it


def test_a_rank_past_the_proposal_moves_it_on() -> None:
    agreed = next_agreement(Agreed(), _rows((10, 4), (0, 4)))
    assert agreed.proposal == 4
    agreed = next_agreement(agreed, _rows((10, 4), (0, 5)))  # rank 1 had not heard yet
    assert agreed.proposal == 5 and agreed.stop_step is None
    agreed = next_agreement(agreed, _rows((10, 5), (0, 5)))
    assert agreed.stop_step == 5


def test_a_closing_rank_ends_the_rounds() -> None:
    rows = [RankRow(0, 0, 3, True), RankRow(0, 0, 3, False)]
    assert next_agreement(Agreed(), rows).over


def test_a_forked_child_answers_signals_as_without_aiockpt(tmp_path: Path) -> None:
    config = make_config(tmp_path, preemption_signals=["SIGTERM"])
    with aiockpt.SyncCheckpointer(config, model=_model()):
        pid = os.fork()
        if pid == 0:  # a DataLoader worker, say: SIGTERM must still end it
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.sigtimedwait([], 0.5)  # a moment for the default action
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


class _ThreadRanks:
    """Ranks as threads of this process, gathering through a barrier: the agreement's
    rounds run for real on their watcher threads, with every interleaving the scheduler
    picks; tests/distributed/test_preemption_ranks.py runs it on real gloo processes."""

    def __init__(self, world: int) -> None:
        self.world_size = world
        self._barrier = threading.Barrier(world, timeout=10)
        self._slots: list[Any] = [None] * world

    def member(self, rank: int) -> Any:
        ranks = self

        class Member:
            world_size = ranks.world_size

            def sibling(self, timeout_seconds: float) -> Member:
                return self

            def all_gather_ints(self, values: list[int]) -> list[Any]:
                ranks._slots[rank] = values
                ranks._barrier.wait()
                rows = list(ranks._slots)
                ranks._barrier.wait()
                return rows

            all_gather = all_gather_ints

            def destroy(self) -> None: ...

        return Member()


def _agreement_trial(chooser: random.Random, lock_step: bool) -> list[int | None]:
    """Ranks training at their own pace (or in lock step) until a signal at one of them;
    the step each rank stopped at."""
    from aiockpt.distributed.agreement import StopAgreement, Verdict

    world = chooser.choice([2, 3, 4])
    ranks = _ThreadRanks(world)
    # Lock step: every step ends in a collective of all ranks, as DDP's all-reduce.
    step_barrier = threading.Barrier(world, timeout=10)
    agreements = [StopAgreement(ranks.member(r), 10.0) for r in range(world)]
    pauses = [chooser.uniform(0.0002, 0.003) for _ in range(world)]
    stopped: list[int | None] = [None] * world
    errors: list[BaseException] = []

    def train(rank: int) -> None:
        agreement, step = agreements[rank], 0
        try:
            while step < 10_000:
                time.sleep(pauses[rank])
                if lock_step:
                    step_barrier.wait()
                step += 1
                while agreement.signal:
                    verdict = agreement.reached(step)
                    if verdict is Verdict.STOP:
                        stopped[rank] = step
                        return
                    if verdict is Verdict.CONTINUE:
                        break
                    time.sleep(0.001)
        except BaseException as exc:
            errors.append(exc)
            step_barrier.abort()

    threads = [threading.Thread(target=train, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    time.sleep(chooser.uniform(0.0, 0.05))
    agreements[chooser.randrange(world)].record_local(signal.SIGTERM, time.monotonic())
    for thread in threads:
        thread.join(30)
    for agreement in agreements:
        agreement.close(5.0)
    assert not errors, repr(errors)
    return stopped


@pytest.mark.parametrize("lock_step", [True, False], ids=["lock-step", "apart"])
def test_ranks_stop_at_one_step_that_none_passed(
    lock_step: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiockpt.distributed import agreement

    monkeypatch.setattr(agreement, "IDLE_PERIOD_S", 0.005)  # many trials, each short
    chooser = random.Random(3)
    for trial in range(12):
        stopped = _agreement_trial(chooser, lock_step)
        # A rank past the agreed step would stop later than the others (STOP is only
        # ever answered at the agreed step or after it).
        assert stopped[0] is not None and stopped == [stopped[0]] * len(stopped), (trial, stopped)


def test_the_same_signal_a_third_time_goes_to_the_previous_handler(
    tmp_path: Path, heard: list[int]
) -> None:
    config = make_config(tmp_path, preemption_signals=["SIGUSR1"])
    ckpt = aiockpt.SyncCheckpointer(config, model=_model())
    os.kill(os.getpid(), SIGUSR1)
    os.kill(os.getpid(), SIGUSR1)  # twice: the scheduler's, and torchrun passing it on
    assert heard == [] and ckpt.preempted is SIGUSR1
    os.kill(os.getpid(), SIGUSR1)  # insisting: a way out of a save that hangs
    assert heard == [SIGUSR1]
    ckpt.close()
    assert heard == [SIGUSR1]  # answered once, not raised again at close
