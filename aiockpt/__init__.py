"""aiockpt: asynchronous, crash-safe checkpoints for PyTorch training.

``checkpoint()`` returns once the state is captured (milliseconds); an asyncio event loop
moves it GPU -> pinned host memory -> files in the background and commits it atomically.
"""

from ._engine.reader import load
from ._version import __version__
from .checkpointer import Checkpointer, CheckpointHandle, SyncCheckpointer, SyncCheckpointHandle
from .config import Config, MemoryTier, RemoteTier
from .distributed.sharding import Replicated
from .errors import (
    AiockptError,
    BackgroundError,
    CheckpointError,
    CheckpointInProgressError,
    ConfigError,
    ConversionError,
    CorruptCheckpointError,
    DirectoryLockedError,
    EventLoopError,
    MissingStateError,
    NoCheckpointError,
    RestoreError,
    StateMismatchError,
    StorageAccessError,
    UnsupportedStateError,
    UsageError,
    WorldSizeError,
)
from .metrics import CheckpointMetrics, ChunkSpan, LayoutSummary, StagingSummary, TierStats
from .paths import AsyncSaveHandle, PathSaver, SaveHandle, close_saves, save, save_async
from .stateful import RNGState, Stateful
from .storage import CheckpointInfo, list_checkpoints
from .training.policy import (
    AdaptiveOverhead,
    AnyOf,
    BasePolicy,
    EveryNSeconds,
    EveryNSteps,
    IntervalPolicy,
    Never,
    policy_from_config,
)
from .training.sampler import ResumableSampler
from .training.trainer import SyncTrainer, Trainer

__all__ = [
    "AdaptiveOverhead",
    "AiockptError",
    "AnyOf",
    "AsyncSaveHandle",
    "BackgroundError",
    "BasePolicy",
    "CheckpointError",
    "CheckpointHandle",
    "CheckpointInProgressError",
    "CheckpointInfo",
    "CheckpointMetrics",
    "Checkpointer",
    "ChunkSpan",
    "Config",
    "ConfigError",
    "ConversionError",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "EventLoopError",
    "EveryNSeconds",
    "EveryNSteps",
    "IntervalPolicy",
    "MissingStateError",
    "LayoutSummary",
    "MemoryTier",
    "Never",
    "NoCheckpointError",
    "PathSaver",
    "RNGState",
    "RemoteTier",
    "Replicated",
    "RestoreError",
    "StorageAccessError",
    "ResumableSampler",
    "SaveHandle",
    "StagingSummary",
    "StateMismatchError",
    "Stateful",
    "SyncCheckpointHandle",
    "SyncCheckpointer",
    "SyncTrainer",
    "TierStats",
    "Trainer",
    "UnsupportedStateError",
    "UsageError",
    "WorldSizeError",
    "__version__",
    "close_saves",
    "list_checkpoints",
    "load",
    "policy_from_config",
    "save",
    "save_async",
]
