"""A training process for the kill test: commits step 1, then uploads a large step 2
until it is killed. Not a test module; tests/s3/test_s3_crash.py runs it.

Usage: python upload_child.py URL  (endpoint and credentials from the AWS_* variables)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import aiockpt
from aiockpt.storage import objectstore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import Bag

# Parts of 5 MiB (S3's smallest) so that each 12 MiB data file is a multipart upload.
objectstore.PART_BYTES = 5 * 2**20


def main(url: str) -> None:
    state = {"weight": torch.full((3 * 2**20,), 1.0)}  # 12 MiB of float32
    config = aiockpt.Config(directory=url, chunk_size_mb=12, keep_last=None)
    with aiockpt.SyncCheckpointer(config, model=Bag(state)) as ckpt:
        ckpt.checkpoint(1).wait()
        print("committed 1", flush=True)
        # 25 MiB: data files of 12, 12 and 1 MiB, the first two multipart uploads, the
        # last a single PUT that completes first.
        state["weight"] = torch.full((6 * 2**20 + 2**18,), 2.0)
        ckpt.checkpoint(2).wait()
        print("committed 2", flush=True)  # the test kills us before this


if __name__ == "__main__":
    main(sys.argv[1])
