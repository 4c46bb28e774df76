"""Checkpoints of a model trained on several ranks, measured under torchrun.

    torchrun --nproc-per-node 2 -m aiockpt.tools.bench_ranks --preset 350m --wrap fsdp

Every rank trains the same preset transformer (``--wrap ddp``: replicated by
DistributedDataParallel; ``fsdp``: sharded by fully_shard). Rounds alternate a run of
``--steps`` steps without checkpoints and one with a checkpoint every ``--interval``
steps, so drift hits both alike. Reported, per rank and together: the stall of each
``checkpoint()`` call, step throughput against no checkpoint, persist time and the
aggregate persist bandwidth against the aggregate raw fsync'd write bandwidth of all
ranks writing at once (measured in the same run), and a bit-exact restore check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._util.location import local_directory
from .._util.stats import median, p99
from ..checkpointer import SyncCheckpointer
from ..config import Config, add_config_arguments, config_from_arguments
from ..errors import ConfigError
from .limits import fsync_write_seconds
from .workloads import PRESETS, TinyGPT, make_step, sync

__all__ = ["CONFIG_KEYS", "build_config", "build_parser", "main"]

# The Config keys taken as flags; the directory is --directory's, below which the run
# makes (and deletes) its own.
CONFIG_KEYS = (
    "max_async",
    "chunk_size_mb",
    "chunk_count",
    "num_threads",
    "staging",
    "on_backpressure",
)


def _wrap(model: nn.Module, how: str, device: torch.device) -> nn.Module:
    if how == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks.layers:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _local_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    def local(t: torch.Tensor) -> torch.Tensor:
        return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()

    tensors = [local(t) for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    for state in optimizer.state.values():
        tensors += [local(t) for t in state.values() if isinstance(t, torch.Tensor)]
    return tensors


def build_config(args: argparse.Namespace, root: Path) -> Config:
    """The checkpointer's settings: flags, AIOCKPT_* variables, --config, defaults.

    The directory is the run's own (it is deleted afterwards), and two checkpoints are
    kept, whatever the environment says: the run only restores the last one.
    """
    return config_from_arguments(args, CONFIG_KEYS, directory=root / "ckpt", keep_last=2)


def run(args: argparse.Namespace, config: Config) -> dict[str, Any] | None:
    backend = "nccl" if torch.cuda.is_available() and not args.cpu else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.manual_seed(0)
    preset = PRESETS[args.preset]
    model = _wrap(TinyGPT(preset).to(device), args.wrap, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = make_step(model, optimizer, preset, device)
    for _ in range(3):
        step()
    sync(device)
    local_bytes = sum(t.numel() * t.element_size() for t in _local_state(model, optimizer))
    root = local_directory(args.directory)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    # All ranks write at once, as a checkpoint does: the aggregate raw rate of the disk.
    share = local_bytes if args.wrap == "fsdp" else local_bytes // world
    raw_seconds = fsync_write_seconds(root / f"limits-{rank}", share, config.num_threads)
    raw = _gather((share, raw_seconds))
    ckpt = SyncCheckpointer(config, model=model, optimizer=optimizer)
    start = time.perf_counter()
    ckpt.checkpoint(0).wait()  # plans the layout and pins the staging memory
    first = time.perf_counter() - start
    calls: list[float] = []
    persists: list[float] = []
    plain_rates: list[float] = []
    checkpoint_rates: list[float] = []
    number = 0
    for _ in range(args.rounds):
        dist.barrier()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        plain_rates.append(args.steps / (time.perf_counter() - start))
        dist.barrier()
        handles = []
        start = time.perf_counter()
        for i in range(args.steps):
            if i % args.interval == 0:
                number += 1
                called = time.perf_counter()
                handles.append(ckpt.checkpoint(number))
                calls.append((time.perf_counter() - called) * 1e3)
            step()
        sync(device)
        checkpoint_rates.append(args.steps / (time.perf_counter() - start))
        for handle in handles:
            handle.wait()
            if not handle.skipped:
                persists.append(handle.metrics.persist_seconds)
    ckpt.wait()
    ckpt.checkpoint(number + 1, block=True).wait()  # the state the restore must give back
    exact = _restore_is_exact(ckpt, model, optimizer, device)
    ckpt.close()
    mine = {
        "rank": rank,
        "local_state_bytes": local_bytes,
        "first_checkpoint_seconds": first,
        "call_ms": calls,
        "persist_seconds": persists,
        "plain_steps_per_second": plain_rates,
        "checkpoint_steps_per_second": checkpoint_rates,
        "skipped": ckpt.stats.skipped,
        "restore_bit_exact": exact,
    }
    ranks = _gather(mine)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()
    if rank != 0:
        return None
    return _summary(args, ranks, raw, world, device)


def _restore_is_exact(
    ckpt: SyncCheckpointer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> bool:
    expected = _local_state(model, optimizer)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # the restore must bring the saved bits back
    ckpt.restore()
    sync(device)
    got = _local_state(model, optimizer)
    return len(got) == len(expected) and all(
        torch.equal(a, b) for a, b in zip(expected, got, strict=True)
    )


def _gather(value: Any) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _summary(
    args: argparse.Namespace,
    ranks: list[dict[str, Any]],
    raw: list[tuple[int, float]],
    world: int,
    device: torch.device,
) -> dict[str, Any]:
    total = sum(r["local_state_bytes"] for r in ranks)
    written = total if args.wrap == "fsdp" else total // world
    raw_gbps = sum(b for b, _ in raw) / max(s for _, s in raw) / 1e9
    persist = [max(p) for p in zip(*(r["persist_seconds"] for r in ranks), strict=False)]
    persist_s = median(persist)
    persist_gbps = written / persist_s / 1e9 if persist_s else None
    plain = statistics.median(x for r in ranks for x in r["plain_steps_per_second"])
    with_ckpt = statistics.median(x for r in ranks for x in r["checkpoint_steps_per_second"])
    calls = [x for r in ranks for x in r["call_ms"]]
    return {
        "preset": args.preset,
        "wrap": args.wrap,
        "world_size": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "checkpoint_bytes": written,
        "interval_steps": args.interval,
        "raw_fsync_write_gbps_all_ranks": raw_gbps,
        "persist_seconds_median": persist_s,
        "persist_gbps_all_ranks": persist_gbps,
        "persist_vs_raw": persist_gbps / raw_gbps if persist_gbps is not None else None,
        "stall_ms_median": median(calls),
        "stall_ms_p99": p99(calls),
        "steps_per_second_plain": plain,
        "steps_per_second_with_checkpoints": with_ckpt,
        "throughput_vs_no_checkpoint": with_ckpt / plain,
        "restore_bit_exact_all_ranks": all(r["restore_bit_exact"] for r in ranks),
        "ranks": ranks,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aiockpt.tools.bench_ranks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--wrap", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--directory", default="bench-ranks")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="steps per run")
    parser.add_argument("--interval", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU even with GPUs")
    parser.add_argument("--output", help="write the JSON report here (rank 0)")
    knobs = parser.add_argument_group(
        "aiockpt settings (override AIOCKPT_* variables and --config)"
    )
    add_config_arguments(knobs, CONFIG_KEYS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Every rank checks the settings before any of them joins the process group.
        config = build_config(args, local_directory(args.directory))
    except ConfigError as exc:
        parser.error(str(exc))
    report = run(args, config)
    if report is not None:
        text = json.dumps(report, indent=2)
        if args.output:
            Path(args.output).write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
