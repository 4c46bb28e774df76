"""Where checkpoints live: a plain path, or a URL whose scheme a storage backend serves.

This is the one table of served schemes. It sits below the config so that a bad
``directory`` fails when the Config is built, not when the first checkpoint is written;
``aiockpt.storage.open_storage`` picks the backend for each scheme listed here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError

__all__ = ["SERVED_SCHEMES", "local_directory", "url_scheme"]

# scheme -> how a location of it is written. Plain paths are served too (the local
# filesystem); a scheme joins this table together with the backend that serves it.
SERVED_SCHEMES: dict[str, str] = {"file": "file:///absolute/path"}

# "<scheme>://": a single colon is an ordinary file name character on POSIX ("s3:/x" is a
# relative path), so only the double slash marks a URL.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(location: str | os.PathLike[str]) -> str | None:
    """The lower-cased scheme of a ``<scheme>://...`` location; None for a plain path."""
    if not isinstance(location, str):
        return None  # a Path object has already folded "//" into "/": never a URL
    match = _URL.match(location)
    return match.group(1).lower() if match else None


def _served() -> str:
    return ", ".join(f"{scheme}:// ({form})" for scheme, form in SERVED_SCHEMES.items())


def local_directory(location: str | os.PathLike[str]) -> Path:
    """The local directory that ``location`` names (a path, or a ``file://`` URL).

    A URL of any other scheme is a ConfigError that names the scheme and the ones served,
    instead of becoming a local folder called ``s3:`` that the user believes is a bucket.
    """
    scheme = url_scheme(location)
    if scheme is None:
        return Path(location)
    text = str(location)
    if scheme not in SERVED_SCHEMES:
        raise ConfigError(
            f"directory {text!r}: no storage backend serves {scheme}:// URLs; served are "
            f"plain paths and {_served()}; give a local directory instead"
        )
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise ConfigError(
            f"directory {text!r}: a file:// URL names a local path, written "
            f"{SERVED_SCHEMES['file']} (no host, query or fragment)"
        )
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ConfigError(f"directory {text!r}: write it as {SERVED_SCHEMES['file']}")
    return Path(path)
