"""What aiockpt needs from torch.distributed: who am I, and a side channel to agree on.

Ranks agree on a checkpoint (every rank's bytes durable -> one rank commits) through a
process group of their own, created with the gloo backend when the Checkpointer is built.
Its collectives run on aiockpt's own threads, so they never interleave with the
training's collectives on the NCCL group, and the training thread never waits for them.

The contract is the usual one for collective checkpointing (torch.distributed.checkpoint
has it too): every rank builds its Checkpointer at the same point and calls
``checkpoint()``, ``restore()`` and ``close()`` the same number of times, in the same order.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["RankGroup", "is_rank_zero", "world_size"]


def is_rank_zero() -> bool:
    """True unless a process group is up and this process is not its rank 0.

    Informational logs go to rank 0 only, so a run on many GPUs prints each line once.
    """
    dist = _dist_if_initialized()
    if dist is None:
        return True
    try:
        return dist.get_rank() == 0  # type: ignore[no-any-return]
    except Exception:  # a half-torn-down process group: logging must not crash training
        return True


def world_size() -> int:
    """The number of ranks of the running process group (1 without one)."""
    dist = _dist_if_initialized()
    return 1 if dist is None else int(dist.get_world_size())


def _dist_if_initialized() -> Any:
    # Look torch.distributed up without importing it: if nobody imported it, no process
    # group exists.
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            return None
    except Exception:
        return None
    return dist


@dataclass
class RankGroup:
    """This process's rank, the world size, and the gloo group the ranks agree through."""

    rank: int
    world_size: int
    group: Any
    token: str  # the same on every rank: names the shared temporary directories

    @classmethod
    def current(cls, timeout_seconds: float) -> RankGroup | None:
        """The group for a run of several ranks; None for one process (or one rank)."""
        dist = _dist_if_initialized()
        if dist is None or dist.get_world_size() == 1:
            return None
        # Every rank calls new_group at the same point (building its Checkpointer).
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))
        token = [secrets.token_hex(4) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
        return cls(dist.get_rank(group), dist.get_world_size(group), group, str(token[0]))

    def sibling(self, timeout_seconds: float) -> RankGroup:
        """Another gloo group over the same ranks, for collectives on another thread.

        A collective call: every rank calls it at the same point. Collectives of one group
        must come in the same order on every rank, which two threads sharing a group
        cannot promise.
        """
        import torch.distributed as dist

        group = dist.new_group(
            ranks=dist.get_process_group_ranks(self.group),
            backend="gloo",
            timeout=timedelta(seconds=timeout_seconds),
        )
        return RankGroup(self.rank, self.world_size, group, self.token)

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (blocking: call it off the training thread
        except where every rank waits anyway, as in restore)."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (as many on every rank), in rank order.

        One collective of a small tensor: a few numbers cost a quarter of the time and a
        third of the CPU that ``all_gather``'s pickling and second collective take.
        """
        import torch
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine, group=self.group)
        return [row.tolist() for row in rows]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        import torch.distributed as dist

        box = [value if self.is_zero else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def destroy(self) -> None:
        import torch.distributed as dist

        # The default group may already be gone at shutdown.
        with contextlib.suppress(Exception):
            dist.destroy_process_group(self.group)
