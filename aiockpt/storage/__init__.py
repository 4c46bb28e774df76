"""Where checkpoints live: the storage seam (``base``) and its backends.

``open_storage`` is the one place a configured location becomes a backend. Each scheme
of ``aiockpt._util.location.SERVED_SCHEMES`` has its backend here; today that is the
local filesystem (plain paths and ``file://`` URLs).
"""

from __future__ import annotations

import os

from .._util.location import local_directory
from .base import CheckpointInfo, CheckpointStorage
from .local import CheckpointStore

__all__ = ["CheckpointInfo", "CheckpointStorage", "open_storage"]


def open_storage(
    location: str | os.PathLike[str], *, durable: bool, lead: bool = True
) -> CheckpointStorage:
    """The backend serving ``location`` (not opened yet: ``open`` takes the lock).

    A URL of a scheme no backend serves is a ConfigError naming it and the served ones.
    """
    # Every served scheme is local so far: local_directory() maps a file:// URL to its
    # path and refuses every other scheme. A new backend is dispatched on url_scheme().
    return CheckpointStore(local_directory(location), durable=durable, lead=lead)
