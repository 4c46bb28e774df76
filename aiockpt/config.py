"""Settings of an aiockpt checkpointer, validated once, up front.

A :class:`Config` is frozen. Build one directly, from the ``[checkpoint]`` table of a
TOML file (:meth:`Config.from_toml`) or from ``AIOCKPT_<KEY>`` environment variables
(:meth:`Config.from_env`). Precedence, lowest first: defaults, file, environment,
keyword overrides. Every bad setting raises :class:`~aiockpt.errors.ConfigError`
naming the key, the value and what is allowed.

The knobs, and what each one does, are listed in :class:`Config`'s docstring.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from aiockpt.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["DEFAULT_CHUNK_SIZE_MB", "ENV_PREFIX", "Config", "resolve_config"]

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
_KEYS: dict[str, _Key] = {
    "directory": _Key(Path, "a non-empty path (str or os.PathLike)"),
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
    "verbose": _BOOL,
    "rank_timeout_s": _float(None),
}


def _check(key: str, value: object) -> Any:
    """Return ``value`` normalised (Path, float) or raise a ConfigError about it."""
    spec = _KEYS[key]
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{key} = None is not allowed: expected {spec.expected}")
    if spec.kind is Path:
        text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
        if isinstance(text, str) and text and "\0" not in text:
            return Path(text)
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


def _shown(value: object) -> str:
    # A 400-digit integer is still named, but not spelt out in full.
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:40]}...({len(text)} characters)"


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
        spec, text = _KEYS[key], raw.strip().lower()
        expected = "1/0, true/false, yes/no or on/off" if spec.kind is bool else spec.expected
        try:
            if spec.optional and text in ("", "none"):
                value: Any = None
            elif spec.kind is bool:
                if text not in _TRUE | _FALSE:
                    raise ValueError(text)
                value = text in _TRUE
            elif spec.kind in (int, float):
                value = spec.kind(raw)
            else:
                value = raw
        except ValueError:
            raise ConfigError(
                f"{var}={raw!r} is not valid for {key}: expected {expected}"
            ) from None
        try:
            values[key] = _check(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{var}={raw!r}: {exc}") from None
    return values


def _toml_value(value: object) -> str:
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
    environment variable (read by :meth:`from_toml` and :meth:`from_env`).

    Attributes:
        directory: where checkpoints go; a relative path is taken against the CWD.
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
        verbose: log every checkpoint, not only problems.
        rank_timeout_s: under torch.distributed, how long ranks wait for each other to
            agree on a commit (or a restore) before the checkpoint is given up.

    Raises:
        ConfigError: a key that is unknown, mistyped or out of range (the message names
            it, the value and what is allowed), a positional argument, or both
            ``chunk_size_mb`` and ``chunk_count``.
    """

    directory: Path = Path("checkpoints")
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
    verbose: bool = False
    rank_timeout_s: float = 1800.0

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
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for key in _KEYS:
            object.__setattr__(self, key, _check(key, getattr(self, key)))
        if self.chunk_size_mb is not None and self.chunk_count is not None:
            raise ConfigError(
                f"chunk_size_mb = {self.chunk_size_mb!r} and chunk_count = "
                f"{self.chunk_count!r} are both set: set at most one of them "
                "(chunk_size_mb fixes the chunk size, chunk_count the number of chunks)"
            )

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
        if env:
            values.update(_from_env(os.environ))
        for key in overrides:
            if key not in _KEYS:
                raise _unknown(key, "passed to Config.from_toml()")
        return cls(**{**values, **overrides})

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
        return cls(**{**base, **_from_env(os.environ if environ is None else environ)})

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
            Every key and its value, JSON-able, ``directory`` as a str.
        """
        out: dict[str, object] = {key: getattr(self, key) for key in _KEYS}
        out["directory"] = str(self.directory)
        return out

    def to_toml(self) -> str:
        """The settings as a TOML file.

        Returns:
            A ``[checkpoint]`` table that :meth:`from_toml` reads back unchanged.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        lines = ["[checkpoint]"]
        for key, value in self.to_dict().items():
            if value is None and defaults[key] is None:
                continue  # absent means None already
            lines.append(f"{key} = {_toml_value('none' if value is None else value)}")
        return "\n".join(lines) + "\n"


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
