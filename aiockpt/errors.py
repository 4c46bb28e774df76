"""The one exception tree of aiockpt.

::

    AiockptError
     ├── ConfigError               a setting is unknown, mistyped or out of range
     ├── UsageError                an argument cannot be used as given: a path that does not
     │                             exist or is not what is asked for, an option out of range,
     │                             an output that exists already, a reserved or doubled name
     ├── CheckpointError           saving failed
     │    ├── CheckpointInProgressError   a checkpoint of that step is already in flight
     │    ├── BackgroundError             a background copy/write/commit failed (``__cause__``
     │    │                               is the original exception)
     │    └── DirectoryLockedError        another live process writes to this directory
     ├── RestoreError              loading failed
     │    ├── NoCheckpointError       nothing committed (or not the asked-for step)
     │    ├── CorruptCheckpointError  a file is missing, torn, hostile or fails its checksum
     │    ├── MissingStateError       the checkpoint holds no state under a requested name
     │    │                           (also a ``KeyError``, as a dict lookup would raise)
     │    ├── StateMismatchError      a strict restore's keys differ from the live objects'
     │    │                           (also a ``RuntimeError``, as load_state_dict raises)
     │    └── WorldSizeError          state saved per rank has nothing for this rank
     ├── UnsupportedStateError     a state_dict holds a value aiockpt cannot store safely
     ├── ConversionError           an import or export was refused (``hint`` says what to do)
     ├── EventLoopError            a call from a thread or event loop the checkpointer can't serve
     └── StorageAccessError        the storage refused access: wrong or expired credentials,
                                   a missing bucket, no permission

Every message names what was wrong and what to do about it; ``hint``, where set, is the
what-to-do on its own (the command line prints it on a line of its own). The command line
exits with status 2 for ``UsageError`` and ``ConfigError`` (fix the command) and 1 for the
others (the checkpoint, the disk or the environment failed).
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
    "MissingStateError",
    "NoCheckpointError",
    "RestoreError",
    "StateMismatchError",
    "UnsupportedStateError",
    "UsageError",
    "WorldSizeError",
    "EventLoopError",
    "StorageAccessError",
]


class AiockptError(Exception):
    """Base of every error aiockpt raises on purpose. ``hint``: what to do, when the message
    alone does not say it."""

    def __init__(self, *args: object, hint: str | None = None) -> None:
        """Make the error.

        Args:
            args: the message (and whatever else ``Exception`` takes).
            hint: what to do, when the message alone does not say it.
        """
        super().__init__(*args)
        self.hint = hint


class ConfigError(AiockptError, ValueError):
    """A configuration key is unknown, has the wrong type, or is out of range."""


class UsageError(AiockptError, ValueError, TypeError):
    """An argument cannot be used as given: a path that does not exist or is the wrong kind
    of thing, an option out of range, an output that exists already, a reserved or doubled
    name, an object that is not Stateful. Fix the call. (A ``ValueError`` and a
    ``TypeError`` too, so code that caught either before keeps working.)"""


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


class MissingStateError(RestoreError, KeyError):
    """A checkpoint holds no state under a requested top-level name.

    Raised alike by ``restore()`` (a keyword name the checkpoint lacks) and ``aiockpt.load``
    (a missing entry of ``keys``). It is also a ``KeyError``, which ``load`` raised before
    and which a dict lookup of the same name would raise.
    """

    def __str__(self) -> str:
        # KeyError quotes its message as a key; this one is a sentence.
        return Exception.__str__(self)


class StateMismatchError(RestoreError, RuntimeError):
    """A strict restore found saved keys that differ from the live objects' (a module's
    missing or unexpected keys, an optimizer's parameter groups); nothing was loaded.

    It is also a ``RuntimeError``, which torch's ``load_state_dict`` raises for the same.
    """


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
        """Make the error.

        Args:
            message: what was refused, and why.
            hint: what to do instead.
        """
        super().__init__(message, hint=hint)


class EventLoopError(AiockptError, RuntimeError):
    """A call from a thread or event loop that this checkpointer cannot serve from."""


class StorageAccessError(AiockptError):
    """The storage refused a request: wrong or expired credentials, a bucket that does not
    exist, or no permission on it. Nothing was committed or deleted by the failed request;
    fix the access and try again."""
