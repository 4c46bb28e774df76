from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from aiockpt.config import _KEYS, DEFAULT_CHUNK_SIZE_MB, Config
from aiockpt.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

EXAMPLE = Path(__file__).parents[2] / "examples" / "aiockpt.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own AIOCKPT_* settings must not leak into these tests.
    for var in list(os.environ):
        if var.upper().startswith("AIOCKPT_"):
            monkeypatch.delenv(var)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aiockpt.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    c = Config()
    assert c.directory == Path("checkpoints")
    assert (c.interval_steps, c.interval_seconds, c.max_overhead) == (None,) * 3
    assert (c.keep_last, c.max_async, c.num_threads) == (3, 2, 8)
    assert (c.chunk_size_mb, c.chunk_count) == (None, None)
    assert c.pinned_ratio == 1.0
    assert (c.staging, c.on_backpressure, c.on_error) == ("auto", "block", "raise")
    assert (c.use_monitor, c.durable, c.verbose) == (True, True, False)
    assert DEFAULT_CHUNK_SIZE_MB == 256
    assert c.chunk_bytes(10 * 2**30) == 256 * 2**20


def test_every_field_is_validated() -> None:
    assert list(_KEYS) == [f.name for f in dataclasses.fields(Config)]


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().max_async = 3  # type: ignore[misc]


def test_conversions() -> None:
    c = Config(directory="out/ckpt", interval_seconds=5, pinned_ratio=2)
    assert c.directory == Path("out/ckpt") and not c.directory.is_absolute()
    assert type(c.interval_seconds) is float and type(c.pinned_ratio) is float
    assert Config(directory=Path("/x")).directory == Path("/x")


BAD_TYPES = [
    ("directory", 3),
    ("directory", b"bytes"),
    ("interval_steps", 1.5),
    ("interval_steps", "10"),
    ("interval_seconds", "60"),
    ("max_overhead", "0.1"),
    ("keep_last", 2.0),
    ("max_async", "2"),
    ("chunk_size_mb", "64"),
    ("chunk_count", 4.0),
    ("num_threads", None),
    ("pinned_ratio", None),
    ("staging", 1),
    ("staging", None),
    ("use_monitor", 1),
    ("use_monitor", "yes"),
    ("on_backpressure", False),
    ("on_error", None),
    ("durable", "true"),
    ("verbose", 0),
]

OUT_OF_RANGE = [
    ("directory", ""),
    ("interval_steps", 0),
    ("interval_seconds", 0),
    ("interval_seconds", -1.0),
    ("interval_seconds", float("inf")),
    ("max_overhead", 0),
    ("max_overhead", 1),
    ("max_overhead", float("nan")),
    ("keep_last", 0),
    ("max_async", 0),
    ("max_async", 65),
    ("chunk_size_mb", 0),
    ("chunk_size_mb", 65536.5),
    ("chunk_count", 0),
    ("chunk_count", 4097),
    ("num_threads", 0),
    ("num_threads", 257),
    ("pinned_ratio", 0.0),
    ("pinned_ratio", 64.01),
    ("staging", "cpu"),
    ("staging", "GPU"),
    ("on_backpressure", "drop"),
    ("on_error", "ignore"),
]


@pytest.mark.parametrize(("key", "value"), BAD_TYPES + OUT_OF_RANGE)
def test_bad_value_names_key_and_value(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**{key: value})
    msg = str(info.value)
    assert msg.startswith(f"{key} = {value!r} ")
    assert "expected" in msg


@pytest.mark.parametrize(
    "key", ["interval_steps", "keep_last", "max_async", "chunk_count", "num_threads"]
)
def test_bool_rejected_for_int(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key} = True has the wrong type \(bool\)"):
        Config(**{key: True})


@pytest.mark.parametrize("key", ["interval_seconds", "max_overhead", "pinned_ratio"])
def test_bool_rejected_for_float(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key} = False has the wrong type"):
        Config(**{key: False})


def test_exact_messages() -> None:
    with pytest.raises(ConfigError) as info:
        Config(max_async=0)
    assert str(info.value) == ("max_async = 0 is out of range: expected an integer from 1 to 64")
    with pytest.raises(ConfigError) as info:
        Config(staging="cpu")
    assert str(info.value) == (
        "staging = 'cpu' is not allowed: expected one of 'auto', 'gpu', 'host'"
    )
    assert isinstance(info.value, ValueError)


def test_boundaries_accepted() -> None:
    c = Config(max_async=64, num_threads=256, chunk_count=4096, pinned_ratio=64, keep_last=None)
    assert (c.max_async, c.num_threads, c.chunk_count, c.keep_last) == (
        64,
        256,
        4096,
        None,
    )
    assert Config(chunk_size_mb=65536, max_overhead=0.999).chunk_size_mb == 65536.0


def test_chunk_size_and_count_exclusive() -> None:
    with pytest.raises(ConfigError, match=r"chunk_size_mb = 64\.0 and chunk_count = 8"):
        Config(chunk_size_mb=64, chunk_count=8)
    with pytest.raises(ConfigError, match="chunk_count"):
        Config(chunk_count=8).replace(chunk_size_mb=1)
    assert Config(chunk_count=8).replace(chunk_count=None, chunk_size_mb=1)


def test_replace() -> None:
    c = Config().replace(max_async=4, directory="elsewhere")
    assert c.max_async == 4 and c.directory == Path("elsewhere")
    with pytest.raises(ConfigError, match="max_async = 99"):
        c.replace(max_async=99)
    with pytest.raises(ConfigError, match="did you mean 'max_async'"):
        c.replace(max_asnyc=3)


def test_to_dict_is_json() -> None:
    c = Config(directory=Path("/tmp/x"), interval_seconds=30)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["directory"] == "/tmp/x" and d["interval_seconds"] == 30.0
    assert d["chunk_count"] is None and list(d) == list(_KEYS)


@pytest.mark.parametrize(
    "config",
    [
        Config(),
        Config(keep_last=None, chunk_count=16, interval_steps=100),
        Config(
            directory='we"ird\\dir\tname',
            interval_seconds=1e-5,
            max_overhead=0.05,
            chunk_size_mb=0.5,
            staging="host",
            on_backpressure="skip",
            on_error="warn",
            durable=False,
            use_monitor=False,
            verbose=True,
        ),
    ],
)
def test_toml_round_trip(tmp_path: Path, config: Config) -> None:
    path = write(tmp_path, config.to_toml())
    assert Config.from_toml(path, env=False) == config


def test_to_toml_omits_none_defaults() -> None:
    text = Config(keep_last=None).to_toml()
    assert text.startswith("[checkpoint]\n")
    assert "interval_steps" not in text and 'keep_last = "none"' in text


def test_from_toml_none_string(tmp_path: Path) -> None:
    path = write(tmp_path, '[checkpoint]\nkeep_last = "None"\n')
    assert Config.from_toml(path).keep_last is None
    path = write(tmp_path, '[checkpoint]\nmax_async = "none"\n')
    with pytest.raises(ConfigError, match="max_async = 'none' has the wrong type"):
        Config.from_toml(path)


def test_from_toml_bad_value_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[checkpoint]\nnum_threads = 0\n")
    with pytest.raises(ConfigError, match="num_threads = 0 is out of range") as info:
        Config.from_toml(path)
    assert str(path) in str(info.value)


def test_unknown_key_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "[checkpoint]\nmax_asnyc = 4\n")
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    msg = str(info.value)
    assert "'max_asnyc'" in msg and "did you mean 'max_async'" in msg
    assert "valid keys are: directory, interval_steps" in msg


def test_unknown_key_without_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[checkpoint]\nzzz = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'zzz'") as info:
        Config.from_toml(path)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("[checkpoint]\n[trainer]\nx = 1\n", "table 'trainer'"),
        ("max_async = 2\n[checkpoint]\n", "key 'max_async'"),
        (
            "[checkpont]\nmax_async = 2\n",
            "table 'checkpont' (did you mean 'checkpoint'",
        ),
    ],
)
def test_unknown_top_level(tmp_path: Path, text: str, name: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(name)):
        Config.from_toml(write(tmp_path, text))


def test_no_checkpoint_table(tmp_path: Path) -> None:
    for text in ("", "checkpoint = 3\n"):
        with pytest.raises(ConfigError, match=r"no \[checkpoint\] table"):
            Config.from_toml(write(tmp_path, text))
    assert Config.from_toml(write(tmp_path, "[checkpoint]\n")) == Config()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        Config.from_toml(path)
    assert str(path) in str(info.value)


def test_malformed_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[checkpoint]\nmax_async = \n")
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        Config.from_toml(path)
    assert str(path) in str(info.value) and "line 2" in str(info.value)


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[checkpoint]\nmax_async = 3\nnum_threads = 4\n")
    monkeypatch.setenv("AIOCKPT_MAX_ASYNC", "5")
    monkeypatch.setenv("AIOCKPT_DURABLE", "Off")
    monkeypatch.setenv("AIOCKPT_KEEP_LAST", "none")
    monkeypatch.setenv("AIOCKPT_PINNED_RATIO", "2.5")
    monkeypatch.setenv("AIOCKPT_DIRECTORY", "/data/ckpt")
    monkeypatch.setenv("AIOCKPT_LOG_LEVEL", "DEBUG")  # not a key, left alone
    c = Config.from_toml(path)
    assert (c.max_async, c.num_threads, c.durable, c.keep_last) == (5, 4, False, None)
    assert c.pinned_ratio == 2.5 and c.directory == Path("/data/ckpt")
    assert Config.from_toml(path, env=False).max_async == 3


def test_overrides_win_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[checkpoint]\nmax_async = 3\n")
    monkeypatch.setenv("AIOCKPT_MAX_ASYNC", "5")
    assert Config.from_toml(path, max_async=7).max_async == 7
    assert Config.from_toml(path, keep_last=None).keep_last is None
    with pytest.raises(ConfigError, match="did you mean 'num_threads'"):
        Config.from_toml(path, num_thread=2)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(v, True) for v in ("1", "true", "TRUE", "yes", "On", " on ")]
    + [(v, False) for v in ("0", "false", "False", "no", "OFF")],
)
def test_env_bool(raw: str, expected: bool) -> None:
    c = Config.from_env(environ={"AIOCKPT_VERBOSE": raw})
    assert c.verbose is expected


def test_from_env_base_and_optional() -> None:
    env = {"AIOCKPT_INTERVAL_STEPS": "", "AIOCKPT_CHUNK_COUNT": "16", "PATH": "/bin"}
    c = Config.from_env(environ=env, interval_steps=50, num_threads=16)
    assert (c.interval_steps, c.chunk_count, c.num_threads) == (None, 16, 16)


def test_from_env_uses_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOCKPT_STAGING", "host")
    assert Config.from_env().staging == "host"


@pytest.mark.parametrize(
    ("var", "raw", "fragment"),
    [
        ("AIOCKPT_MAX_ASYNC", "two", "expected an integer from 1 to 64"),
        ("AIOCKPT_MAX_ASYNC", "0", "max_async = 0 is out of range"),
        ("AIOCKPT_USE_MONITOR", "maybe", "expected 1/0, true/false, yes/no or on/off"),
        ("AIOCKPT_INTERVAL_SECONDS", "soon", "expected a number > 0, or None"),
        ("AIOCKPT_STAGING", "cpu", "staging = 'cpu' is not allowed"),
        ("AIOCKPT_NUM_THREADS", "none", "expected an integer from 1 to 256"),
    ],
)
def test_env_bad_value(var: str, raw: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env(environ={var: raw})
    msg = str(info.value)
    assert msg.startswith(f"{var}={raw!r}") and fragment in msg


def test_env_unknown_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIOCKPT_MAX_ASNYC", "4")
    with pytest.raises(ConfigError) as info:
        Config.from_env()
    msg = str(info.value)
    assert "AIOCKPT_MAX_ASNYC" in msg and "did you mean 'AIOCKPT_MAX_ASYNC'" in msg
    with pytest.raises(ConfigError, match="AIOCKPT_MAX_ASNYC"):
        Config.from_toml(write(tmp_path, "[checkpoint]\n"))
    # Config() reads the environment too, so the defaults alone come from an empty one.
    defaults = Config.from_env(environ={})
    assert Config.from_toml(write(tmp_path, "[checkpoint]\n"), env=False) == defaults
    with pytest.raises(ConfigError, match="AIOCKPT_MAX_ASNYC"):
        Config()


def test_example_file_parses() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in _KEYS:  # every key is documented, set or commented out
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), key
    table = tomllib.loads(text)["checkpoint"]
    config = Config.from_toml(EXAMPLE, env=False)
    assert config == Config(**table)
    differing = {k for k in _KEYS if getattr(config, k) != getattr(Config(), k)}
    assert differing == {"interval_steps"}


@pytest.mark.parametrize(
    ("kwargs", "nbytes", "expected"),
    [
        ({}, 0, 256 * 2**20),
        ({"chunk_size_mb": 64}, 10**12, 64 * 2**20),
        ({"chunk_size_mb": 0.001}, 10**9, 4096),  # 1048.6 bytes -> one page
        ({"chunk_size_mb": 1.5}, 1, 1536 * 1024),
        ({"chunk_size_mb": 1.0001}, 1, 2**20 + 4096),  # rounded up to a page
        ({"chunk_count": 4}, 4 * 2**20, 2**20),
        ({"chunk_count": 3}, 10**6, 335872),  # ceil(333334 / 4096) * 4096
        ({"chunk_count": 8}, 100, 4096),
        ({"chunk_count": 8}, 0, 4096),
    ],
)
def test_chunk_bytes(kwargs: dict[str, object], nbytes: int, expected: int) -> None:
    size = Config(**kwargs).chunk_bytes(nbytes)
    assert size == expected and size % 4096 == 0


def test_chunk_bytes_rejects_negative() -> None:
    with pytest.raises(ValueError, match="state_nbytes = -1"):
        Config().chunk_bytes(-1)


def test_write_slots() -> None:
    assert Config().write_slots(5) == 10
    assert Config(max_async=4).write_slots(1) == 4
    assert Config(max_async=3).write_slots(0) == 3


def test_queueing_warnings() -> None:
    expected = (
        "chunks will wait for writer threads: num_threads = 2 < 3 chunks per "
        "checkpoint; set num_threads >= 3 or chunk_count <= 2"
    )
    assert Config(num_threads=2).queueing_warnings(3) == [expected]
    assert Config(num_threads=3).queueing_warnings(3) == []
    assert Config().queueing_warnings(1) == []
