"""Settings of an aiockpt checkpointer, validated once, up front.

A :class:`Config` is frozen. Build one directly (``Config(max_async=4)``), from the
``[checkpoint]`` table of a TOML file (:meth:`Config.from_toml`), or from command-line
flags generated from the same keys (:func:`add_config_arguments`). Wherever it comes
from, ``AIOCKPT_<KEY>`` environment variables apply too, with one precedence, highest
first: keyword arguments (or flags), then ``AIOCKPT_<KEY>`` variables, then the file,
then the defaults. Every bad setting raises :class:`~aiockpt.errors.ConfigError` naming
the key, the value and what is allowed.

The knobs, and what each one does, are listed in :class:`Config`'s docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import signal
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from aiockpt._util.location import Location, ObjectPath, storage_location
from aiockpt._util.text import shown
from aiockpt.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "DEFAULT_CHUNK_SIZE_MB",
    "ENV_PREFIX",
    "Config",
    "MemoryTier",
    "RemoteTier",
    "add_config_arguments",
    "config_from_arguments",
    "resolve_config",
]

DEFAULT_CHUNK_SIZE_MB = 256
ENV_PREFIX = "AIOCKPT_"
# AIOCKPT_ variables that other parts of aiockpt read; everything else with the prefix
# must be a key, because a misspelt variable that silently does nothing is worse.
_NON_CONFIG_ENV = frozenset({"AIOCKPT_LOG_LEVEL"})
# Chunks are multiples of a page so that O_DIRECT-style aligned writes stay possible.
_ALIGN = 4096
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class _Key(NamedTuple):
    kind: type
    expected: str
    ok: Callable[[Any], bool] = lambda v: True
    optional: bool = False
    choices: tuple[str, ...] = ()


def _choice(*choices: str) -> _Key:
    return _Key(str, "one of " + ", ".join(map(repr, choices)), choices=choices)


def _int(lo: int, hi: int | None = None, optional: bool = False) -> _Key:
    text = f"an integer from {lo} to {hi}" if hi else f"an integer >= {lo}"
    return _Key(
        int,
        text + (", or None" if optional else ""),
        lambda v: lo <= v and (hi is None or v <= hi),
        optional,
    )


def _float(hi: float | None, below: bool = False, optional: bool = False) -> _Key:
    # Every float knob is a positive quantity; they differ only at the top.
    text = "a number > 0" + (f" and {'<' if below else '<='} {hi}" if hi else "")
    return _Key(
        float,
        text + (", or None" if optional else ""),
        lambda v: v > 0 and (hi is None or v < hi or (v == hi and not below)),
        optional,
    )


_BOOL = _Key(bool, "True or False")
# Signals a process can be asked to stop with, by name; SIGKILL and SIGSTOP cannot be
# caught, so a handler for them could never save anything.
_CATCHABLE_SIGNALS = tuple(
    sorted(
        name
        for name, number in signal.Signals.__members__.items()
        if number not in (signal.SIGKILL, signal.SIGSTOP)
    )
)
_SIGNALS = _Key(
    tuple, "a list of signal names such as ['SIGTERM', 'SIGUSR1'] (not SIGKILL or SIGSTOP)"
)


# -- tiers: [checkpoint.memory] and [checkpoint.remote] ---------------------------------
# Each sub-key is checked by the spec of the top-level key it mirrors, so that
# memory.keep_last and keep_last accept the same values and say so the same way.
@dataclass(frozen=True, kw_only=True)
class MemoryTier:
    """The shared-memory tier (``[checkpoint.memory]``, ``Config(memory={...})``).

    Checkpoints in a tmpfs directory: they survive a crash of the training process (not
    of the machine), and restore prefers them when they are the newest.

    Attributes:
        directory: the tmpfs directory; None derives ``/dev/shm/aiockpt-<hash>`` from the
            primary directory, so that a restarted process finds it unconfigured.
        interval_steps: every checkpoint whose step this divides is kept here (None:
            every checkpoint).
        keep_last: checkpoints kept in memory (each costs the state's size in RAM).

    Raises:
        ConfigError: an unknown sub-key or a bad value, named ``memory.<key>``.
    """

    directory: Path | None = None
    interval_steps: int | None = None
    keep_last: int = 2

    def __post_init__(self) -> None:
        _check_tier(self, "memory", {"directory": "directory", "interval_steps": "interval_steps"})
        # Never "none": every checkpoint kept here holds the state's size of RAM.
        object.__setattr__(self, "keep_last", _check("memory.keep_last", self.keep_last, _int(1)))


@dataclass(frozen=True, kw_only=True)
class RemoteTier:
    """A second, slower tier (``[checkpoint.remote]``, ``Config(remote={...})``), fed by
    copying committed checkpoints from the primary directory.

    Attributes:
        url: where its checkpoints go: a path (an NFS mount, another disk) or a URL of a
            scheme a storage backend serves.
        interval_steps: the steps whose checkpoints are copied here (None: every one that
            reaches the primary).
        keep_last: checkpoints kept there (None keeps all).
        on_backpressure: when ``max_pending`` copies are queued, a new one is dropped
            (``"skip"``, so a slow remote never holds training back) or waited for
            (``"block"``).
        max_pending: copies queued or running at once.

    Raises:
        ConfigError: an unknown sub-key, a missing ``url`` or a bad value, named
            ``remote.<key>``.
    """

    url: Path | None = None
    interval_steps: int | None = None
    keep_last: int | None = 3
    on_backpressure: str = "skip"
    max_pending: int = 1

    def __post_init__(self) -> None:
        if self.url is None:
            raise ConfigError(
                "remote.url is missing: give the location the remote tier copies to, "
                'e.g. remote = {"url": "/mnt/nfs/run-1"} or url = "..." in [checkpoint.remote]'
            )
        _check_tier(
            self,
            "remote",
            {
                "url": "directory",
                "interval_steps": "interval_steps",
                "keep_last": "keep_last",
                "on_backpressure": "on_backpressure",
            },
        )
        pending = _check("remote.max_pending", self.max_pending, _int(1, 64))
        object.__setattr__(self, "max_pending", pending)


_Tier = MemoryTier | RemoteTier


def _check_tier(tier: _Tier, table: str, mirrors: dict[str, str]) -> None:
    for name, key in mirrors.items():
        value = getattr(tier, name)
        if name == "directory" and value is None:
            continue
        try:
            checked = _check(f"{table}.{name}", value, _KEYS[key])
        except ConfigError as exc:
            if str(exc).startswith(f"{table}."):
                raise
            raise ConfigError(f"{table}.{name}: {exc}") from None  # the location's own words
        object.__setattr__(tier, name, checked)


def _tier_from(kind: type[_Tier], table: str, value: object) -> _Tier:
    """A tier's settings from a dict (Python, or a TOML sub-table) or the dataclass."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{table} = {_shown(value)} has the wrong type ({type(value).__name__}): expected "
            f"a table ([checkpoint.{table}] in TOML), a dict, or aiockpt.{kind.__name__}"
        )
    names = [f.name for f in dataclasses.fields(kind)]
    values = dict(value)
    for key, item in values.items():
        if key not in names:
            raise ConfigError(
                f"unknown key {table}.{key}{_suggest(str(key), names)}; valid keys of "
                f"[checkpoint.{table}] are: {', '.join(names)}"
            )
        optional = key != "directory" and kind.__dataclass_fields__[key].default is None
        if (optional or key == "keep_last") and isinstance(item, str) and item.lower() == "none":
            values[key] = None
    return kind(**values)


_KEYS: dict[str, _Key] = {
    "directory": _Key(
        Path, "a non-empty path (str or os.PathLike), a file:// URL or an s3://bucket/prefix URL"
    ),
    "interval_steps": _int(1, optional=True),
    "interval_seconds": _float(None, optional=True),
    "max_overhead": _float(1, below=True, optional=True),
    "keep_last": _int(1, optional=True),
    "max_async": _int(1, 64),
    "chunk_size_mb": _float(65536, optional=True),
    "chunk_count": _int(1, 4096, optional=True),
    "num_threads": _int(1, 256),
    "pinned_ratio": _float(64),
    "staging": _choice("auto", "gpu", "host"),
    "use_monitor": _BOOL,
    "on_backpressure": _choice("block", "skip"),
    "on_error": _choice("raise", "warn"),
    "durable": _BOOL,
    "incremental": _BOOL,
    "verbose": _BOOL,
    "rank_timeout_s": _float(None),
    "preemption_signals": _SIGNALS,
    "preemption_grace_s": _float(None),
    "memory": _Key(MemoryTier, "a table of directory, interval_steps, keep_last", optional=True),
    "remote": _Key(RemoteTier, "a table of url, interval_steps, keep_last, ...", optional=True),
}


def _check(key: str, value: object, spec: _Key | None = None) -> Any:
    """Return ``value`` normalised (Path, float) or raise a ConfigError about it.

    ``spec`` checks a tier's sub-key (``memory.keep_last``) as the key it mirrors."""
    spec = _KEYS[key] if spec is None else spec
    if spec.kind is tuple:
        return _signal_names(key, value)
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{key} = None is not allowed: expected {spec.expected}")
    if spec.kind in (MemoryTier, RemoteTier):
        return _tier_from(spec.kind, key, value)
    if spec.kind is Path:
        if isinstance(value, ObjectPath):
            return value  # parsed and checked already (its os.fspath refuses on purpose)
        text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
        if isinstance(text, str) and text and "\0" not in text:
            return storage_location(value if isinstance(value, (str, Path)) else text)
        problem = (
            "is empty"
            if text == ""
            else "contains a NUL byte, which no file system allows in a path"
            if isinstance(text, str)
            else f"has the wrong type ({type(value).__name__})"
        )
        raise ConfigError(f"{key} = {_shown(value)} {problem}: expected {spec.expected}")
    # bool is an int subclass, but True as a thread count is always a mistake.
    accepted = (int, float) if spec.kind is float else spec.kind
    if not isinstance(value, accepted) or (isinstance(value, bool) and spec.kind is not bool):
        raise ConfigError(
            f"{key} = {_shown(value)} has the wrong type ({type(value).__name__}): "
            f"expected {spec.expected}{_type_hint(spec, value)}"
        )
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"{key} = {_shown(value)} is not allowed: expected {spec.expected}")
    try:
        plain = spec.kind(value)  # int -> float, and int/str subclasses to the plain type
    except OverflowError:  # an int beyond any float
        plain = math.inf
    if (spec.kind is float and not math.isfinite(plain)) or not spec.ok(plain):
        raise ConfigError(f"{key} = {_shown(value)} is out of range: expected {spec.expected}")
    return plain


def _signal_names(key: str, value: object) -> tuple[str, ...]:
    """``value`` as canonical signal names (``"sigterm"`` -> ``"SIGTERM"``), in order."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        hint = f" (write [{value!r}])" if isinstance(value, str) else ""
        raise ConfigError(
            f"{key} = {_shown(value)} has the wrong type ({type(value).__name__}): "
            f"expected {_SIGNALS.expected}{hint}"
        )
    names: list[str] = []
    for item in value:
        name = item.upper() if isinstance(item, str) else None
        if name is not None and not name.startswith("SIG"):
            name = "SIG" + name
        if name not in _CATCHABLE_SIGNALS:
            uncatchable = name in ("SIGKILL", "SIGSTOP")
            why = "cannot be caught by any process" if uncatchable else "is not a signal name"
            close = "" if uncatchable else _suggest(str(name), list(_CATCHABLE_SIGNALS))
            raise ConfigError(
                f"{key} = {_shown(value)}: {item!r} {why}: expected {_SIGNALS.expected}{close}"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def _shown(value: object) -> str:
    # A 400-digit integer is still named, but not spelt out in full.
    return shown(value, limit=80, keep=40)


def _type_hint(spec: _Key, value: object) -> str:
    """What the writer of a mistyped value most likely meant, when that is clear."""
    if isinstance(value, str) and spec.kind in (bool, int, float):
        # Quoted in TOML, or passed on from a command line or a JSON file as text.
        what = "a bool" if spec.kind is bool else "a number"
        return f" ({what}, not the string {value!r}; in TOML write it without quotes)"
    if spec.kind is int and isinstance(value, float) and value.is_integer():
        return f" (write {int(value)}, without the fraction)"
    return ""


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(key: str, where: str) -> ConfigError:
    return ConfigError(
        f"unknown key {key!r} {where}{_suggest(key, list(_KEYS))}; "
        f"valid keys are: {', '.join(_KEYS)}"
    )


def _parse_text(key: str, raw: str) -> Any:
    """The value that the text ``raw`` stands for, as an environment variable or a flag.

    Raises ValueError naming what is expected; the value is not yet range-checked.
    """
    spec, text = _KEYS[key], raw.strip().lower()
    if spec.kind is tuple:  # comma-separated: SIGTERM,SIGUSR1 (empty: none)
        return [part.strip() for part in raw.split(",") if part.strip()]
    if spec.optional and text in ("", "none"):
        return None
    if spec.kind is bool:
        if text not in _TRUE | _FALSE:
            raise ValueError("expected 1/0, true/false, yes/no or on/off")
        return text in _TRUE
    if spec.kind in (int, float):
        try:
            return spec.kind(raw)
        except ValueError:
            raise ValueError(f"expected {spec.expected}") from None
    return raw


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var in _NON_CONFIG_ENV:
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key not in _KEYS:
            names = [ENV_PREFIX + k.upper() for k in _KEYS]
            raise ConfigError(
                f"environment variable {var} matches no aiockpt setting"
                f"{_suggest(var.upper(), names)}; unset it or use one of: " + ", ".join(names)
            )
        try:
            value = _parse_text(key, raw)
        except ValueError as exc:
            raise ConfigError(f"{var}={raw!r} is not valid for {key}: {exc}") from None
        try:
            values[key] = _check(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{var}={raw!r}: {exc}") from None
    return values


# Keys that say the same thing two ways: a source that sets one of them replaces what a
# source below it said about either, so a flag --chunk-count overrides a file's
# chunk_size_mb instead of colliding with it.
_EXCLUSIVE = (frozenset({"chunk_size_mb", "chunk_count"}),)


def _layered(*sources: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``sources`` (lowest precedence first) as one dict."""
    values: dict[str, Any] = {}
    for source in sources:
        for group in _EXCLUSIVE:
            if group & source.keys():
                for key in group:
                    values.pop(key, None)
        values.update(source)
    return values


def _toml_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str):
        return repr(value)  # int, or a finite float, which TOML spells like Python
    # TOML basic strings forbid raw control characters; escape them like JSON does.
    body = "".join(
        "\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c
        for c in value
    )
    return f'"{body}"'


def _read_toml(path: object) -> dict[str, Any]:
    """The parsed TOML file at ``path``; every way of failing is a ConfigError naming it."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise ConfigError(
            f"config file path {path!r} has the wrong type ({type(path).__name__}): "
            "expected a str or os.PathLike path to a TOML file"
        )
    name = os.fspath(path)
    if "\0" in name:
        raise ConfigError(f"config file path {name!r} contains a NUL byte: no such file")
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError(f"config file {name!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot open config file {name!r}: {exc.strerror}") from None
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            what = "a directory" if stat.S_ISDIR(kind) else "not a regular file"
            raise ConfigError(
                f"config file {name!r} is {what}: pass the path of a TOML file "
                "with a [checkpoint] table"
            )
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {name!r}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {name!r} is not UTF-8 text (byte {exc.start} is "
            f"{raw[exc.start : exc.start + 1]!r}): TOML files are UTF-8; save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {name!r} is not valid TOML: {exc}") from None
    except RecursionError:  # arrays or tables nested thousands deep
        raise ConfigError(
            f"config file {name!r} is not valid TOML for aiockpt: it nests too deep"
        ) from None


@dataclass(frozen=True, kw_only=True)
class Config:
    """Validated, immutable settings of a checkpointer; see the module docstring.

    Every key is a keyword argument (``Config(directory="ckpt", max_async=4)``), a key of
    the ``[checkpoint]`` TOML table (:meth:`from_toml`) and an ``AIOCKPT_<KEY>``
    environment variable.

    A key not given as a keyword argument is taken from its ``AIOCKPT_<KEY>`` variable
    when one is set, else from the default: ``Config(max_async=4)`` with
    ``AIOCKPT_MAX_ASYNC=8`` and ``AIOCKPT_NUM_THREADS=16`` has max_async 4 and
    num_threads 16. A variable that names no key, or holds a bad value, is a ConfigError.
    Setting one of ``chunk_size_mb`` / ``chunk_count`` discards the other from the
    variables (and the file) below it.

    Attributes:
        directory: where checkpoints go; a relative path is taken against the CWD. An
            ``s3://bucket/prefix`` URL puts them in an object store (the ``s3`` extra;
            endpoint and credentials from the standard ``AWS_*`` variables).
        interval_steps: the Trainer's policy: checkpoint every N optimizer steps.
        interval_seconds: the Trainer's policy: checkpoint every T seconds.
        max_overhead: the Trainer's policy: checkpoint as often as keeps the cost of
            checkpointing below this fraction of training time.
        keep_last: committed checkpoints to keep (None keeps all).
        max_async: checkpoints in flight at once.
        chunk_size_mb: the size of the chunks a checkpoint is cut into, written in
            parallel (default: 256 MiB); set this or ``chunk_count``, not both.
        chunk_count: the number of chunks instead.
        num_threads: writer threads.
        pinned_ratio: size of the host buffer pool as a multiple of the state size.
            Below 1, chunks staged on the GPU stream through the pool; state captured
            to host memory (host staging, CPU tensors) is then captured in pieces, and
            ``checkpoint()`` waits while the first pieces are written.
        staging: where the snapshot is staged: ``"gpu"``, ``"host"`` or ``"auto"``.
        use_monitor: run the pipeline on a background thread with its own uvloop event
            loop; false runs it on the caller's running loop (SyncCheckpointer then blocks
            until each checkpoint is durable), which binds an async Checkpointer to that
            one loop.
        on_backpressure: when ``max_async`` are in flight, whether one more waits for a
            free slot (``"block"``) or is dropped (``"skip"``).
        on_error: a background failure is re-raised at the next ``checkpoint()`` or
            ``wait()`` (``"raise"``) or logged as a warning while training goes on
            (``"warn"``).
        durable: fsync files before a checkpoint is committed.
        incremental: a tensor whose bytes equal those of this writer's previous
            checkpoint is shared with it (one copy on disk) instead of written again.
        verbose: log every checkpoint, not only problems.
        rank_timeout_s: under torch.distributed, how long ranks wait for each other to
            agree on a commit (or a restore) before the checkpoint is given up.
        memory: the shared-memory tier (:class:`MemoryTier`, or a dict of its keys);
            None: none.
        remote: a slower tier fed from the primary (:class:`RemoteTier`, or a dict of
            its keys); None: none.
        preemption_signals: signals (``["SIGTERM", "SIGUSR1"]``) after which the
            Trainer, or ``checkpoint_and_exit()``, saves the step under way and exits with
            status 128 + the signal's number; none by default, since a library must not
            take a process's signals unasked.
        preemption_grace_s: seconds between such a signal and the SIGKILL that follows
            it; the save goes where it can be durable within what is left of them.

    Raises:
        ConfigError: a key that is unknown, mistyped or out of range (the message names
            it, the value and what is allowed), a positional argument, or both
            ``chunk_size_mb`` and ``chunk_count``.
    """

    directory: Location = Path("checkpoints")
    interval_steps: int | None = None
    interval_seconds: float | None = None
    max_overhead: float | None = None
    keep_last: int | None = 3
    max_async: int = 2
    chunk_size_mb: float | None = None
    chunk_count: int | None = None
    num_threads: int = 8
    pinned_ratio: float = 1.0
    staging: str = "auto"
    use_monitor: bool = True
    on_backpressure: str = "block"
    on_error: str = "raise"
    durable: bool = True
    incremental: bool = True
    verbose: bool = False
    rank_timeout_s: float = 1800.0
    preemption_signals: tuple[str, ...] = ()
    preemption_grace_s: float = 30.0
    memory: MemoryTier | None = None
    remote: RemoteTier | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Config:
        # Runs before the generated __init__, whose TypeError for a misspelt keyword
        # would name no alternative: check the names here, as from_toml does.
        if args:
            raise ConfigError(
                f"Config() takes keyword arguments only, got {len(args)} positional: "
                f"write Config(directory={args[0]!r}, ...); valid keys are: {', '.join(_KEYS)}"
            )
        for key in kwargs:
            if key not in _KEYS:
                raise _unknown(key, "passed to Config()")
        config = super().__new__(cls)
        if kwargs:
            # __post_init__ sees every field filled in: it must know which were given,
            # since only the others are taken from the environment.
            object.__setattr__(config, "_given", frozenset(kwargs))
        return config

    def __post_init__(self) -> None:
        given: frozenset[str] = self.__dict__.pop("_given", frozenset())
        if len(given) < len(_KEYS):
            keywords = {key: getattr(self, key) for key in given}
            for key, value in _layered(_from_env(os.environ), keywords).items():
                object.__setattr__(self, key, value)
        for key in _KEYS:
            object.__setattr__(self, key, _check(key, getattr(self, key)))
        if self.chunk_size_mb is not None and self.chunk_count is not None:
            raise ConfigError(
                f"chunk_size_mb = {self.chunk_size_mb!r} and chunk_count = "
                f"{self.chunk_count!r} are both set: set at most one of them "
                "(chunk_size_mb fixes the chunk size, chunk_count the number of chunks)"
            )

    @staticmethod
    def _file_values(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The checked values of the ``[checkpoint]`` table of TOML file ``path``."""
        data = _read_toml(path)
        path = Path(path)
        for name, item in data.items():
            if name != "checkpoint":
                what = "table" if isinstance(item, dict) else "key"
                raise ConfigError(
                    f"config file {str(path)!r} has an unexpected top-level {what} "
                    f"{name!r}{_suggest(name, ['checkpoint'])}: aiockpt reads only "
                    "the [checkpoint] table"
                )
        table = data.get("checkpoint")
        if not isinstance(table, dict):
            raise ConfigError(f"config file {str(path)!r} has no [checkpoint] table")
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in _KEYS:
                raise _unknown(key, f"in [checkpoint] of {str(path)!r}")
            if _KEYS[key].optional and isinstance(value, str) and value.lower() == "none":
                value = None
            try:
                values[key] = _check(key, value)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (in {str(path)!r})") from None
        return values

    @classmethod
    def from_toml(
        cls, path: str | os.PathLike[str], *, env: bool = True, **overrides: Any
    ) -> Config:
        """Read ``[checkpoint]`` of TOML file ``path``, then env, then ``overrides``.

        TOML has no null, so an optional key may be written as ``"none"``.

        Args:
            path: the TOML file; it must hold a ``[checkpoint]`` table and nothing else.
            env: apply the ``AIOCKPT_<KEY>`` environment variables over the file.
            **overrides: keys that take precedence over the file and the environment.

        Returns:
            The validated Config.

        Raises:
            ConfigError: the file is missing, unreadable or not TOML, has other tables or
                keys, or a value is bad; the message names the file and the key.
        """
        file_values = cls._file_values(path)
        for key in overrides:
            if key not in _KEYS:
                raise _unknown(key, "passed to Config.from_toml()")
        env_values = _from_env(os.environ) if env else {}
        return cls._layers(file_values, env_values, overrides)

    @classmethod
    def from_env(cls, *, environ: Mapping[str, str] | None = None, **base: Any) -> Config:
        """``Config(**base)`` with the ``AIOCKPT_<KEY>`` variables of ``environ``.

        Args:
            environ: the variables to read (None: ``os.environ``).
            **base: keys the environment variables take precedence over.

        Returns:
            The validated Config.

        Raises:
            ConfigError: an unknown key, or a bad value (the variable is named).
        """
        for key in base:
            if key not in _KEYS:
                raise _unknown(key, "passed to Config.from_env()")
        return cls._layers(base, _from_env(os.environ if environ is None else environ))

    @classmethod
    def _layers(cls, *sources: Mapping[str, Any]) -> Config:
        """A Config of ``sources`` (lowest precedence first) and nothing else.

        Every key is passed, the defaults included, so that the environment, which a
        caller has layered in already (or deliberately left out), is not read again.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        return cls(**{**defaults, **_layered(*sources)})

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and validated.

        Args:
            **changes: the keys to change.

        Returns:
            A new Config; this one is unchanged.

        Raises:
            ConfigError: an unknown key, or a bad value.
        """
        for key in changes:
            if key not in _KEYS:
                raise _unknown(key, "passed to Config.replace()")
        return dataclasses.replace(self, **changes)

    def chunk_bytes(self, state_nbytes: int) -> int:
        """Bytes per chunk for a state of that size.

        Args:
            state_nbytes: the bytes of tensor state a checkpoint holds (>= 0).

        Returns:
            A positive multiple of 4096.

        Raises:
            ValueError: ``state_nbytes`` is negative.
        """
        if state_nbytes < 0:
            raise ValueError(f"state_nbytes = {state_nbytes!r}: expected >= 0")
        if self.chunk_count is not None:
            size = -(-state_nbytes // self.chunk_count)
        else:
            mb = self.chunk_size_mb or DEFAULT_CHUNK_SIZE_MB  # None: the default
            size = math.ceil(mb * 2**20)
        return max(_ALIGN, -(-size // _ALIGN) * _ALIGN)

    def write_slots(self, chunks_per_checkpoint: int) -> int:
        """Size of the write semaphore: a slot per chunk of every in-flight checkpoint.

        Sized so that no chunk waits for a chunk of another checkpoint; never 0, since
        an empty semaphore would hang even a checkpoint without chunks.

        Args:
            chunks_per_checkpoint: chunks one checkpoint is cut into.

        Returns:
            ``max_async`` x chunks (at least ``max_async``).
        """
        return self.max_async * max(1, chunks_per_checkpoint)

    def queueing_warnings(self, chunks_per_checkpoint: int) -> list[str]:
        """Why chunks would queue under these settings.

        Args:
            chunks_per_checkpoint: chunks one checkpoint is cut into.

        Returns:
            One message per reason, with the setting to change; empty when none.
        """
        n = chunks_per_checkpoint
        if self.num_threads < n:
            msg = (
                "chunks will wait for writer threads: "
                f"num_threads = {self.num_threads} < {n} chunks per checkpoint; "
                f"set num_threads >= {n} or chunk_count <= {self.num_threads}"
            )
            return [msg]
        return []

    def to_dict(self) -> dict[str, object]:
        """The settings as plain values.

        Returns:
            Every key and its value, JSON-able, ``directory`` as a str and
            ``preemption_signals`` as a list.
        """
        out: dict[str, object] = {key: getattr(self, key) for key in _KEYS}
        out["directory"] = str(self.directory)
        out["preemption_signals"] = list(self.preemption_signals)
        for table in ("memory", "remote"):
            tier = getattr(self, table)
            if tier is not None:
                out[table] = {
                    k: str(v) if isinstance(v, Path) else v
                    for k, v in dataclasses.asdict(tier).items()
                }
        return out

    def to_toml(self) -> str:
        """The settings as a TOML file.

        Returns:
            A ``[checkpoint]`` table that :meth:`from_toml` reads back unchanged.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        lines = ["[checkpoint]"]
        tables: list[str] = []
        for key, value in self.to_dict().items():
            if value is None and defaults[key] is None:
                continue  # absent means None already
            if isinstance(value, dict):  # a tier: its own [checkpoint.<key>] sub-table
                tables.append(f"\n[checkpoint.{key}]")
                tables.extend(
                    f"{k} = {_toml_value('none' if v is None else v)}"
                    for k, v in value.items()
                    if v is not None or k == "keep_last"
                )
                continue
            lines.append(f"{key} = {_toml_value('none' if value is None else value)}")
        return "\n".join(lines + tables) + "\n"


def resolve_config(config: object, owner: str) -> Config:
    """The Config that ``owner``'s ``config`` argument stands for.

    Checkpointers and Trainers take a Config, the path of a TOML file (read with
    :meth:`Config.from_toml`, environment overrides included) or None for the defaults.
    """
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, os.PathLike)):
        return Config.from_toml(config)
    hint = (
        "; the objects to save are keyword arguments, e.g. "
        f"{owner}(config, model=model, optimizer=optimizer)"
        if hasattr(config, "state_dict")
        else ""
    )
    raise ConfigError(
        f"{owner}(config={type(config).__name__}) has the wrong type: expected an "
        f"aiockpt.Config, the path of a TOML file (str or os.PathLike) or None{hint}"
    )


# -- command-line flags ------------------------------------------------------------------
# One line per key for --help; the type, the choices and the default come from _KEYS and
# the dataclass, so a flag can never drift from the key it sets.
_MEANING: dict[str, str] = {
    "directory": "where checkpoints go",
    "interval_steps": "the Trainer checkpoints every N steps",
    "interval_seconds": "the Trainer checkpoints every S seconds",
    "max_overhead": "the Trainer checkpoints as often as keeps its cost below this fraction",
    "keep_last": "committed checkpoints to keep",
    "max_async": "checkpoints in flight at once",
    "chunk_size_mb": "MiB per chunk (none means 256)",
    "chunk_count": "or the number of chunks per checkpoint",
    "num_threads": "writer threads",
    "pinned_ratio": "host staging pool / state size",
    "staging": "where the snapshot is staged",
    "use_monitor": "run the pipeline on a background thread with its own event loop",
    "on_backpressure": "a checkpoint with every in-flight place taken waits, or is skipped",
    "on_error": "a background failure is raised at the next call, or logged",
    "durable": "fsync files before a checkpoint is committed",
    "incremental": "share unchanged tensors with the previous checkpoint instead of writing them",
    "verbose": "log every checkpoint",
    "rank_timeout_s": "seconds ranks wait for each other to agree on a commit",
    "preemption_signals": "comma-separated signals that save the step under way and exit",
    "preemption_grace_s": "seconds between a preemption signal and the SIGKILL after it",
    "memory": "the shared-memory tier",
    "remote": "a slower tier fed from the primary",
}
_METAVAR = {int: "N", float: "X", Path: "DIR", tuple: "SIG,..."}
CONFIG_FILE_FLAG = "config"


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _flag_type(key: str) -> Callable[[str], Any]:
    """argparse's ``type`` for the flag of ``key``: the environment's parsing and checks."""

    def parse(raw: str) -> Any:
        try:
            return _check(key, _parse_text(key, raw))
        except (ValueError, ConfigError) as exc:
            raise argparse.ArgumentTypeError(f"{raw!r}: {exc}") from None

    parse.__name__ = key  # argparse names the type in some of its messages
    return parse


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    keys: Iterable[str],
    *,
    config_file: bool = True,
) -> None:
    """Add a flag for each Config key in ``keys`` (``max_async`` -> ``--max-async``).

    The flags default to "not given", so that :func:`config_from_arguments` can put
    them above the ``AIOCKPT_*`` variables and the ``--config`` file (added too, unless
    ``config_file`` is false). Bad values are usage errors naming what is allowed.
    """
    keys = list(keys)
    for key in keys:
        if key not in _KEYS:
            raise _unknown(key, "passed to add_config_arguments()")
    if config_file:
        parser.add_argument(
            "--" + CONFIG_FILE_FLAG,
            metavar="TOML",
            default=argparse.SUPPRESS,
            help="read settings from the [checkpoint] table of this file; flags override "
            "AIOCKPT_* variables, which override the file",
        )
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    exclusive: dict[frozenset[str], Any] = {}
    for key in keys:
        spec, target = _KEYS[key], parser
        for group in _EXCLUSIVE:
            if key in group and group <= set(keys):
                # Both on one command line is a usage error, said by argparse itself.
                if group not in exclusive:
                    exclusive[group] = parser.add_mutually_exclusive_group()
                target = exclusive[group]
        default = defaults[key]
        shown = (
            "none"
            if default is None or default == ()
            else str(default).lower()
            if spec.kind is bool
            else default
        )
        help_text = f"{_MEANING[key]} (Config key {key}; default {shown})"
        if spec.kind is bool:
            target.add_argument(
                _flag(key),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif spec.choices:
            target.add_argument(
                _flag(key), choices=spec.choices, default=argparse.SUPPRESS, help=help_text
            )
        else:
            metavar = _METAVAR[spec.kind] + ("|none" if spec.optional else "")
            target.add_argument(
                _flag(key),
                type=_flag_type(key),
                metavar=metavar,
                default=argparse.SUPPRESS,
                help=help_text,
            )


def config_from_arguments(args: argparse.Namespace, keys: Iterable[str], **fixed: Any) -> Config:
    """The Config that parsed flags stand for, in the one precedence, highest first.

    ``fixed`` (what the command itself must decide, e.g. a scratch directory), then the
    flags of ``keys`` that were given, then the ``AIOCKPT_*`` variables, then the file
    of ``--config``, then the defaults.
    """
    given = vars(args)
    file_values = Config._file_values(given[CONFIG_FILE_FLAG]) if CONFIG_FILE_FLAG in given else {}
    flags = {key: given[key] for key in keys if key in given}
    return Config._layers(file_values, _from_env(os.environ), flags, fixed)
