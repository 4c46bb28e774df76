"""The object-store client (obstore: Rust's object_store) and what its failures mean here.

Why obstore: every transfer runs in Rust with the GIL released (so uploads on writer
threads cost the training thread almost nothing), it speaks S3, GCS and Azure through one
API, it has the conditional writes the commit protocol needs (``mode="create"`` is
If-None-Match, an ``e_tag`` is If-Match), ranged gets, parallel multipart uploads, and
retries with backoff of its own.

Credentials and endpoint come the standard way, from the environment: ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), web identity
(``AWS_WEB_IDENTITY_TOKEN_FILE``, ``AWS_ROLE_ARN``), container and instance credentials.
obstore does not read the SDK's ``~/.aws`` files; where ``boto3`` is installed and no key
is in the environment, its session (profiles, SSO, ``~/.aws/credentials``) provides them.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .._util.location import OBJECT_STORE_EXTRA, ObjectPath
from ..errors import ConfigError, StorageAccessError

if TYPE_CHECKING:
    from obstore.store import S3Store

__all__ = ["access_errors", "connect", "is_missing", "is_refused_write", "missing_bucket"]

# Throttling (503 SlowDown, 429) and 5xx are retried by the client with exponential
# backoff and jitter; a request still failing after this long is reported.
_RETRY_TIMEOUT = timedelta(seconds=120)
_MAX_RETRIES = 10
_INITIAL_BACKOFF = timedelta(milliseconds=100)
_MAX_BACKOFF = timedelta(seconds=10)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region() -> str:
    # S3-compatible servers accept any region; AWS itself redirects a wrong one.
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _sdk_credentials() -> Any:
    """boto3's credential chain (profiles and ``~/.aws`` files), when it is installed and
    the environment holds no key of its own."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return None
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return None
    session = boto3.Session()
    if session.get_credentials() is None:
        return None
    return Boto3CredentialProvider(session)


def connect(location: ObjectPath) -> S3Store:
    """A client for ``location``'s bucket, configured from the standard environment."""
    try:
        from obstore.store import S3Store
    except ImportError as exc:
        raise ConfigError(
            f"{location}: object-store locations need obstore; pip install '{OBJECT_STORE_EXTRA}'"
        ) from exc
    options: dict[str, Any] = {"region": _region()}
    endpoint = _endpoint()
    if endpoint:
        options["endpoint"] = endpoint
    client: dict[str, Any] = {"connect_timeout": timedelta(seconds=10)}
    if endpoint and endpoint.startswith("http://"):
        client["allow_http"] = True  # the user named a plain-HTTP endpoint on purpose
    retry = {
        "max_retries": _MAX_RETRIES,
        "retry_timeout": _RETRY_TIMEOUT,
        "backoff": {"init_backoff": _INITIAL_BACKOFF, "max_backoff": _MAX_BACKOFF, "base": 2},
    }
    try:
        return S3Store(
            location.bucket,
            client_options=client,  # type: ignore[arg-type]
            retry_config=retry,  # type: ignore[arg-type]
            credential_provider=_sdk_credentials(),
            **options,
        )
    except Exception as exc:  # obstore's configuration errors: a bad AWS_* variable
        raise ConfigError(f"{location}: the S3 client cannot be configured: {exc}") from exc


def is_missing(exc: BaseException) -> bool:
    """Is ``exc`` the store saying that an object does not exist?"""
    from obstore.exceptions import NotFoundError

    return isinstance(exc, (NotFoundError, FileNotFoundError))


def is_refused_write(exc: BaseException) -> bool:
    """Is ``exc`` a conditional write refused (the object exists, or changed)?"""
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    return isinstance(exc, (AlreadyExistsError, PreconditionError))


def _refusal(location: object, exc: BaseException) -> StorageAccessError | None:
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    text = str(exc)
    if isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or any(
        code in text
        for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "AccessDenied")
    ):
        return StorageAccessError(
            f"{location}: the object store refused the credentials ({_first_line(text)}); "
            "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (an expired "
            "session token needs renewing) and that they may read and write this bucket"
        )
    if "NoSuchBucket" in text:
        return missing_bucket(location, exc)
    return None


def missing_bucket(location: object, exc: BaseException) -> StorageAccessError:
    """The error for a bucket that does not exist."""
    return StorageAccessError(
        f"{location}: the bucket does not exist ({_first_line(str(exc))}); create it, or "
        "fix the bucket name in the directory URL (and AWS_ENDPOINT_URL)"
    )


_CODE = re.compile(r"<Code>([A-Za-z]{1,64})</Code>")


def _first_line(text: str) -> str:
    """What the store said, short: its error code, else the first line of the message."""
    code = _CODE.search(text)
    if code is not None:
        return code.group(1)
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= 200 else line[:200] + "..."


@contextlib.contextmanager
def access_errors(location: object) -> Iterator[None]:
    """Turn the store's refusals (credentials, permissions, a missing bucket) into a
    StorageAccessError naming ``location``; other failures pass as they are (a missing
    object is a FileNotFoundError, what a reader treats as a missing file)."""
    try:
        yield
    except Exception as exc:
        refusal = _refusal(location, exc)
        if refusal is not None:
            raise refusal from exc
        raise
