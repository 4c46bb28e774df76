"""Persist rate to a local S3 server against a raw parallel put of the same bytes.

Not a test module (timings are no unit test's business)::

    python tests/s3/measure_persist.py [--mib 256] [--rounds 3]

Starts moto's server on 127.0.0.1, then alternates (A B, B A, ...) a checkpoint of a state
of ``--mib`` MiB through aiockpt and a raw put of the same chunks with the same client,
the same number of threads and the same multipart settings, and prints the medians and
their ratio. Both go to the same server in the same run, so the server's own speed (moto
is Python, far slower than a real store) cancels out of the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import Bag

import aiockpt
from aiockpt._util.location import storage_location
from aiockpt.storage import objectstore
from aiockpt.storage.s3client import connect
from s3.s3server import TEST_ENV, moto_server, s3_client


def raw_put(url: str, chunks: list[memoryview], threads: int, round_: int) -> float:
    import obstore

    store = connect(storage_location(url))
    started = time.perf_counter()

    def put(index: int) -> None:
        view = chunks[index]
        obstore.put(
            store,
            f"raw/{round_}/{index}",
            view,
            use_multipart=len(view) > objectstore.PART_BYTES,
            chunk_size=objectstore.PART_BYTES,
            max_concurrency=objectstore.PARTS_IN_FLIGHT,
        )

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(len(chunks))))
    took = time.perf_counter() - started
    # Gone again (untimed), as retention keeps one checkpoint: the server holds alike.
    obstore.delete(store, [f"raw/{round_}/{index}" for index in range(len(chunks))])
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--chunk-mib", type=int, default=32)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(TEST_ENV)
    with moto_server() as endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        s3_client(endpoint).create_bucket(Bucket="bench")
        url = "s3://bench/run"
        state = {"w": torch.randn(args.mib * 2**20 // 4)}
        raw = memoryview(state["w"].numpy()).cast("B")
        size = args.chunk_mib * 2**20
        chunks = [raw[i : i + size] for i in range(0, len(raw), size)]
        config = aiockpt.Config(
            directory=url, chunk_size_mb=args.chunk_mib, num_threads=args.threads, keep_last=1
        )
        persist, put = [], []
        holder = Bag(state)
        with aiockpt.SyncCheckpointer(config, model=holder) as ckpt:
            for round_ in range(args.rounds + 1):  # round 0 warms up both
                # The order alternates (A B, B A, ...): neither always runs after the other.
                first_raw = round_ % 2 == 1
                raw_took = raw_put(url, chunks, args.threads, round_) if first_raw else 0.0
                handle = ckpt.checkpoint(round_)
                handle.wait()
                # From capture to durable commit, as aiockpt reports it (retention after).
                took = handle.metrics.persist_seconds
                if not first_raw:
                    raw_took = raw_put(url, chunks, args.threads, round_)
                if round_:
                    persist.append(took)
                    put.append(raw_took)
                    m = handle.metrics
                    print(
                        f"round {round_}: persist {took:.2f} s (capture {m.capture_ms:.0f} ms, "
                        f"writes {m.write_seconds:.2f} s, commit {m.commit_ms:.0f} ms), "
                        f"raw put {raw_took:.2f} s"
                    )
        gib = args.mib / 1024
        a, b = statistics.median(persist), statistics.median(put)
        print(f"state {args.mib} MiB in {len(chunks)} chunks, {args.threads} threads")
        print(f"aiockpt persist: {gib / a * 1024:.0f} MiB/s (median of {args.rounds})")
        print(f"raw parallel put: {gib / b * 1024:.0f} MiB/s (median of {args.rounds})")
        print(f"ratio: {b / a:.2f}x")


if __name__ == "__main__":
    main()
