"""Fixtures of the object-store tests: one S3-compatible server process per session,
started here on 127.0.0.1 (nothing is started by hand), and a fresh bucket per test."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pytest

pytest.importorskip("obstore", reason="the s3 extra (obstore) is not installed")
pytest.importorskip("moto", reason="moto[server] (the test extra) is not installed")
pytest.importorskip("botocore", reason="moto[server] brings botocore")

from .s3server import FOREIGN_ENV, TEST_ENV, iam_client, moto_server, s3_client

# The requests that set the auth server up: the IAM user, its key, its policy.
_SETUP_ACTIONS = 3

_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The standard AWS variables pointing at the test server; its endpoint."""
    for name in FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return s3_endpoint


@pytest.fixture
def s3_client_(s3_env: str):  # type: ignore[no-untyped-def]
    return s3_client(s3_env)


@pytest.fixture
def bucket(s3_client_) -> str:  # type: ignore[no-untyped-def]
    name = f"test-bucket-{next(_buckets)}"
    s3_client_.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_url(bucket: str) -> str:
    return f"s3://{bucket}/run-1"


@pytest.fixture(scope="session")
def auth_server() -> Iterator[tuple[str, str, str]]:
    """A second server that checks credentials: (endpoint, access key, secret key).

    moto lets the first INITIAL_NO_AUTH_ACTION_COUNT requests through unchecked: those
    make an IAM user with a key and a policy allowing S3; every later request must be
    signed with that key."""
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS)}) as endpoint:
        iam = iam_client(endpoint)
        iam.create_user(UserName="trainer")
        created = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(
            UserName="trainer",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        yield endpoint, created["AccessKeyId"], created["SecretAccessKey"]


@pytest.fixture
def auth_bucket(auth_server: tuple[str, str, str]) -> str:
    endpoint, key, secret = auth_server
    name = f"auth-bucket-{next(_buckets)}"
    s3_client(endpoint, key=key, secret=secret).create_bucket(Bucket=name)
    return name
