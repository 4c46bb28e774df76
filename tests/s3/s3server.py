"""A real S3-compatible server for the tests: moto's standalone server, started as its own
process on 127.0.0.1, and a small helper to make buckets in it.

Not a test module. ``python tests/s3/s3server.py`` starts one and prints its endpoint,
for trying things by hand.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

# Credentials moto accepts while it does not enforce authentication.
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}
# Variables of the developer's own AWS setup that must not reach a test.
FOREIGN_ENV = (
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def moto_server(extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """Start moto's server on a free port of 127.0.0.1; its endpoint URL until the end."""
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(endpoint):
            if process.poll() is not None:
                raise RuntimeError(f"moto's server exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("moto's server did not answer within 60 s")
            time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def s3_client(endpoint: str, **credentials: str):  # type: ignore[no-untyped-def]
    """A botocore client of the test server (for making buckets and looking inside)."""
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=credentials.get("key", TEST_ENV["AWS_ACCESS_KEY_ID"]),
        aws_secret_access_key=credentials.get("secret", TEST_ENV["AWS_SECRET_ACCESS_KEY"]),
    )


def iam_client(endpoint: str):  # type: ignore[no-untyped-def]
    """A botocore IAM client of the test server (to make users and keys)."""
    import botocore.session

    return botocore.session.get_session().create_client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def keys(client, bucket: str, prefix: str = "") -> list[str]:  # type: ignore[no-untyped-def]
    """Every key in ``bucket`` under ``prefix``, sorted."""
    found: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [item["Key"] for item in page.get("Contents", [])]
    return sorted(found)


if __name__ == "__main__":
    with moto_server() as url:
        print(url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
