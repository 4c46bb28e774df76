"""The object store failing: throttling and 5xx retried, refused credentials and missing
buckets reported as StorageAccessError with nothing lost, a second writer refused."""

from __future__ import annotations

import time

import pytest
import torch

import aiockpt
from aiockpt.storage import objectlock

from .faultproxy import FaultPlan, fault_proxy
from .s3server import keys


def _state(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 64)


def test_throttling_and_server_errors_are_retried(s3_env, s3_url, monkeypatch):
    plan = FaultPlan(fail_every=3, statuses=(503, 429, 500))
    model = _state(0)
    with fault_proxy(s3_env, plan) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
        config = aiockpt.Config(directory=s3_url, chunk_size_mb=0.004)
        with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
            for step in (1, 2):
                ckpt.checkpoint(step).wait()
        restored = _state(1)
        with aiockpt.SyncCheckpointer(config, model=restored) as ckpt:
            assert ckpt.restore() == 2
    assert set(plan.injected) == {503, 429, 500}  # every kind was injected, and survived
    assert torch.equal(restored.weight, model.weight)


def test_wrong_credentials_are_a_clear_error_and_nothing_is_lost(
    auth_server, auth_bucket, monkeypatch
):
    endpoint, good_key, good_secret = auth_server
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", good_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", good_secret)
    url = f"s3://{auth_bucket}/run"
    model = _state(0)
    config = aiockpt.Config(directory=url)
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        ckpt.checkpoint(1).wait()

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(aiockpt.StorageAccessError, match="AWS_SECRET_ACCESS_KEY"):
        aiockpt.SyncCheckpointer(config, model=_state(1))
    with pytest.raises(aiockpt.StorageAccessError, match="refused the credentials"):
        aiockpt.list_checkpoints(url)
    with pytest.raises(aiockpt.StorageAccessError):
        aiockpt.load(f"{url}/step-1")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", good_secret)
    assert [info.step for info in aiockpt.list_checkpoints(url)] == [1]
    assert torch.equal(aiockpt.load(f"{url}/step-1")["model"]["weight"], model.weight)


def test_missing_bucket_is_a_clear_error(s3_env):
    url = "s3://no-such-bucket-here/run"
    with pytest.raises(aiockpt.StorageAccessError, match="does not exist"):
        aiockpt.SyncCheckpointer(aiockpt.Config(directory=url), model=_state(0))
    with pytest.raises(aiockpt.StorageAccessError, match="does not exist"):
        aiockpt.list_checkpoints(url)


def test_second_writer_is_refused_until_the_first_one_closes(s3_url):
    config = aiockpt.Config(directory=s3_url)
    with aiockpt.SyncCheckpointer(config, model=_state(0)) as first:
        first.checkpoint(1).wait()
        with pytest.raises(aiockpt.DirectoryLockedError, match="another process"):
            aiockpt.SyncCheckpointer(config, model=_state(1))
    with aiockpt.SyncCheckpointer(config, model=_state(1)) as second:
        assert second.restore() == 1


def test_a_dead_writers_lease_runs_out_and_is_taken_over(s3_url, bucket, s3_client_, monkeypatch):
    # A writer that died without removing its lock object: its lease is not renewed.
    monkeypatch.setattr(objectlock, "DEFAULT_LEASE_S", 5.0)
    s3_client_.put_object(
        Bucket=bucket,
        Key="run-1/.aiockpt.lock",
        Body=b'{"host": "gone", "lease_s": 5.0, "pid": 4242, "token": "0"}',
    )
    config = aiockpt.Config(directory=s3_url)
    with pytest.raises(aiockpt.DirectoryLockedError, match="pid 4242"):
        aiockpt.SyncCheckpointer(config, model=_state(0))
    time.sleep(5.5)  # the dead writer's lease runs out; nothing is timed or asserted on it
    with aiockpt.SyncCheckpointer(config, model=_state(0)) as ckpt:
        ckpt.checkpoint(1).wait()
    assert "run-1/step-1/manifest.json" in keys(s3_client_, bucket)


def test_a_commit_whose_answer_is_lost_is_withdrawn(
    s3_env, s3_url, bucket, s3_client_, monkeypatch
):
    # The manifest reaches the store, but the writer hears a refusal: it reports the
    # checkpoint as failed and deletes its data, so the manifest must go too (a listed
    # checkpoint without data would be one a reader refuses).
    config = aiockpt.Config(directory=s3_url)
    model = _state(0)
    with aiockpt.SyncCheckpointer(config, model=model) as ckpt:
        ckpt.checkpoint(1).wait()
    plan = FaultPlan(lose_answer_of="/run-1/step-2/manifest.json")
    with fault_proxy(s3_env, plan) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
        with (
            aiockpt.SyncCheckpointer(config, model=model) as ckpt,
            pytest.raises(aiockpt.CheckpointError) as failure,
        ):
            ckpt.checkpoint(2).wait()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    assert isinstance(failure.value.__cause__, aiockpt.StorageAccessError)
    assert plan.injected == [403]
    assert [info.step for info in aiockpt.list_checkpoints(s3_url)] == [1]
    assert not [k for k in keys(s3_client_, bucket) if k.startswith("run-1/step-2/")]


def test_a_writer_whose_lock_was_taken_over_commits_nothing_more(
    s3_url, bucket, s3_client_, monkeypatch
):
    monkeypatch.setattr(objectlock, "DEFAULT_LEASE_S", 0.4)  # renewed every 0.1 s
    config = aiockpt.Config(directory=s3_url, keep_last=None)
    with aiockpt.SyncCheckpointer(config, model=_state(0)) as ckpt:
        ckpt.checkpoint(1).wait()
        # Another writer replaces the lock object (as a successor would after a lease ran
        # out): the next renewal is refused, and from then on nothing commits.
        s3_client_.put_object(
            Bucket=bucket, Key="run-1/.aiockpt.lock", Body=b'{"pid": 1, "token": "other"}'
        )
        deadline = time.monotonic() + 60
        refused = None
        for step in range(2, 10_000):
            assert time.monotonic() < deadline, "the lost lock was never noticed"
            try:
                ckpt.checkpoint(step).wait()
            except aiockpt.CheckpointError as exc:
                refused = step, exc
                break
    assert refused is not None
    step, exc = refused
    assert isinstance(exc.__cause__, aiockpt.DirectoryLockedError)
    assert "lost its lock" in str(exc.__cause__)
    assert step not in [info.step for info in aiockpt.list_checkpoints(s3_url)]
    # The successor's lock object stays: the writer that lost it does not delete it.
    body = s3_client_.get_object(Bucket=bucket, Key="run-1/.aiockpt.lock")["Body"].read()
    assert b'"other"' in body
