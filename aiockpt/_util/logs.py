"""Logging: every module logs to ``logging.getLogger(__name__)``, all under ``aiockpt``.

Where output goes is the application's choice: aiockpt adds no handler of its own while
the application has configured logging. In a program that configured nothing, Python's
last-resort handler still prints WARNING and above on stderr (a corrupt checkpoint that
restore skipped must not go unseen), and ``verbose = true`` adds one stderr handler to the
``aiockpt`` logger so that the INFO it asks for is seen too. Two settings choose how much
is said, applied to the ``aiockpt`` logger when a checkpointer starts:

* ``AIOCKPT_LOG_LEVEL`` (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``, ``CRITICAL``, or a
  number), which wins over
* ``verbose = true`` in the config, a shortcut for ``INFO``.

The command line is an application: while a command runs, it sends aiockpt's records to
stderr (so that ``--json`` output on stdout stays one document), at ``AIOCKPT_LOG_LEVEL``
or ``WARNING``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from ..errors import ConfigError

__all__ = [
    "LEVEL_ENV",
    "PACKAGE_LOGGER",
    "apply_config_level",
    "level_from_env",
    "log_to_stderr",
]

PACKAGE_LOGGER = "aiockpt"
LEVEL_ENV = "AIOCKPT_LOG_LEVEL"
_LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def level_from_env() -> int | None:
    """The level ``AIOCKPT_LOG_LEVEL`` names, or None when it is unset or empty."""
    text = os.environ.get(LEVEL_ENV, "").strip()
    if not text:
        return None
    if text.isdigit():
        return int(text)
    if text.upper() in _LEVEL_NAMES:
        return int(logging.getLevelName(text.upper()))
    raise ConfigError(
        f"{LEVEL_ENV}={text!r} is not a log level",
        hint=f"use one of {', '.join(_LEVEL_NAMES)} (or a number), or unset it",
    )


def apply_config_level(verbose: bool) -> None:
    """Set the ``aiockpt`` logger's level from the environment, else from ``verbose``.

    ``verbose`` only ever lowers the threshold to INFO: a level the application chose that
    says more (DEBUG) stays.
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    level = level_from_env()
    if level is not None:
        logger.setLevel(level)
    elif verbose and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    if (level is not None or verbose) and not _configured(logger):
        # Nothing would show what was asked for (the last resort prints WARNING and up).
        handler = _CurrentStderr()
        handler.setFormatter(_OneLine(tracebacks=logger.getEffectiveLevel() <= logging.DEBUG))
        handler.set_name(_OWN_HANDLER)
        logger.addHandler(handler)


_OWN_HANDLER = "aiockpt-stderr"


def _configured(logger: logging.Logger) -> bool:
    """Whether a record of ``logger`` reaches any handler (the application's, or ours)."""
    current: logging.Logger | None = logger
    while current is not None:
        if current.handlers:
            return True
        current = current.parent if current.propagate else None
    return False


class _CurrentStderr(logging.StreamHandler[TextIO]):
    """Writes to ``sys.stderr`` as it is at each record: callers (and tests) replace it."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always the current sys.stderr


class _OneLine(logging.Formatter):
    """``aiockpt: LEVEL: message``; an attached exception as ``(Type: text)`` on the same
    line, its traceback only when DEBUG is asked for."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__("aiockpt: %(levelname)s: %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if self.tracebacks or not record.exc_info or record.exc_info[1] is None:
            return super().format(record)
        error = record.exc_info[1]
        line = self.formatMessage(_without_exception(record))
        return f"{line} ({type(error).__name__}: {error})"


def _without_exception(record: logging.LogRecord) -> logging.LogRecord:
    plain = logging.makeLogRecord(record.__dict__)
    plain.exc_info, plain.exc_text = None, None
    plain.message = plain.getMessage()
    return plain


@contextmanager
def log_to_stderr(level: int) -> Iterator[None]:
    """While it lasts, aiockpt's records at ``level`` and above go to stderr, one line each,
    prefixed ``aiockpt:``; afterwards the logger is as it was (a program that calls the
    command line's ``main`` keeps its own logging)."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = _CurrentStderr()
    handler.setFormatter(_OneLine(tracebacks=level <= logging.DEBUG))
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
