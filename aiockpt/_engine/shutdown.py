"""Checkpointers still open when the interpreter exits, or when the process forks.

The monitor thread is a daemon and would die mid-write at exit, leaving a temporary
directory for the next run to delete. The hook here runs at the start of interpreter
shutdown, before concurrent.futures stops accepting work (it registers the same way,
earlier, and these hooks run last-registered first), so in-flight checkpoints finish.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import Protocol

__all__ = ["Finishing", "forget", "track"]

logger = logging.getLogger(__name__)


class Finishing(Protocol):
    """What is finished at exit: its checkpoints in flight committed, then closed."""

    def finish_at_exit(self) -> None: ...


_open: weakref.WeakSet[Finishing] = weakref.WeakSet()


def track(owner: Finishing) -> None:
    _open.add(owner)


def forget(owner: Finishing) -> None:
    _open.discard(owner)


def _finish_at_exit() -> None:
    for owner in list(_open):
        try:
            owner.finish_at_exit()
        except Exception:  # exiting anyway; the next open cleans up
            logger.exception("could not finish checkpoints at exit")


# The hook concurrent.futures itself uses to run before executors shut down; plain atexit
# would run after, when the writer threads no longer take work.
_register_shutdown_hook = getattr(threading, "_register_atexit", atexit.register)
_register_shutdown_hook(_finish_at_exit)
# A forked child (a DataLoader worker) has none of the parent's threads: it must not try to
# drain the parent's checkpoints at its exit.
os.register_at_fork(after_in_child=_open.clear)
