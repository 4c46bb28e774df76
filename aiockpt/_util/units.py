"""Quantities written for people: byte counts in human units.

Two conventions, each where it belongs: sizes of files and memory in binary units
(KiB, MiB: what ``ls -h`` and ``free`` show), and sizes next to transfer rates in
decimal units (kB, MB, GB), so that "4.46 GB at 2.4 GB/s" divides as read.
"""

from __future__ import annotations

__all__ = ["human_bytes"]

_BINARY = ("B", "KiB", "MiB", "GiB", "TiB")
_DECIMAL = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def human_bytes(nbytes: float, *, decimal: bool = False) -> str:
    """``nbytes`` as "1.5 MiB" (binary, one decimal) or "1.57 MB" (``decimal``, three
    significant digits)."""
    if decimal:
        for unit, scale in _DECIMAL:
            if abs(nbytes) >= scale:
                return f"{nbytes / scale:.3g} {unit}"
        return f"{nbytes:.0f} B"
    value = float(nbytes)
    for unit in _BINARY:
        if abs(value) < 1024 or unit == _BINARY[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
