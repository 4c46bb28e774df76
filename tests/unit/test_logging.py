"""Logging: a logger per module under ``aiockpt``, real levels, the application decides where.

``verbose = true`` is INFO on the ``aiockpt`` logger, ``AIOCKPT_LOG_LEVEL`` wins over it,
and the command line prints records on stderr only while a command runs.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import aiockpt
from aiockpt.cli.main import main
from tests.conftest import MixedModel, make_config

REPO = Path(__file__).resolve().parents[2]
PACKAGE = logging.getLogger("aiockpt")


@pytest.fixture(autouse=True)
def package_logger() -> Iterator[logging.Logger]:
    """The ``aiockpt`` logger at its import-time state, put back afterwards: levels that a
    checkpointer sets are process-wide on purpose."""
    level, handlers = PACKAGE.level, list(PACKAGE.handlers)
    PACKAGE.setLevel(logging.NOTSET)
    yield PACKAGE
    PACKAGE.setLevel(level)
    PACKAGE.handlers[:] = handlers


def _aiockpt_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("aiockpt") and r.levelno == level]


def _save_one(tmp_path: Path, **config: object) -> None:
    with aiockpt.SyncCheckpointer(make_config(tmp_path, **config), model=MixedModel()) as ckpt:
        ckpt.checkpoint(1).wait()


def test_every_module_logs_to_a_logger_named_after_it() -> None:
    """Read from the source: a logger named by a literal would hide where a record is from."""
    literal = []
    for path in sorted((REPO / "aiockpt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger"
                and not (
                    len(node.args) == 1
                    and isinstance(node.args[0], ast.Name)
                    and node.args[0].id in ("__name__", "PACKAGE_LOGGER")
                )
            ):
                literal.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert literal == []


def test_a_warning_names_its_module(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Written whole: two incremental checkpoints of one unchanged state share every byte,
    # and this needs the newest damaged alone.
    config = make_config(tmp_path, keep_last=None, incremental=False)
    with aiockpt.SyncCheckpointer(config, model=MixedModel()) as ckpt:
        ckpt.checkpoint(1).wait()
        ckpt.checkpoint(2).wait()
    data = sorted((config.directory / "step-2").glob("data-*.bin"))[0]
    data.write_bytes(b"\x00" * data.stat().st_size)  # same size, wrong bytes
    with (
        caplog.at_level(logging.WARNING, logger="aiockpt"),
        aiockpt.SyncCheckpointer(config, model=MixedModel()) as ckpt,
    ):
        assert ckpt.restore() == 1
    (skipped,) = _aiockpt_records(caplog, logging.WARNING)
    assert skipped.name == "aiockpt._engine.restore"
    assert (
        "skipping corrupt checkpoint" in skipped.getMessage() and "step-2" in skipped.getMessage()
    )


def test_info_is_off_by_default_and_verbose_turns_it_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the capturing handler takes all; the levels decide
    logging.getLogger().setLevel(logging.WARNING)  # as in a program that did not configure
    _save_one(tmp_path / "quiet")
    assert _aiockpt_records(caplog, logging.INFO) == []

    _save_one(tmp_path / "verbose", verbose=True)
    assert PACKAGE.level == logging.INFO
    infos = _aiockpt_records(caplog, logging.INFO)
    assert {r.name for r in infos} == {"aiockpt._engine.saver", "aiockpt._engine.failures"}
    assert any("step 1" in r.getMessage() for r in infos), [r.getMessage() for r in infos]


def test_verbose_keeps_a_more_talkative_level(tmp_path: Path) -> None:
    PACKAGE.setLevel(logging.DEBUG)
    _save_one(tmp_path, verbose=True)
    assert PACKAGE.level == logging.DEBUG


@pytest.mark.parametrize(
    ("value", "level"),
    [("DEBUG", logging.DEBUG), ("info", logging.INFO), (" warning ", logging.WARNING), ("40", 40)],
)
def test_the_environment_sets_the_level_and_wins_over_verbose(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    value: str,
    level: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger().setLevel(logging.WARNING)
    monkeypatch.setenv("AIOCKPT_LOG_LEVEL", value)
    _save_one(tmp_path, verbose=True)
    assert PACKAGE.level == level
    assert bool(_aiockpt_records(caplog, logging.INFO)) == (level <= logging.INFO)


def test_a_bad_level_is_a_config_error_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOCKPT_LOG_LEVEL", "chatty")
    with pytest.raises(aiockpt.ConfigError, match="AIOCKPT_LOG_LEVEL='chatty'") as refused:
        aiockpt.SyncCheckpointer(make_config(tmp_path), model=MixedModel())
    assert "DEBUG" in (refused.value.hint or "")
    assert not (tmp_path / "ckpt").exists()  # not even the directory was made


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIOCKPT_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**clean, "PYTHONPATH": str(REPO), **env},
        cwd=REPO,
        timeout=240,
    )


_UNCONFIGURED = """
import logging, sys, torch, aiockpt
config = aiockpt.Config(directory={directory!r}, verbose=True)
with aiockpt.SyncCheckpointer(config, model=torch.nn.Linear(2, 2)) as ckpt:
    ckpt.checkpoint(1).wait()
root = logging.getLogger()
package = logging.getLogger("aiockpt")
print(len(root.handlers), [type(h).__name__ for h in package.handlers],
      logging.getLevelName(package.level))
"""


def test_verbose_shows_info_in_a_program_that_configured_no_logging(tmp_path: Path) -> None:
    done = _python(_UNCONFIGURED.format(directory=str(tmp_path / "ckpt")))
    assert done.returncode == 0, done.stderr
    # The root logger is left alone; aiockpt's own stderr handler shows what verbose asks.
    assert done.stdout.split() == ["0", "['_CurrentStderr']", "INFO"]
    assert "step 1" in done.stderr

    # The program's own configuration is where they go.
    configured = "import logging; logging.basicConfig()\n" + _UNCONFIGURED
    done = _python(configured.format(directory=str(tmp_path / "ckpt2")))
    assert done.returncode == 0, done.stderr
    assert "INFO:aiockpt._engine." in done.stderr and "step 1" in done.stderr


def test_the_command_line_logs_on_stderr_while_a_command_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "state.pt"
    torch.save({"model": MixedModel().state_dict()}, source)
    argv = ["import", str(source), "--from", "torch", "--json", "--step"]

    assert main([*argv, "1", str(tmp_path / "quiet")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["step"] == 1 and err == ""

    monkeypatch.setenv("AIOCKPT_LOG_LEVEL", "INFO")
    assert main([*argv, "2", str(tmp_path / "talkative")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["step"] == 2  # stdout stays one JSON document
    lines = err.splitlines()
    assert lines and all(line.startswith("aiockpt: INFO: ") for line in lines), err
    assert any("step 2" in line for line in lines), err
    # Once the command is over, the program's logging is as it was.
    assert not any(isinstance(h, logging.StreamHandler) for h in PACKAGE.handlers)


_SKIPS_A_CORRUPT_ONE = """
import pathlib, torch, aiockpt
config = aiockpt.Config(directory={directory!r}, keep_last=None)
model = torch.nn.Linear(2, 2)
with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
    ckpt.checkpoint(1).wait()
    with torch.no_grad():  # every tensor changes: step 2 shares no file with step 1
        for p in model.parameters(): p.add_(1)
    ckpt.checkpoint(2).wait()
data = sorted(pathlib.Path({directory!r}, "step-2").glob("data-*.bin"))[0]
raw = bytearray(data.read_bytes()); raw[0] ^= 0xFF; data.write_bytes(bytes(raw))
with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
    print(ckpt.restore())
"""


def test_a_program_that_configured_nothing_still_sees_warnings(tmp_path: Path) -> None:
    """Restore falling back past a corrupt checkpoint must never go unseen."""
    done = _python(_SKIPS_A_CORRUPT_ONE.format(directory=str(tmp_path / "ckpt")))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]
    assert "skipping corrupt checkpoint" in done.stderr
    assert "step 1" not in done.stderr  # INFO stays quiet without verbose
