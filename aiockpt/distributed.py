"""What aiockpt needs to know about torch.distributed (one process per rank for now)."""

from __future__ import annotations

import sys

__all__ = ["is_rank_zero"]


def is_rank_zero() -> bool:
    """True unless a process group is up and this process is not its rank 0.

    Informational logs go to rank 0 only, so a run on many GPUs prints each line once.
    """
    # Look torch.distributed up without importing it: if nobody imported it, no process
    # group exists.
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return True
    try:
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except Exception:  # a half-torn-down process group: logging must not crash training
        return True
