"""Which layer each saved tensor belongs to, so chunks and partial restores follow layers.

A module's tensors belong to the module that owns them (``blocks.3.attn.weight`` ->
``blocks.3.attn``). An optimizer's per-parameter state (``state/5/exp_avg``) belongs to the
layer of parameter 5, found through the modules saved beside it. The layer is recorded as
``<key>/<module path>`` with the key of the module's checkpoint entry, e.g.
``model/blocks.3.attn``, so one name serves the parameters and their optimizer state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["layer_matcher", "tensor_layers"]

_OPTIMIZER_STATE = re.compile(r"(?P<key>[^/]+)/state/(?P<index>\d+)/")


def _module_layers(objects: Mapping[str, Any]) -> tuple[dict[str, str], dict[int, str]]:
    """(state name -> layer) for module tensors, and (id(parameter) -> layer)."""
    by_name: dict[str, str] = {}
    by_parameter: dict[int, str] = {}
    for key, obj in objects.items():
        if not isinstance(obj, torch.nn.Module):
            continue
        for module_name, module in obj.named_modules():
            layer = f"{key}/{module_name}" if module_name else key
            prefix = f"{key}/{module_name}." if module_name else f"{key}/"
            for name, parameter in module.named_parameters(recurse=False):
                by_name[prefix + name] = layer
                by_parameter.setdefault(id(parameter), layer)
            for name, _ in module.named_buffers(recurse=False):
                by_name[prefix + name] = layer
    return by_name, by_parameter


def _optimizer_layers(
    objects: Mapping[str, Any], by_parameter: dict[int, str]
) -> dict[tuple[str, int], str]:
    """(optimizer key, parameter index in its state_dict) -> layer."""
    found: dict[tuple[str, int], str] = {}
    for key, obj in objects.items():
        if not isinstance(obj, torch.optim.Optimizer):
            continue
        # state_dict() numbers parameters in param_groups order.
        index = 0
        for group in obj.param_groups:
            for parameter in group["params"]:
                layer = by_parameter.get(id(parameter))
                if layer is not None:
                    found[(key, index)] = layer
                index += 1
    return found


def tensor_layers(objects: Mapping[str, Any], names: list[str]) -> list[str | None]:
    """The layer of each tensor name from flattening ``objects``' state_dicts (or None)."""
    by_name, by_parameter = _module_layers(objects)
    optimizer = _optimizer_layers(objects, by_parameter)
    layers: list[str | None] = []
    for name in names:
        layer = by_name.get(name)
        if layer is None:
            match = _OPTIMIZER_STATE.match(name)
            if match:
                layer = optimizer.get((match["key"], int(match["index"])))
        layers.append(layer)
    return layers


def layer_matcher(pattern: str | None):  # type: ignore[no-untyped-def]
    """A predicate on layer names: a regular expression searched in the layer name."""
    if pattern is None:
        return lambda layer: True
    compiled = re.compile(pattern)
    return lambda layer: layer is not None and compiled.search(layer) is not None
