"""Storage tiers: the memory and remote tables of the config, which tiers a step goes to,
round trips through each tier, promotion and retention, restore across tiers, and the
``ls``/``prune`` commands on them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MixedModel, assert_state_equal, clone_state

import aiockpt
from aiockpt._engine.tiers import TierSet
from aiockpt._util.bridge import drive
from aiockpt._util.shm import derived_memory_directory
from aiockpt.cli.main import main
from aiockpt.metrics import CheckpointerStats
from aiockpt.storage import open_storage


def tiered(tmp_path: Path, **kw: Any) -> aiockpt.Config:
    """Primary, memory and remote all under ``tmp_path`` (the remote as a second local
    directory, as an NFS mount would be)."""
    kw.setdefault("directory", tmp_path / "primary")
    kw.setdefault("num_threads", 2)
    kw.setdefault("memory", {"directory": str(tmp_path / "shm"), "keep_last": 2})
    return aiockpt.Config(**kw)


def step_dirs(path: Path) -> list[int]:
    if not path.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in path.iterdir() if p.name.startswith("step-"))


def train_one(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def flip_byte(checkpoint: Path) -> None:
    # A file of this checkpoint's own: one it shares with another checkpoint (incremental,
    # data-...-s<M>.bin) would damage that one too.
    data = sorted(p for p in checkpoint.glob("data-*.bin") if "-s" not in p.name)[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


@pytest.fixture
def shm_cleanup() -> Iterator[list[Path]]:
    """Derived /dev/shm directories a test makes, removed whatever happens."""
    made: list[Path] = []
    yield made
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


# -- configuration ---------------------------------------------------------------------------
def test_toml_tables_as_in_the_design(tmp_path: Path):
    path = tmp_path / "aiockpt.toml"
    path.write_text(
        f"""
[checkpoint]
directory = "{tmp_path / "checkpoints"}"
interval_steps = 50
[checkpoint.memory]
interval_steps = 5
keep_last = 2
[checkpoint.remote]
url = "{tmp_path / "remote"}"
interval_steps = 500
keep_last = "none"
"""
    )
    config = aiockpt.Config.from_toml(path)
    assert config.memory == aiockpt.MemoryTier(interval_steps=5, keep_last=2)
    assert config.remote is not None
    assert config.remote.url == tmp_path / "remote"
    assert (config.remote.interval_steps, config.remote.keep_last) == (500, None)
    assert config.remote.on_backpressure == "skip"
    # Written back and read again: the same settings.
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml())
    assert aiockpt.Config.from_toml(again) == config
    assert json.loads(json.dumps(config.to_dict()))["memory"]["keep_last"] == 2


def test_python_dicts_and_dataclasses_are_the_same(tmp_path: Path):
    as_dict = aiockpt.Config(
        directory=tmp_path, memory={"interval_steps": 5}, remote={"url": str(tmp_path / "r")}
    )
    as_class = aiockpt.Config(
        directory=tmp_path,
        memory=aiockpt.MemoryTier(interval_steps=5),
        remote=aiockpt.RemoteTier(url=str(tmp_path / "r")),
    )
    assert as_dict == as_class
    assert aiockpt.Config(directory=tmp_path).memory is None


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"memory": {"interval_step": 5}}, "memory.interval_step (did you mean 'interval_steps'"),
        ({"memory": {"interval_steps": 0}}, "memory.interval_steps = 0 is out of range"),
        ({"memory": {"interval_steps": "5"}}, "memory.interval_steps = '5' has the wrong type"),
        ({"memory": {"keep_last": "none"}}, "memory.keep_last = None is not allowed"),
        ({"memory": {"directory": ""}}, "memory.directory = '' is empty"),
        ({"memory": 5}, "memory = 5 has the wrong type"),
        ({"remote": {"interval_steps": 5}}, "remote.url is missing"),
        ({"remote": {"url": "gs://bucket/run"}}, "remote.url: directory 'gs://bucket/run'"),
        ({"remote": {"url": "/r", "on_backpressure": "wait"}}, "remote.on_backpressure"),
        ({"remote": {"url": "/r", "max_pending": 0}}, "remote.max_pending = 0 is out of range"),
        ({"remote": {"url": "/r", "keep_last": True}}, "remote.keep_last = True has the wrong"),
    ],
)
def test_bad_tier_settings_name_the_sub_key(tmp_path: Path, kw: dict[str, Any], named: str):
    with pytest.raises(aiockpt.ConfigError, match=None) as caught:
        aiockpt.Config(directory=tmp_path, **kw)
    assert named in str(caught.value)


def test_bad_tier_setting_in_toml_names_the_file(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text("[checkpoint]\n[checkpoint.memory]\nkeep_last = -1\n")
    with pytest.raises(aiockpt.ConfigError, match=r"memory.keep_last = -1 .*bad.toml"):
        aiockpt.Config.from_toml(path)


def test_a_tier_from_the_environment_is_refused_with_a_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("AIOCKPT_MEMORY", "interval_steps=5")
    with pytest.raises(aiockpt.ConfigError, match=r"AIOCKPT_MEMORY=.*expected a table"):
        aiockpt.Config(directory=tmp_path)


def test_derived_memory_location_is_one_per_primary(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    here = derived_memory_directory("ckpt")
    assert here == derived_memory_directory(tmp_path / "ckpt")
    assert here == derived_memory_directory("./ckpt/")
    assert here.parent == Path("/dev/shm") and here.name.startswith("aiockpt-")
    assert here != derived_memory_directory(tmp_path / "other")


# -- which tiers a step goes to ----------------------------------------------------------------
def tier_set(config: aiockpt.Config) -> TierSet:
    primary = open_storage(config.directory, durable=False)
    primary.open()
    return TierSet(config, primary, CheckpointerStats())


def names(tiers: TierSet, step: int) -> list[str]:
    return [tier.name for tier in tiers.due(step)]


def test_due_tiers_follow_each_interval(tmp_path: Path):
    config = tiered(
        tmp_path,
        interval_steps=50,
        memory={"directory": str(tmp_path / "shm"), "interval_steps": 5},
        remote={"url": str(tmp_path / "remote"), "interval_steps": 500},
    )
    tiers = tier_set(config)
    try:
        assert names(tiers, 5) == ["memory"]
        assert names(tiers, 50) == ["memory", "primary"]
        assert names(tiers, 500) == ["memory", "primary", "remote"]
        # No interval divides it: the fastest tier still takes an explicit checkpoint.
        assert names(tiers, 7) == ["memory"]
    finally:
        tiers.close()


def test_without_a_primary_interval_every_call_reaches_the_primary(tmp_path: Path):
    config = aiockpt.Config(
        directory=tmp_path / "primary", remote={"url": str(tmp_path / "remote")}
    )
    tiers = tier_set(config)
    try:
        # The remote tier without an interval takes whatever reaches the primary.
        assert names(tiers, 3) == ["primary", "remote"]
        assert tiers.entry.name == "primary"
    finally:
        tiers.close()


def test_a_full_skip_queue_leaves_the_tier_out_and_counts_it(tmp_path: Path):
    config = tiered(tmp_path, remote={"url": str(tmp_path / "remote"), "max_pending": 1})
    tiers = tier_set(config)

    async def bridge(coro: Any) -> Any:
        return await coro

    try:
        first = drive(tiers.plan(1, bridge))
        second = drive(tiers.plan(2, bridge))
        assert [t.name for t in first.chain] == ["memory", "primary", "remote"]
        assert [t.name for t in second.chain] == ["memory", "primary"]
        assert tiers.stats.tiers["remote"].skipped == 1
        assert tiers.stats.tiers["remote"].pending == 1
        # What a plan holds is protected from retention until its copies are over.
        assert tiers.get("memory").protected[1] == 1  # type: ignore[union-attr]
        drive(tiers.abandon(first))
        drive(tiers.abandon(second))
        assert tiers.stats.tiers["remote"].pending == 0
        assert not tiers.get("memory").protected  # type: ignore[union-attr]
    finally:
        tiers.close()


# -- round trips, promotion, retention -------------------------------------------------------
def test_every_checkpoint_reaches_its_tiers_bit_exact(tmp_path: Path):
    config = tiered(
        tmp_path,
        interval_steps=4,
        keep_last=None,
        memory={"directory": str(tmp_path / "shm"), "keep_last": 1},
        remote={"url": str(tmp_path / "remote"), "interval_steps": 8, "keep_last": "none",
                "on_backpressure": "block"},
    )  # fmt: skip
    model = MixedModel()
    saved = {}
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        for step in range(1, 17):
            train_one(model)
            saved[step] = clone_state(model.state_dict())
            ckpt.checkpoint(step)
        ckpt.wait()
        stats = ckpt.stats.tiers
        # keep_last = 1 in memory, yet no copy lost its source to retention.
        assert step_dirs(tmp_path / "primary") == [4, 8, 12, 16]
        assert step_dirs(tmp_path / "remote") == [8, 16]
        assert step_dirs(tmp_path / "shm") == [16]
        assert (stats["memory"].committed, stats["primary"].committed) == (16, 4)
        assert stats["primary"].achieved_interval_steps == 4
        assert stats["remote"].achieved_interval_steps == 8
        assert ckpt.stats.committed == 16 and ckpt.stats.failed == 0
    for tier, step in (("primary", 12), ("remote", 8)):
        state = aiockpt.load(tmp_path / tier / f"step-{step}")
        assert_state_equal(state["model"], saved[step])


def test_restore_takes_the_newest_across_tiers_and_falls_back_tier_by_tier(tmp_path: Path):
    config = tiered(
        tmp_path, interval_steps=2, keep_last=None, memory={"directory": str(tmp_path / "shm"),
        "keep_last": 3}, remote={"url": str(tmp_path / "remote"), "interval_steps": 4,
        "keep_last": "none"},
    )  # fmt: skip
    model = MixedModel()
    saved = {}
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        for step in range(1, 6):
            train_one(model)
            saved[step] = clone_state(model.state_dict())
            ckpt.checkpoint(step)
        ckpt.wait()
    # Closed with step 5 only in memory: the memory tier stays for the next process.
    assert step_dirs(tmp_path / "shm") == [3, 4, 5]
    assert step_dirs(tmp_path / "primary") == [2, 4]

    def restored() -> tuple[int | None, str | None]:
        fresh = MixedModel(seed=1)
        with aiockpt.SyncCheckpointer(config, model=fresh) as ckpt:
            step = ckpt.restore()
            assert step is not None
            assert_state_equal(fresh.state_dict(), saved[step])
            return step, ckpt.stats.last_restore_tier

    assert restored() == (5, "memory")
    flip_byte(tmp_path / "shm" / "step-5")
    flip_byte(tmp_path / "shm" / "step-4")
    # The corrupt newest falls back to step 4, read from the primary's copy of it.
    step, tier = restored()
    assert (step, tier) == (4, "primary")
    flip_byte(tmp_path / "primary" / "step-4")
    assert restored() == (4, "remote")


def test_restore_of_one_step_reads_another_tiers_copy(tmp_path: Path):
    config = tiered(tmp_path, keep_last=None)
    model = MixedModel()
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        ckpt.checkpoint(1).wait()
        expected = clone_state(model.state_dict())
        flip_byte(tmp_path / "shm" / "step-1")
        train_one(model)
        assert ckpt.restore(step=1) == 1
        assert ckpt.stats.last_restore_tier == "primary"
        assert_state_equal(model.state_dict(), expected)
        with pytest.raises(aiockpt.NoCheckpointError, match="in any tier"):
            ckpt.restore(step=2)


def test_a_corrupt_source_is_not_promoted(tmp_path: Path):
    # A checkpoint in the memory tier's directory, written by a plain checkpointer.
    plain = aiockpt.Config(directory=tmp_path / "shm", num_threads=2)
    with aiockpt.SyncCheckpointer(plain, model=MixedModel()) as ckpt:
        ckpt.checkpoint(1).wait()
    flip_byte(tmp_path / "shm" / "step-1")
    tiers = tier_set(tiered(tmp_path))
    memory, primary = tiers.get("memory"), tiers.get("primary")
    assert memory is not None and primary is not None

    async def copy() -> Path:
        loop = asyncio.get_running_loop()
        return await tiers._copy(memory, tmp_path / "shm" / "step-1", primary, 1, loop)

    try:
        with pytest.raises(aiockpt.CorruptCheckpointError, match="not copied to the primary"):
            asyncio.run(copy())
    finally:
        tiers.close()
    assert step_dirs(tmp_path / "primary") == []
    assert not [p for p in (tmp_path / "primary").iterdir() if p.name.startswith(".tmp-")]


def test_close_frees_the_derived_memory_tier_once_the_primary_caught_up(
    tmp_path: Path, shm_cleanup: list[Path]
):
    config = aiockpt.Config(
        directory=tmp_path / "primary", num_threads=2, interval_steps=2, memory={}
    )
    location = derived_memory_directory(tmp_path / "primary")
    shm_cleanup.append(location)
    model = MixedModel()
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        ckpt.checkpoint(1)
        ckpt.wait()
        assert step_dirs(location) == [1]
    assert step_dirs(location) == [1]  # newer than anything on disk: kept
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        assert ckpt.restore() == 1
        ckpt.checkpoint(2)
    assert not location.exists()  # the run's last checkpoint reached the primary


# -- the command line ------------------------------------------------------------------------
def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_shows_every_tier_and_prune_frees_the_memory_tier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shm_cleanup: list[Path]
):
    primary, remote = tmp_path / "primary", tmp_path / "remote"
    config = aiockpt.Config(
        directory=primary, num_threads=2, interval_steps=2, keep_last=None,
        memory={"keep_last": 3}, remote={"url": str(remote), "interval_steps": 4},
    )  # fmt: skip
    location = derived_memory_directory(primary)
    shm_cleanup.append(location)
    model = MixedModel()
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        for step in range(1, 6):
            ckpt.checkpoint(step)
    code, out, _ = run_cli(capsys, "ls", primary, "--remote", remote, "--json")
    assert code == 0
    report = json.loads(out)
    assert [row["step"] for row in report["checkpoints"]] == [2, 4]
    tiers = {tier["tier"]: tier for tier in report["tiers"]}
    assert tiers["memory"]["directory"] == str(location) and tiers["memory"]["derived"]
    assert tiers["memory"]["steps"] == [3, 4, 5]
    assert tiers["remote"]["steps"] == [4]
    code, out, _ = run_cli(capsys, "ls", primary)
    assert code == 0 and "memory tier" in out and str(location) in out

    # Step 5 is only in memory: freeing it needs --force.
    code, _, err = run_cli(capsys, "prune", primary, "--memory")
    assert code == 2 and "newer than the newest valid" in err and "--force" in err
    assert step_dirs(location) == [3, 4, 5]
    code, out, _ = run_cli(capsys, "prune", primary, "--memory", "--force", "--json")
    assert code == 0 and json.loads(out)["removed"] == [3, 4, 5]
    assert not location.exists()
    code, _, err = run_cli(capsys, "prune", primary)
    assert code == 2 and "--keep-last" in err


def test_prune_memory_refuses_while_a_writer_holds_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = tiered(tmp_path)
    with aiockpt.SyncCheckpointer(config, model=MixedModel()) as ckpt:
        ckpt.checkpoint(1).wait()
        code, _, err = run_cli(
            capsys, "prune", tmp_path / "primary", "--memory", "--memory-dir", tmp_path / "shm"
        )
        assert code == 1 and "live training job" in err
        assert step_dirs(tmp_path / "shm") == [1]


def test_memory_tier_keeps_its_files_in_ram(tmp_path: Path, shm_cleanup: list[Path]):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    config = aiockpt.Config(directory=tmp_path / "primary", num_threads=2, memory={})
    location = derived_memory_directory(tmp_path / "primary")
    shm_cleanup.append(location)
    with aiockpt.SyncCheckpointer(config, model=MixedModel()) as ckpt:
        ckpt.checkpoint(1).wait()
        assert os.statvfs(location).f_fsid == os.statvfs("/dev/shm").f_fsid
        assert step_dirs(location) == [1]


def test_the_trainer_checkpoints_at_the_memory_interval_too(tmp_path: Path):
    config = tiered(
        tmp_path,
        interval_steps=4,
        keep_last=None,
        memory={"directory": str(tmp_path / "shm"), "interval_steps": 2, "keep_last": 10},
    )
    model = torch.nn.Linear(3, 1)

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).square().mean()

    with aiockpt.SyncTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, config=config
    ) as trainer:
        for _ in range(8):
            trainer.train_step(torch.randn(4, 3))
        trainer.wait()
        assert step_dirs(tmp_path / "shm") == [2, 4, 6, 8]
        assert step_dirs(tmp_path / "primary") == [4, 8]


@pytest.mark.parametrize("use_monitor", [True, False])
def test_async_checkpointer_on_either_loop(tmp_path: Path, use_monitor: bool):
    config = tiered(tmp_path, interval_steps=2, use_monitor=use_monitor)
    model = MixedModel()

    async def session() -> tuple[int | None, dict[str, Any]]:
        async with aiockpt.Checkpointer(config, model=model) as ckpt:
            for step in range(1, 4):
                train_one(model)
                handle = await ckpt.checkpoint(step)
            info = await handle
            assert info is not None and info.path == tmp_path / "shm" / "step-3"
            expected = clone_state(model.state_dict())
            train_one(model)
            return await ckpt.restore(), expected

    step, expected = asyncio.run(session())
    assert step == 3
    assert_state_equal(model.state_dict(), expected)
    assert step_dirs(tmp_path / "primary") == [2]


def test_a_full_block_queue_waits_for_a_place(tmp_path: Path):
    config = tiered(
        tmp_path,
        remote={"url": str(tmp_path / "remote"), "max_pending": 1, "on_backpressure": "block"},
    )
    tiers = tier_set(config)

    async def bridge(coro: Any) -> Any:
        return await coro

    async def scenario() -> list[str]:
        first = await tiers.plan(1, bridge)
        waiting = asyncio.ensure_future(tiers.plan(2, bridge))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not waiting.done()  # the remote tier's one place is taken
        await tiers.abandon(first)
        second = await waiting
        await tiers.abandon(second)
        return [t.name for t in second.chain]

    try:
        assert asyncio.run(scenario()) == ["memory", "primary", "remote"]
        assert tiers.stats.tiers["remote"].skipped == 0
    finally:
        tiers.close()


def test_trainer_resume_takes_the_memory_tiers_newer_step(tmp_path: Path):
    config = tiered(
        tmp_path,
        interval_steps=4,
        memory={"directory": str(tmp_path / "shm"), "interval_steps": 2, "keep_last": 2},
    )

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).square().mean()

    torch.manual_seed(0)
    batches = [torch.randn(4, 3) for _ in range(6)]
    model = torch.nn.Linear(3, 1)
    with aiockpt.SyncTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, config=config
    ) as trainer:
        for batch in batches:
            trainer.train_step(batch)
        expected = clone_state(model.state_dict())
    assert step_dirs(tmp_path / "primary") == [4]
    fresh = torch.nn.Linear(3, 1)
    with aiockpt.SyncTrainer(
        fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), loss_fn, config=config
    ) as trainer:
        assert trainer.resume() == 6
        assert trainer.checkpointer.stats.last_restore_tier == "memory"
    assert_state_equal(fresh.state_dict(), expected)


@pytest.mark.parametrize("table", ["memory", "remote"])
def test_a_tier_location_that_cannot_be_made_is_a_config_error(tmp_path: Path, table: str):
    bad = "/proc/aiockpt-no-such/tier"  # /proc takes no new directories, even from root
    tier = {"directory": bad} if table == "memory" else {"url": bad}
    config = aiockpt.Config(directory=tmp_path / "primary", **{table: tier})
    key = "memory.directory" if table == "memory" else "remote.url"
    with pytest.raises(aiockpt.ConfigError, match=f"{key}: the tier's directory {bad}"):
        aiockpt.SyncCheckpointer(config, model=MixedModel())
    # Nothing was left holding the primary: a checkpointer without the tier opens it.
    with aiockpt.SyncCheckpointer(aiockpt.Config(directory=tmp_path / "primary"), m=MixedModel()):
        pass


def test_ls_of_a_run_without_tiers_says_nothing_of_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with aiockpt.SyncCheckpointer(aiockpt.Config(directory=tmp_path / "p"), m=MixedModel()) as c:
        c.checkpoint(1)
    code, out, _ = run_cli(capsys, "ls", tmp_path / "p")
    assert code == 0 and "memory tier" not in out and "/dev/shm" not in out
    code, out, _ = run_cli(capsys, "ls", tmp_path / "p", "--json")
    (memory,) = json.loads(out)["tiers"]
    assert memory["tier"] == "memory" and not memory["exists"] and memory["steps"] == []
