"""Capture's first half: state_dicts to a tensor table and a JSON skeleton.

``flatten.encode_state`` walks a whole state; ``replay.FlattenCache`` replays the structure
it learnt from the last one, which is the usual case and a fraction of the time. This
module joins the two, so neither imports the other's entry point.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .flatten import FlatState, check_state_name, encode_state
from .replay import FlattenCache

__all__ = ["FlatState", "FlattenCache", "check_state_name", "encode_state", "flatten_state"]


def flatten_state(state: Mapping[str, Any], plans: FlattenCache | None = None) -> FlatState:
    """Flatten ``{name: state_dict}`` into tensors, names and a JSON skeleton.

    With ``plans``, a state of the same structure as the last one is flattened by replaying
    that structure (see ``replay``), which gives the same result in a fraction of the time.
    """
    if plans is not None:
        replayed = plans.replay(state)
        if replayed is not None:
            return replayed
    flat = encode_state(state)
    return flat if plans is None else plans.learn(state, flat)
