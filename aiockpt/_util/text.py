"""Values named in error messages."""

from __future__ import annotations

__all__ = ["shown"]


def shown(value: object, *, limit: int, keep: int) -> str:
    """``repr(value)`` for a message, cut to its first ``keep`` characters when longer than
    ``limit``: a hostile name may be megabytes long, a mistyped number hundreds of digits."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:keep]}...({len(text)} characters)"
