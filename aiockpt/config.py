"""Settings of an aiockpt checkpointer, validated once, up front.

A :class:`Config` is frozen. Build one directly, from the ``[checkpoint]`` table of a
TOML file (:meth:`Config.from_toml`) or from ``AIOCKPT_<KEY>`` environment variables
(:meth:`Config.from_env`). Precedence, lowest first: defaults, file, environment,
keyword overrides. Every bad setting raises :class:`~aiockpt.errors.ConfigError`
naming the key, the value and what is allowed.

The knobs:

* ``directory`` -- where checkpoints go; a relative path is taken against the CWD.
* ``interval_steps`` / ``interval_seconds`` / ``max_overhead`` -- the Trainer's policy:
  checkpoint every N steps, every T seconds, or as often as keeps the cost of
  checkpointing below that fraction of training time.
* ``keep_last`` -- committed checkpoints to keep (None keeps all).
* ``max_async`` -- checkpoints in flight at once; ``on_backpressure`` says whether one
  more waits for a free slot (``"block"``) or is dropped (``"skip"``).
* ``chunk_size_mb`` *or* ``chunk_count`` -- how a checkpoint is cut into chunks that
  ``num_threads`` writer threads write in parallel (default: 256 MiB chunks).
* ``pinned_ratio`` -- size of the host buffer pool as a multiple of the state size.
* ``staging`` -- where the snapshot is staged: ``"gpu"``, ``"host"`` or ``"auto"``.
* ``use_monitor`` -- run the pipeline on a background thread with its own uvloop event
  loop; false runs it on the caller's running loop (SyncCheckpointer then blocks until
  each checkpoint is durable).
* ``on_error`` -- a background failure is re-raised at the next ``checkpoint()`` or
  ``wait()`` (``"raise"``) or logged as a warning while training goes on (``"warn"``).
* ``durable`` -- fsync files before a checkpoint is committed.
* ``verbose`` -- log every checkpoint, not only problems.
* ``rank_timeout_s`` -- under torch.distributed, how long ranks wait for each other to
  agree on a commit (or a restore) before the checkpoint is given up.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from aiockpt._util.location import local_directory
from aiockpt.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["DEFAULT_CHUNK_SIZE_MB", "ENV_PREFIX", "Config"]

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
    "directory": _Key(Path, "a non-empty path (str or os.PathLike) or a file:// URL"),
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
        if isinstance(text, str) and text:
            return local_directory(value if isinstance(value, str) else text)
        problem = "is empty" if text == "" else f"has the wrong type ({type(value).__name__})"
        raise ConfigError(f"{key} = {value!r} {problem}: expected {spec.expected}")
    # bool is an int subclass, but True as a thread count is always a mistake.
    accepted = (int, float) if spec.kind is float else spec.kind
    if not isinstance(value, accepted) or (isinstance(value, bool) and spec.kind is not bool):
        raise ConfigError(
            f"{key} = {value!r} has the wrong type ({type(value).__name__}): "
            f"expected {spec.expected}"
        )
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"{key} = {value!r} is not allowed: expected {spec.expected}")
    plain = spec.kind(value)  # int -> float, and int/str subclasses to the plain type
    if (spec.kind is float and not math.isfinite(plain)) or not spec.ok(plain):
        raise ConfigError(f"{key} = {value!r} is out of range: expected {spec.expected}")
    return plain


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


@dataclass(frozen=True, kw_only=True)
class Config:
    """Validated, immutable settings of a checkpointer; see the module docstring."""

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
        """
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
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
        """``Config(**base)`` with the ``AIOCKPT_<KEY>`` variables of ``environ``."""
        for key in base:
            if key not in _KEYS:
                raise _unknown(key, "passed to Config.from_env()")
        return cls(**{**base, **_from_env(os.environ if environ is None else environ)})

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and validated."""
        for key in changes:
            if key not in _KEYS:
                raise _unknown(key, "passed to Config.replace()")
        return dataclasses.replace(self, **changes)

    def chunk_bytes(self, state_nbytes: int) -> int:
        """Bytes per chunk for a state of that size: a positive multiple of 4096."""
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
        """
        return self.max_async * max(1, chunks_per_checkpoint)

    def queueing_warnings(self, chunks_per_checkpoint: int) -> list[str]:
        """Why chunks would queue under these settings; empty when they would not."""
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
        """JSON-able plain values, ``directory`` as a str."""
        out: dict[str, object] = {key: getattr(self, key) for key in _KEYS}
        out["directory"] = str(self.directory)
        return out

    def to_toml(self) -> str:
        """A ``[checkpoint]`` table that :meth:`from_toml` reads back unchanged."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        lines = ["[checkpoint]"]
        for key, value in self.to_dict().items():
            if value is None and defaults[key] is None:
                continue  # absent means None already
            lines.append(f"{key} = {_toml_value('none' if value is None else value)}")
        return "\n".join(lines) + "\n"
