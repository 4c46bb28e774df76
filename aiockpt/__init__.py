"""aiockpt: asynchronous, crash-safe checkpoints for PyTorch training.

``checkpoint()`` returns once the state is captured (milliseconds); an asyncio event loop
moves it GPU -> pinned host memory -> files in the background and commits it atomically.
"""

from ._version import __version__
from .checkpointer import Checkpointer, CheckpointHandle, SyncCheckpointer, SyncCheckpointHandle
from .config import Config
from .errors import (
    AiockptError,
    BackgroundError,
    CheckpointError,
    CheckpointInProgressError,
    ConfigError,
    CorruptCheckpointError,
    DirectoryLockedError,
    NoCheckpointError,
    RestoreError,
    UnsupportedStateError,
)
from .metrics import CheckpointMetrics
from .reader import load
from .stateful import RNGState, Stateful
from .store import CheckpointInfo, list_checkpoints

__all__ = [
    "AiockptError",
    "BackgroundError",
    "CheckpointError",
    "CheckpointHandle",
    "CheckpointInProgressError",
    "CheckpointInfo",
    "CheckpointMetrics",
    "Checkpointer",
    "Config",
    "ConfigError",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "NoCheckpointError",
    "RNGState",
    "RestoreError",
    "Stateful",
    "SyncCheckpointHandle",
    "SyncCheckpointer",
    "UnsupportedStateError",
    "__version__",
    "list_checkpoints",
    "load",
]
