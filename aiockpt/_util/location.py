"""Where checkpoints live: a plain path, or a URL whose scheme a storage backend serves.

This is the one table of served schemes. It sits below the config so that a bad
``directory`` fails when the Config is built, not when the first checkpoint is written;
``aiockpt.storage.open_storage`` picks the backend for each scheme listed here.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError

__all__ = [
    "OBJECT_STORE_EXTRA",
    "SERVED_SCHEMES",
    "Location",
    "ObjectPath",
    "is_object_location",
    "local_directory",
    "storage_location",
    "url_scheme",
]

# scheme -> how a location of it is written. Plain paths are served too (the local
# filesystem); a scheme joins this table together with the backend that serves it.
SERVED_SCHEMES: dict[str, str] = {"file": "file:///absolute/path", "s3": "s3://bucket/prefix"}
# Object-store schemes need the client library of the `s3` extra, which a plain install
# lacks: a location of theirs names the extra instead of failing at the first upload.
OBJECT_STORE_EXTRA = "aiockpt[s3]"
_OBJECT_SCHEMES = frozenset({"s3"})
_OBJECT_CLIENT = "obstore"

# "<scheme>://": a single colon is an ordinary file name character on POSIX ("s3:/x" is a
# relative path), so only the double slash marks a URL.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# S3's bucket naming rules: 3-63 lower-case letters, digits, dots and hyphens, starting
# and ending with a letter or digit.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ObjectPath(PurePosixPath):
    """A key prefix in an object store, written as its URL (``s3://bucket/run-1/step-5``).

    It joins and splits like a path (``/``, ``name``, ``parent``) so that the storage seam
    can hand it around where the local backend hands a directory, but it is no local
    path: ``os.fspath`` refuses it, so a call that would touch the local filesystem fails
    loudly instead of creating a folder named ``s3:``.
    """

    @property
    def scheme(self) -> str:
        return self.parts[0].rstrip(":")

    @property
    def bucket(self) -> str:
        return self.parts[1] if len(self.parts) > 1 else ""

    @property
    def key(self) -> str:
        """The object key (prefix) inside the bucket, without a leading or trailing ``/``."""
        return "/".join(self.parts[2:])

    def __str__(self) -> str:
        key = self.key
        return f"{self.scheme}://{self.bucket}" + (f"/{key}" if key else "")

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __fspath__(self) -> str:
        raise TypeError(f"{self} is an object-store location, not a local path")


Location = Path | ObjectPath


def url_scheme(location: str | os.PathLike[str]) -> str | None:
    """The lower-cased scheme of a ``<scheme>://...`` location; None for a plain path."""
    if isinstance(location, ObjectPath):
        return location.scheme
    if not isinstance(location, str):
        return None  # a Path object has already folded "//" into "/": never a URL
    match = _URL.match(location)
    return match.group(1).lower() if match else None


def is_object_location(location: object) -> bool:
    """Is ``location`` in an object store (an ObjectPath, or a URL of such a scheme)?"""
    if isinstance(location, ObjectPath):
        return True
    return isinstance(location, str) and url_scheme(location) in _OBJECT_SCHEMES


def _served() -> str:
    return ", ".join(f"{scheme}:// ({form})" for scheme, form in SERVED_SCHEMES.items())


def storage_location(location: str | os.PathLike[str]) -> Location:
    """The place ``location`` names: a local directory, or an object-store prefix.

    Raises ConfigError for a URL of a scheme no backend serves, a malformed one, or an
    object-store URL when the client library of the ``s3`` extra is not installed.
    """
    if isinstance(location, ObjectPath):
        return location
    if is_object_location(location):
        assert isinstance(location, str)
        return _object_path(location)
    return local_directory(location)


def _object_path(text: str) -> ObjectPath:
    scheme = url_scheme(text)
    form = SERVED_SCHEMES[str(scheme)]
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise ConfigError(f"directory {text!r}: write it as {form} (no query or fragment)")
    bucket, key = parts.netloc, parts.path.strip("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(
            f"directory {text!r}: {bucket!r} is not a bucket name (3 to 63 lower-case "
            f"letters, digits, dots and hyphens); write it as {form}"
        )
    segments = key.split("/") if key else []
    if any(s in ("", ".", "..") for s in segments) or any(ord(c) < 32 for c in key):
        raise ConfigError(
            f"directory {text!r}: the prefix {key!r} has an empty, '.' or '..' part or a "
            f"control character; write it as {form} with plain names between slashes"
        )
    if importlib.util.find_spec(_OBJECT_CLIENT) is None:
        raise ConfigError(
            f"directory {text!r}: {scheme}:// locations need the object-store client "
            f"({_OBJECT_CLIENT}), which is not installed; pip install '{OBJECT_STORE_EXTRA}'"
        )
    return ObjectPath(f"{scheme}:", bucket, *segments)


def local_directory(location: str | os.PathLike[str]) -> Path:
    """The local directory that ``location`` names (a path, or a ``file://`` URL).

    A URL of any other scheme is a ConfigError that names the scheme and the ones served,
    instead of becoming a local folder called ``s3:`` that the user believes is a bucket.
    """
    if isinstance(location, ObjectPath) or is_object_location(location):
        raise ConfigError(
            f"{location}: an object-store location, where a local directory is needed "
            "(this measures or writes local files); give a local directory here"
        )
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
