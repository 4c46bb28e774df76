"""The one way a checkpoint directory's lock file is locked: flock, never waiting.

A writer holds ``LOCK_EX`` on ``.aiockpt.lock`` for its whole life (the kernel drops it
when the process dies, however it dies); a probe for a live writer tries ``LOCK_SH`` and
drops it at once. Both must tell "someone else holds it" from a real failure (a file
system without flock, a bad descriptor), which is raised.
"""

from __future__ import annotations

import errno
import fcntl

__all__ = ["try_lock", "unlock"]

# What flock with LOCK_NB reports for a lock that someone else holds (EACCES on some
# systems, EWOULDBLOCK on Linux).
_HELD_ELSEWHERE = frozenset({errno.EWOULDBLOCK, errno.EACCES})


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take the lock on ``fd`` at once (shared, or exclusive); False if another holds it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in _HELD_ELSEWHERE:
            raise
        return False
    return True


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
