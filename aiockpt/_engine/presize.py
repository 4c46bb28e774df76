"""How big the state will be, guessed when the Checkpointer is built, to size the pool early.

The host pool takes seconds to map and pin, so it is started when the Checkpointer is made,
overlapping the user's own setup, instead of on the first ``checkpoint()``. The objects are
known then, but not always their final state: an optimizer such as Adam creates its state
on its first step. So the guess is the modules' tensors plus, for an optimizer with no
state yet, what its kind will create per parameter. The first checkpoint lays the real
state out and keeps every buffer of the guess that fits it: chunks are full, so all but
the last chunk of each device have the configured size whatever the guess missed.

Only modules and optimizers are looked at: other objects' ``state_dict()`` may have side
effects or be expensive, and their state (RNG, counters) is small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .layout import ALIGNMENT

__all__ = ["estimate_chunk_sizes", "estimate_device_bytes"]

# Tensors the size of its parameter that an optimizer of this kind creates per parameter
# on its first step (torch.optim's own, by class name; others are not guessed).
_STATE_PER_PARAMETER = {
    "Adam": 2,
    "AdamW": 2,
    "Adamax": 2,
    "NAdam": 2,
    "RAdam": 2,
    "RMSprop": 1,
}


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def _predicted_optimizer_state(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, int]]:
    """(device type, bytes) of the state ``optimizer`` will create on its first step."""
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        per_parameter = _STATE_PER_PARAMETER.get(name, 0)
        if name == "SGD" and group.get("momentum", 0):
            per_parameter = 1
        if group.get("amsgrad"):
            per_parameter += 1
        if name == "RMSprop":
            per_parameter += bool(group.get("momentum")) + bool(group.get("centered"))
        on_device = bool(group.get("capturable") or group.get("fused"))
        for parameter in group["params"]:
            if not isinstance(parameter, torch.Tensor) or not per_parameter:
                continue
            nbytes = parameter.numel() * parameter.element_size()
            yield str(parameter.device), per_parameter * _aligned(nbytes)
            if name in _STATE_PER_PARAMETER:
                # The step counter: a 0-d float32 tensor, on the CPU unless capturable.
                yield (str(parameter.device) if on_device else "cpu"), ALIGNMENT


def estimate_device_bytes(objects: Mapping[str, object]) -> dict[str, int]:
    """Aligned bytes of tensor state per device (by name) that ``objects`` will hold."""
    found: dict[str, int] = {}

    def add(device: str, nbytes: int) -> None:
        found[device] = found.get(device, 0) + nbytes

    for obj in objects.values():
        if isinstance(obj, torch.nn.Module):
            for tensor in _tensors(obj.state_dict()):
                add(str(tensor.device), _aligned(tensor.numel() * tensor.element_size()))
        elif isinstance(obj, torch.optim.Optimizer):
            if obj.state:
                for tensor in _tensors(obj.state_dict()["state"]):
                    add(str(tensor.device), _aligned(tensor.numel() * tensor.element_size()))
            else:
                for device, nbytes in _predicted_optimizer_state(obj):
                    add(device, nbytes)
    return found


def estimate_chunk_sizes(
    objects: Mapping[str, object], chunk_bytes: Callable[[int], int]
) -> dict[str, list[int]]:
    """The chunk sizes the state of ``objects`` will probably be cut into, per device.

    ``chunk_bytes(total)`` is the configured chunk size for a state of ``total`` bytes.
    """
    per_device = estimate_device_bytes(objects)
    size = chunk_bytes(sum(per_device.values()))
    chunks: dict[str, list[int]] = {}
    for device, total in per_device.items():
        full, rest = divmod(total, size)
        chunks[device] = [size] * full + ([rest] if rest else [])
    return chunks
