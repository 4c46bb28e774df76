"""Where the shared-memory tier lives when its directory is not configured.

The location is derived from the primary location alone, so that a process restarted
after a crash (same configuration, same working directory or the same absolute path)
finds the checkpoints its predecessor left in memory, and ``aiockpt ls``/``prune`` find
them from the primary directory too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .location import url_scheme

__all__ = ["SHM_ROOT", "SHM_PREFIX", "derived_memory_directory"]

# Linux mounts a tmpfs here for POSIX shared memory: pages in RAM, gone at reboot.
SHM_ROOT = Path("/dev/shm")
SHM_PREFIX = "aiockpt-"


def _identity(primary: str | os.PathLike[str]) -> str:
    """One spelling per primary location: a URL as written, a path made absolute with
    its symlinks resolved (``ckpt``, ``./ckpt`` and ``/abs/ckpt`` are one run)."""
    if url_scheme(primary) is not None:
        return str(primary)
    return os.path.realpath(os.fspath(primary))


def derived_memory_directory(
    primary: str | os.PathLike[str], root: str | os.PathLike[str] = SHM_ROOT
) -> Path:
    """``/dev/shm/aiockpt-<12 hex of the primary's identity>``.

    Args:
        primary: the primary location (the Config's ``directory``), a path or a URL.
        root: the tmpfs to put it under.

    Returns:
        The memory tier's directory (not created).
    """
    digest = hashlib.sha256(_identity(primary).encode("utf-8", "surrogateescape"))
    return Path(root) / f"{SHM_PREFIX}{digest.hexdigest()[:12]}"
