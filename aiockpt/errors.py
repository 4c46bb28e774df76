"""The one exception tree of aiockpt.

::

    AiockptError
     ├── ConfigError               a setting is unknown, mistyped or out of range
     ├── CheckpointError           saving failed
     │    ├── CheckpointInProgressError   a checkpoint of that step is already in flight
     │    ├── BackgroundError             a background copy/write/commit failed (``__cause__``
     │    │                               is the original exception)
     │    └── DirectoryLockedError        another live process writes to this directory
     ├── RestoreError              loading failed
     │    ├── NoCheckpointError       nothing committed (or not the asked-for step)
     │    ├── CorruptCheckpointError  a file is missing, torn, hostile or fails its checksum
     │    └── WorldSizeError          state saved per rank has nothing for this rank
     ├── UnsupportedStateError     a state_dict holds a value aiockpt cannot store safely
     ├── ConversionError           an import or export was refused (``hint`` says what to do)
     ├── UsageError                an argument aiockpt cannot take as given (a reserved name)
     └── EventLoopError            a call from a thread or event loop the checkpointer can't serve

Every message names what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AiockptError",
    "BackgroundError",
    "CheckpointError",
    "CheckpointInProgressError",
    "ConfigError",
    "ConversionError",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "NoCheckpointError",
    "RestoreError",
    "UnsupportedStateError",
    "WorldSizeError",
    "UsageError",
    "EventLoopError",
]


class AiockptError(Exception):
    """Base of every error aiockpt raises on purpose."""


class ConfigError(AiockptError, ValueError):
    """A configuration key is unknown, has the wrong type, or is out of range."""


class CheckpointError(AiockptError):
    """Saving a checkpoint failed."""


class CheckpointInProgressError(CheckpointError):
    """A checkpoint of the same step is already in flight, or the checkpointer is closing."""


class BackgroundError(CheckpointError):
    """A background stage (copy, write, commit) failed; ``__cause__`` holds the original."""


class DirectoryLockedError(CheckpointError):
    """Another live process holds the checkpoint directory's writer lock."""


class RestoreError(AiockptError):
    """Loading a checkpoint failed."""


class NoCheckpointError(RestoreError, FileNotFoundError):
    """No committed checkpoint exists (or not the requested step)."""


class CorruptCheckpointError(RestoreError):
    """A checkpoint's files are missing, torn, hostile, or fail their checksums."""


class WorldSizeError(RestoreError):
    """State saved per rank by fewer ranks than restore it: a rank has no state of its own."""


class UnsupportedStateError(AiockptError, TypeError):
    """A state_dict holds a value that aiockpt cannot store without pickling."""


class ConversionError(AiockptError):
    """An import or export was refused: its source is unreadable or unsafe to read, or the
    target format cannot hold the state. ``hint`` says what to do instead.

    Args:
        message: what was refused, and why.
        hint: what to do instead, or None.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(AiockptError, TypeError):
    """An argument aiockpt cannot take as given: a reserved or doubled name, a non-Stateful."""


class EventLoopError(AiockptError, RuntimeError):
    """A call from a thread or event loop that this checkpointer cannot serve from."""
