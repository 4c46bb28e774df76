"""Where checkpoints live: the storage seam (``base``) and its backends.

``open_storage`` is the one place a configured location becomes a backend. Each scheme
of ``aiockpt._util.location.SERVED_SCHEMES`` has its backend here: the local filesystem
(plain paths and ``file://`` URLs, ``local``) and object stores (``s3://``,
``objectstore``, loaded only when used, since its client is an optional extra).
"""

from __future__ import annotations

import os

from .._util.location import ObjectPath, storage_location
from .base import CheckpointInfo, CheckpointStorage
from .local import CheckpointStore
from .local import list_checkpoints as _list_local

__all__ = ["CheckpointInfo", "CheckpointStorage", "list_checkpoints", "open_storage"]


def open_storage(
    location: str | os.PathLike[str], *, durable: bool, lead: bool = True
) -> CheckpointStorage:
    """The backend serving ``location`` (not opened yet: ``open`` takes the lock).

    A URL of a scheme no backend serves is a ConfigError naming it and the served ones.
    """
    place = storage_location(location)
    if isinstance(place, ObjectPath):
        from .objectstore import ObjectStoreStorage

        return ObjectStoreStorage(place, durable=durable, lead=lead)
    return CheckpointStore(place, durable=durable, lead=lead)


def list_checkpoints(directory: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Committed checkpoints under ``directory``, oldest first (newest last).

    A checkpoint counts as committed when its manifest exists (a local ``step-<N>``
    directory holding one, or an object store's ``step-<N>/manifest.json``); its checksums
    are checked only when it is loaded (or by ``aiockpt verify``).

    Args:
        directory: the checkpoint directory (the Config's ``directory``): a path, a
            ``file://`` URL or an ``s3://bucket/prefix`` URL.

    Returns:
        The committed checkpoints, oldest first; empty when there are none.

    Raises:
        ConfigError: ``directory`` is a file, or a URL of a scheme no backend serves.
        StorageAccessError: the object store refused the credentials, or the bucket does
            not exist.
    """
    place = storage_location(directory)
    if isinstance(place, ObjectPath):
        return open_storage(place, durable=False).list_committed()
    return _list_local(place)
