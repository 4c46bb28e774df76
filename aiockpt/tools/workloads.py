"""What ``aiockpt bench`` trains: a built-in GPT preset, or the user's own model.

A user model is named ``--model package.module:function`` (the current directory is
importable). The function takes the ``torch.device`` to train on and returns
``(model, optimizer, step_fn)``, ``(model, optimizer, step_fn, samples_per_step)`` or a
:class:`Workload`:

- ``model``: a ``torch.nn.Module`` on that device;
- ``optimizer``: its optimizer (anything with ``state_dict()``/``load_state_dict()``);
- ``step_fn()``: one whole training step (forward, backward, ``optimizer.step()``,
  ``zero_grad()``), its batch already on the device; the bench synchronises the device
  after it, as a loop that logs its loss does;
- ``samples_per_step``: samples one step trains on, for samples/s (default 1).

The checkpointed state is ``{"model": model, "optimizer": optimizer}`` for every system.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._util.console import CliError
from .bench_memory import tensor_bytes
from .presets import DEFAULT_INTERVAL, DEFAULT_ROUNDS, DEFAULT_STEPS, PRESETS, Preset

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_ROUNDS",
    "DEFAULT_STEPS",
    "PRESETS",
    "Preset",
    "Workload",
    "add_lora",
    "build_model",
    "build_preset",
    "load_workload",
    "make_step",
    "preset_parameters",
    "preset_workload",
    "sync",
]


class TinyGPT(nn.Module):
    """A decoder-only transformer built from torch's own layers (tied embeddings)."""

    def __init__(self, p: Preset) -> None:
        super().__init__()
        self.embed = nn.Embedding(p.vocab, p.d_model)
        self.position = nn.Parameter(torch.zeros(p.seq, p.d_model))
        layer = nn.TransformerEncoderLayer(
            p.d_model, p.heads, 4 * p.d_model, dropout=0.1, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, p.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(p.d_model)
        self.head = nn.Linear(p.d_model, p.vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def preset_parameters(name: str) -> int:
    """Parameter count of a preset, without allocating its weights (meta tensors)."""
    with torch.device("meta"):
        model = TinyGPT(PRESETS[name])
    return sum(p.numel() for p in model.parameters())


def build_preset(
    name: str, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, Preset]:
    return build_model(PRESETS[name], device)


def build_model(
    preset: Preset, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, Preset]:
    """The model of ``preset`` on ``device`` and AdamW on what it trains."""
    # Initialised on the device itself: building 1.3B parameters on the CPU first and
    # copying them over takes longer than the rest of the setup.
    with device:
        model = TinyGPT(preset)
        trained = (
            list(model.parameters())
            if preset.lora_rank is None
            else add_lora(model, preset.lora_rank)
        )
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    return model, optimizer, preset


class LowRankDelta(nn.Module):
    """``weight + up @ down``: a low-rank adapter on a frozen weight (a parametrization,
    so the fused attention projection of nn.MultiheadAttention is adapted as it is)."""

    def __init__(self, weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.down = nn.Parameter(torch.randn(rank, in_features, dtype=weight.dtype) / rank)
        # Zero at first: the adapted model starts as the frozen one.
        self.up = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.up @ self.down


# The projections of nn.TransformerEncoderLayer: attention's fused query/key/value and its
# output, and the two of the MLP.
_ADAPTED = (
    "self_attn.in_proj_weight",
    "self_attn.out_proj.weight",
    "linear1.weight",
    "linear2.weight",
)


def add_lora(model: nn.Module, rank: int) -> list[nn.Parameter]:
    """Freeze ``model`` and adapt every attention and MLP projection of its blocks with
    rank-``rank`` adapters; the adapters' parameters (what to train)."""
    from torch.nn.utils import parametrize

    model.requires_grad_(False)
    trained: list[nn.Parameter] = []
    for block in model.modules():
        if not isinstance(block, nn.TransformerEncoderLayer):
            continue
        for path in _ADAPTED:
            owner_path, _, name = path.rpartition(".")
            owner = block.get_submodule(owner_path)
            delta = LowRankDelta(getattr(owner, name), rank)
            parametrize.register_parametrization(owner, name, delta)
            trained.extend(delta.parameters())
    return trained


def make_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, p: Preset, device: torch.device
) -> Callable[[], None]:
    tokens = torch.randint(0, p.vocab, (p.batch, p.seq + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            logits = model(tokens[:, :-1])
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), tokens[:, 1:].flatten()
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    """Wait for the training (current) stream only, as a loop's ``loss.item()`` does.

    A whole-device synchronize would also wait for the copies a checkpointer runs on its
    own streams and charge them to the step: exactly the overlap being measured.
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@dataclass
class Workload:
    """A model, its optimizer (None: a model alone) and one training step: what is
    checkpointed, and what runs between checkpoints."""

    model: nn.Module
    optimizer: Any
    step: Callable[[], object]
    samples_per_step: int = 1
    name: str = "custom"

    def state(self) -> dict[str, Any]:
        """The objects to checkpoint, under the keyword names the Checkpointer gets."""
        if self.optimizer is None:
            return {"model": self.model}
        return {"model": self.model, "optimizer": self.optimizer}

    @property
    def device(self) -> torch.device:
        """Where the model trains: the device of its first tensor (the CPU if it has none)."""
        for value in self.model.state_dict().values():
            if isinstance(value, torch.Tensor):
                return value.device
        return torch.device("cpu")

    def warm_up(self, steps: int) -> None:
        """Train ``steps`` steps, so that the optimizer state exists and kernels are warm."""
        for _ in range(steps):
            self.step()
        sync(self.device)

    def state_bytes(self) -> int:
        """Bytes of tensor state, each tensor once: tied weights appear under two names
        but are one tensor."""
        seen: dict[tuple[int, int], torch.Tensor] = {}
        for obj in self.state().values():
            _collect(obj.state_dict(), seen)
        return tensor_bytes(list(seen.values()))


def _collect(tree: Any, seen: dict[tuple[int, int], torch.Tensor]) -> None:
    if isinstance(tree, torch.Tensor):
        seen[(tree.data_ptr(), tree.numel() * tree.element_size())] = tree
    elif isinstance(tree, dict):
        for value in tree.values():
            _collect(value, seen)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _collect(value, seen)


def preset_workload(name: str, device: torch.device) -> Workload:
    """A preset model with AdamW, trained on random tokens."""
    model, optimizer, preset = build_preset(name, device)
    step = make_step(model, optimizer, preset, device)
    return Workload(model, optimizer, step, samples_per_step=preset.batch, name=name)


def _usage(message: str) -> CliError:
    return CliError(
        message,
        hint="--model takes package.module:function; the function gets the torch.device and "
        "returns (model, optimizer, step_fn[, samples_per_step]) (see `aiockpt bench --help`)",
        code=2,
    )


def load_workload(spec: str, device: torch.device) -> Workload:
    """Import ``package.module:function``, call it with ``device``, check what it returns."""
    module_name, colon, function_name = spec.partition(":")
    if not colon or not module_name or not function_name:
        raise _usage(f"--model {spec!r} is not of the form package.module:function")
    # `aiockpt bench` is a console script: unlike `python -m`, it does not put the current
    # directory on sys.path, yet that is where a user's own model module usually lives.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _usage(f"--model {spec!r}: cannot import {module_name!r}: {exc}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise _usage(f"--model {spec!r}: {module_name!r} has no function {function_name!r}")
    result = function(device)
    if isinstance(result, Workload):
        workload = result
    elif isinstance(result, tuple) and len(result) in (3, 4):
        workload = Workload(*result)
    else:
        raise _usage(
            f"--model {spec!r} returned {type(result).__name__}, not "
            "(model, optimizer, step_fn) or (model, optimizer, step_fn, samples_per_step)"
        )
    workload.name = spec
    _check(spec, workload)
    return workload


def _check(spec: str, w: Workload) -> None:
    if not isinstance(w.model, nn.Module):
        raise _usage(f"--model {spec!r}: model is a {type(w.model).__name__}, not an nn.Module")
    if not (hasattr(w.optimizer, "state_dict") and hasattr(w.optimizer, "load_state_dict")):
        raise _usage(
            f"--model {spec!r}: optimizer ({type(w.optimizer).__name__}) has no "
            "state_dict()/load_state_dict()"
        )
    if not callable(w.step):
        raise _usage(f"--model {spec!r}: step_fn ({type(w.step).__name__}) is not callable")
    if not isinstance(w.samples_per_step, int) or w.samples_per_step < 1:
        raise _usage(
            f"--model {spec!r}: samples_per_step = {w.samples_per_step!r}: expected a positive int"
        )
