"""A writer SIGKILLed in the middle of an upload to a real S3 server: the previous
checkpoint stays the newest, and the next writer deletes what the dead one left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import Bag

import aiockpt
from aiockpt.cli.main import main

from .faultproxy import FaultPlan, fault_proxy
from .s3server import keys

CHILD = Path(__file__).with_name("upload_child.py")


def _uploads(client, bucket: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def test_sigkill_mid_upload_keeps_the_previous_checkpoint(
    s3_env, s3_url, bucket, s3_client_, capsys
):
    # A slow link, so that the child is surely in the middle of step 2's upload.
    plan = FaultPlan(delay_s=0.2)
    with fault_proxy(s3_env, plan) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy, "PYTHONUNBUFFERED": "1"}
        child = subprocess.Popen(
            [sys.executable, str(CHILD), s3_url], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "committed 1"
            deadline = time.monotonic() + 120
            # Killed with step 2 half there: one data object complete, multipart uploads
            # of the others begun and unfinished.
            while not (keys(s3_client_, bucket, "run-1/step-2/") and _uploads(s3_client_, bucket)):
                assert child.poll() is None, "the child finished before it could be killed"
                assert time.monotonic() < deadline, "step 2's upload never started"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    stored = keys(s3_client_, bucket)
    assert "run-1/step-2/manifest.json" not in stored
    assert [info.step for info in aiockpt.list_checkpoints(s3_url)] == [1]
    # Tools see what the dead writer left, and that it is dead (its process is gone).
    assert main(["ls", "--json", s3_url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["writer"]["live"] is False
    assert [(left["kind"], left["step"]) for left in report["leftovers"]] == [("tmp", 2)]
    assert report["leftovers"][0]["name"].startswith("step-2/.data-")

    holder = Bag()
    config = aiockpt.Config(directory=s3_url, keep_last=None)
    with aiockpt.SyncCheckpointer(config, model=holder) as ckpt:
        # Opening as the next writer deleted the dead one's leftovers.
        assert not [k for k in keys(s3_client_, bucket) if k.startswith("run-1/step-2/")]
        assert _uploads(s3_client_, bucket) == []
        assert ckpt.restore() == 1
        assert torch.equal(holder.state["weight"], torch.full((3 * 2**20,), 1.0))
        holder.state["weight"] = torch.full((4,), 3.0)
        ckpt.checkpoint(2).wait()
    assert torch.equal(aiockpt.load(f"{s3_url}/step-2")["model"]["weight"], torch.full((4,), 3.0))
