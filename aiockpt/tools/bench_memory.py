"""Memory probes for ``aiockpt bench``: host RSS and its peak, pinned and GPU memory.

The peak of the resident set is the kernel's high-water mark (VmHWM), which Linux resets
to the current RSS when "5" is written to /proc/self/clear_refs. Elsewhere (or where
/proc is read-only) the probes answer None and the report says "not measured".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["MemoryMark", "cuda_allocated", "pinned_allocated", "tensor_bytes"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def pinned_allocated() -> int | None:
    """Bytes held by torch's pinned host allocator (None without CUDA or the statistic)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_available():
        return None
    value = stats().get("allocated_bytes.current")
    return int(value) if value is not None else None


def cuda_allocated() -> int | None:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def tensor_bytes(tree: Any, *, pinned_only: bool = False) -> int:
    """Bytes of the tensors in a nested dict/list (pinned ones only, if asked)."""
    if isinstance(tree, torch.Tensor):
        if pinned_only and not (tree.device.type == "cpu" and tree.is_pinned()):
            return 0
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v, pinned_only=pinned_only) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v, pinned_only=pinned_only) for v in tree)
    return 0


@dataclass
class MemoryMark:
    """Host, pinned and GPU memory at one moment; ``since`` measures what came after.

    Taking a mark resets the RSS high-water mark, so the peak read later belongs to the
    work done in between.
    """

    rss: int | None
    pinned: int | None
    gpu: int | None
    peak_reset: bool

    @classmethod
    def take(cls) -> MemoryMark:
        reset = _reset_peak()
        return cls(_status_bytes("VmRSS"), pinned_allocated(), cuda_allocated(), reset)

    def since(self) -> dict[str, int | None]:
        """Growth since this mark: held now, and the RSS peak above the mark."""
        now = MemoryMark(_status_bytes("VmRSS"), pinned_allocated(), cuda_allocated(), False)
        peak = _status_bytes("VmHWM") if self.peak_reset else None
        return {
            "rss_held": _minus(now.rss, self.rss),
            "rss_peak_growth": _minus(peak, self.rss),
            "rss_peak": peak,
            "pinned_held": _minus(now.pinned, self.pinned),
            "gpu_held": _minus(now.gpu, self.gpu),
        }


def _minus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b
