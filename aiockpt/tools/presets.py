"""The built-in models of ``aiockpt bench`` and ``aiockpt diagnose``, by name.

Only their shapes and run defaults: no torch here, so that the command line can offer
the names (``--preset``) without importing torch; :mod:`aiockpt.tools.workloads` builds
the models.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_INTERVAL", "DEFAULT_ROUNDS", "DEFAULT_STEPS", "PRESETS", "Preset"]

# Run defaults of a preset, and of a --model: 4 checkpoints a round, 3 rounds.
DEFAULT_STEPS = 200
DEFAULT_INTERVAL = 50
DEFAULT_ROUNDS = 3


@dataclass(frozen=True)
class Preset:
    d_model: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int
    # Run defaults sized so that the whole bench of this preset, with every system, fits
    # in a few minutes on one H100/H200 (the 1.3B state takes ~10 s to persist at 2 GB/s,
    # so it checkpoints less often).
    steps: int = DEFAULT_STEPS
    checkpoint_interval: int = DEFAULT_INTERVAL
    rounds: int = DEFAULT_ROUNDS
    # Fine-tuning with low-rank adapters: the model is frozen, and every attention and MLP
    # projection gets adapters of this rank, the only parameters AdamW trains.
    lora_rank: int | None = None


PRESETS = {
    "tiny": Preset(
        d_model=64, layers=2, heads=4, vocab=512, seq=32, batch=4,
        steps=20, checkpoint_interval=5, rounds=2,
    ),
    "350m": Preset(d_model=1024, layers=24, heads=16, vocab=50304, seq=512, batch=8),
    "1.3b": Preset(
        d_model=2048, layers=24, heads=16, vocab=50304, seq=512, batch=4,
        steps=100, checkpoint_interval=100, rounds=2,
    ),
    # The 1.3b model frozen, rank-16 adapters: what incremental checkpoints are for (after
    # the first, a checkpoint writes the adapters and their optimizer state, not ~5 GB).
    "lora": Preset(
        d_model=2048, layers=24, heads=16, vocab=50304, seq=512, batch=4,
        steps=100, checkpoint_interval=25, rounds=2, lora_rank=16,
    ),
}  # fmt: skip
