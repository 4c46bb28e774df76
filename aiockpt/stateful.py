"""The Stateful protocol and the random-number state that exact resume needs."""

from __future__ import annotations

import random
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["RNGState", "Stateful"]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: modules, optimizers,
    schedulers, GradScaler, samplers, and your own objects."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


def _numpy_random() -> Any | None:
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random


class RNGState:
    """Every global random generator that training draws from, as one Stateful.

    Covers torch's CPU generator, the generator of every visible CUDA device, numpy's
    legacy global generator (when numpy is installed) and Python's ``random``. Pass it to
    a Checkpointer as ``rng=aiockpt.RNGState()`` so dropout masks and data shuffles
    continue exactly where they were after a restore.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        np_random = _numpy_random()
        if np_random is not None:
            state["numpy"] = np_random.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"].cpu())
        random.setstate(_as_tuples(state_dict["python"]))
        cuda_states = state_dict.get("cuda")
        if cuda_states is not None and torch.cuda.is_available():
            count = min(len(cuda_states), torch.cuda.device_count())
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states[:count]])
        np_random = _numpy_random()
        if np_random is not None and "numpy" in state_dict:
            np_random.set_state(state_dict["numpy"])


def _as_tuples(value: Any) -> Any:
    # random.setstate insists on tuples all the way down.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
