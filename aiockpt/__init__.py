"""aiockpt: asynchronous, crash-safe checkpoints for PyTorch training.

``checkpoint()`` returns once the state is captured (milliseconds); an asyncio event loop
moves it GPU -> pinned host memory -> files in the background and commits it atomically.
"""

from ._version import __version__
from .checkpointer import Checkpointer, CheckpointHandle, SyncCheckpointer, SyncCheckpointHandle
from .config import Config
from .data import ResumableSampler
from .errors import (
    AiockptError,
    BackgroundError,
    CheckpointError,
    CheckpointInProgressError,
    ConfigError,
    CorruptCheckpointError,
    DirectoryLockedError,
    EventLoopError,
    NoCheckpointError,
    RestoreError,
    UnsupportedStateError,
    UsageError,
    WorldSizeError,
)
from .metrics import CheckpointMetrics
from .policy import (
    AdaptiveOverhead,
    AnyOf,
    BasePolicy,
    EveryNSeconds,
    EveryNSteps,
    IntervalPolicy,
    Never,
    policy_from_config,
)
from .reader import load
from .sharding import Replicated
from .stateful import RNGState, Stateful
from .store import CheckpointInfo, list_checkpoints
from .trainer import SyncTrainer, Trainer

__all__ = [
    "AdaptiveOverhead",
    "AiockptError",
    "AnyOf",
    "BackgroundError",
    "BasePolicy",
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
    "EventLoopError",
    "EveryNSeconds",
    "EveryNSteps",
    "IntervalPolicy",
    "Never",
    "NoCheckpointError",
    "RNGState",
    "Replicated",
    "RestoreError",
    "ResumableSampler",
    "Stateful",
    "SyncCheckpointHandle",
    "SyncCheckpointer",
    "SyncTrainer",
    "Trainer",
    "UnsupportedStateError",
    "UsageError",
    "WorldSizeError",
    "__version__",
    "list_checkpoints",
    "load",
    "policy_from_config",
]
