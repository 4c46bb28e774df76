"""aiockpt: asynchronous, crash-safe checkpoints for PyTorch training.

``checkpoint()`` returns once the state is captured (milliseconds); an asyncio event loop
moves it GPU -> pinned host memory -> files in the background and commits it atomically.
"""

from ._engine.reader import load
from ._version import __version__
from .checkpointer import Checkpointer, CheckpointHandle, SyncCheckpointer, SyncCheckpointHandle
from .config import Config
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
    UnsupportedStateError,
    UsageError,
    WorldSizeError,
)
from .metrics import CheckpointMetrics, ChunkSpan, LayoutSummary, StagingSummary
from .paths import AsyncSaveHandle, PathSaver, SaveHandle, close_saves, save, save_async
from .stateful import RNGState, Stateful
from .storage.local import CheckpointInfo, list_checkpoints
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
    "Never",
    "NoCheckpointError",
    "PathSaver",
    "RNGState",
    "Replicated",
    "RestoreError",
    "ResumableSampler",
    "SaveHandle",
    "StagingSummary",
    "Stateful",
    "SyncCheckpointHandle",
    "SyncCheckpointer",
    "SyncTrainer",
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
