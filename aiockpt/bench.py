"""``aiockpt bench``: stall and persist figures next to the machine's own limits.

One process, one model, every figure measured in the same run:

- the limits (device-to-device and device-to-host copy rates, parallel fsync'd write and
  cold read bandwidth of the target directory),
- per staging mode, the stall of each checkpoint two ways: the time ``checkpoint()``
  takes to return, and how much longer the training step that follows it takes than a
  step without a checkpoint (what training really loses, GPU-side waits included),
- persist bandwidth (bytes / time from capture to durable commit) and restore time,
- a blocking ``torch.save`` (fsync'd) of the same state as the baseline.

Modes are interleaved round by round (A B A B ...) so drift in the machine's speed hits
them alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpointer import SyncCheckpointer
from .config import Config
from .limits import measure_limits

__all__ = ["PRESETS", "build_preset", "main"]


@dataclass(frozen=True)
class Preset:
    d_model: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int


PRESETS = {
    "tiny": Preset(d_model=64, layers=2, heads=4, vocab=512, seq=32, batch=4),
    "350m": Preset(d_model=1024, layers=24, heads=16, vocab=50304, seq=512, batch=8),
    "1.3b": Preset(d_model=2048, layers=24, heads=16, vocab=50304, seq=512, batch=4),
}


class TinyGPT(nn.Module):
    """A decoder-only transformer built from torch's own layers (tied embeddings)."""

    def __init__(self, p: Preset) -> None:
        super().__init__()
        self.embed = nn.Embedding(p.vocab, p.d_model)
        self.position = nn.Parameter(torch.zeros(p.seq, p.d_model))
        layer = nn.TransformerEncoderLayer(
            p.d_model, p.heads, 4 * p.d_model, dropout=0.1, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, p.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(p.d_model)
        self.head = nn.Linear(p.d_model, p.vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def build_preset(
    name: str, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, Preset]:
    preset = PRESETS[name]
    model = TinyGPT(preset).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer, preset


def make_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, p: Preset, device: torch.device
) -> Callable[[], None]:
    tokens = torch.randint(0, p.vocab, (p.batch, p.seq + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            logits = model(tokens[:, :-1])
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), tokens[:, 1:].flatten()
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sync(device: torch.device) -> None:
    # Only the training (current) stream: a real loop syncs there (loss.item()), and
    # must not be charged for aiockpt's side-stream copies that run concurrently.
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.manual_seed(0)
    model, optimizer, preset = build_preset(args.preset, device)
    step = make_step(model, optimizer, preset, device)
    for _ in range(3):  # materialise optimizer state, warm kernels
        step()
    _sync(device)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    state_bytes = sum(
        t.numel() * t.element_size()
        for part in (model.state_dict(), *[s for s in optimizer.state.values()])
        for t in part.values()
        if isinstance(t, torch.Tensor)
    )
    root = Path(args.directory)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    report: dict[str, Any] = {
        "preset": args.preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_bytes": state_bytes,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    _log(args, f"{report['parameters'] / 1e6:.0f}M parameters, state {state_bytes / 1e9:.2f} GB")
    report["limits"] = measure_limits(root / "limits", state_bytes, args.num_threads).to_dict()
    _log(args, f"limits: {report['limits']}")
    plain = [_timed(step, device) for _ in range(args.steps)]
    report["step_seconds"] = _median(plain)

    modes = ["gpu", "host"] if device.type == "cuda" else ["cpu"]
    checkpointers = {}
    results: dict[str, dict[str, list[float]]] = {}
    for mode in modes:
        config = Config(
            directory=root / mode,
            staging="host" if mode == "cpu" else mode,
            max_async=args.max_async,
            chunk_size_mb=args.chunk_size_mb,
            num_threads=args.num_threads,
            keep_last=1,
        )
        ckpt = SyncCheckpointer(config, model=model, optimizer=optimizer)
        first = _timed(lambda c=ckpt: c.checkpoint(0).wait(), device)  # type: ignore[misc]
        checkpointers[mode] = ckpt
        results[mode] = {
            "call_ms": [],
            "stall_ms": [],
            "persisting_step_ms": [],
            "plain_step_ms": [],
            "state_dict_ms": [],
            "staging_ms": [],
            "queue_wait_ms": [],
            "persist_gbps": [],
            "first_ms": [first * 1e3],
        }
    for round_ in range(1, args.rounds + 1):
        for mode, ckpt in checkpointers.items():
            box: dict[str, Any] = {}

            def checkpoint_then_step(
                ckpt: SyncCheckpointer = ckpt, box: dict[str, Any] = box, at: int = round_
            ) -> None:
                start = time.perf_counter()
                box["handle"] = ckpt.checkpoint(at)
                box["call"] = time.perf_counter() - start
                step()

            # Pair each checkpointed step with a plain step right before it, so drift in
            # the machine's speed cancels out of the difference.
            plain_step = _timed(step, device)
            with_ckpt = _timed(checkpoint_then_step, device)
            handle = box["handle"]
            # Keep training while the checkpoint persists: what background work costs the
            # steps it overlaps (GIL, memory and PCIe traffic), beyond the first one.
            while not handle.done():
                results[mode]["persisting_step_ms"].append(_timed(step, device) * 1e3)
            handle.wait()
            # Plain steps of the same round: the machine's speed drifts by more than the
            # effect being measured, so compare against steps taken moments apart.
            results[mode]["plain_step_ms"].extend(_timed(step, device) * 1e3 for _ in range(3))
            for key in ("state_dict_ms", "staging_ms", "queue_wait_ms"):
                results[mode][key].append(getattr(handle.metrics, key))
            results[mode]["call_ms"].append(box["call"] * 1e3)
            results[mode]["stall_ms"].append((with_ckpt - plain_step) * 1e3)
            results[mode]["persist_gbps"].append(handle.metrics.persist_gbps)
        _log(
            args,
            f"round {round_}: "
            + ", ".join(f"{m} stall {r['stall_ms'][-1]:.1f} ms" for m, r in results.items()),
        )
    for mode, ckpt in checkpointers.items():
        _drop_page_cache(root / mode)  # restore from the disk, as after a crash
        restore = _timed(ckpt.restore, device)
        results[mode]["restore_seconds"] = [restore]
        ckpt.close()
    report["aiockpt"] = {
        mode: {
            "call_ms_median": _median(r["call_ms"]),
            "call_ms_p99": _p99(r["call_ms"]),
            "stall_ms_median": _median(r["stall_ms"]),
            "stall_ms_p99": _p99(r["stall_ms"]),
            "first_checkpoint_ms": r["first_ms"][0],
            "persist_gbps_median": _median(r["persist_gbps"]),
            "persisting_step_ms_median": _median(r["persisting_step_ms"]),
            "plain_step_ms_median": _median(r["plain_step_ms"]),
            "state_dict_ms_median": _median(r["state_dict_ms"]),
            "staging_ms_median": _median(r["staging_ms"]),
            "restore_seconds": r["restore_seconds"][0],
            "restore_bound_seconds": _restore_bound(state_bytes, report["limits"]),
            "raw": r,
        }
        for mode, r in results.items()
    }
    if args.trainer:
        from .bench_trainer import run_trainer_matrix

        report["trainer"] = run_trainer_matrix(
            model,
            optimizer,
            preset,
            device,
            root,
            intervals=[
                (int(interval), policy)
                for interval in args.trainer_intervals.split(",")
                for policy in args.trainer_policies.split(",")
            ],
            seconds=args.trainer_seconds,
            rounds=args.trainer_rounds,
            base={
                "max_async": args.max_async,
                "chunk_size_mb": args.chunk_size_mb,
                "num_threads": args.num_threads,
            },
        )
    report["torch_save_seconds"] = [
        _torch_save(state, root / "torch_save.pt", device) for _ in range(args.baseline_repeats)
    ]
    shutil.rmtree(root, ignore_errors=True)
    return report


def _restore_bound(nbytes: int, limits: dict[str, Any]) -> float:
    """Reading every byte from disk plus moving it to the device, at the measured rates."""
    seconds = nbytes / (limits["read_gbps"] * 1e9) if limits["read_gbps"] else 0.0
    if limits.get("h2d_pinned_gbps"):
        seconds += nbytes / (limits["h2d_pinned_gbps"] * 1e9)
    return seconds


def _drop_page_cache(directory: Path) -> None:
    # Written and fsync'd pages are clean, so DONTNEED evicts them from the page cache.
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _torch_save(state: dict[str, Any], path: Path, device: torch.device) -> float:
    def save() -> None:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    seconds = _timed(save, device)
    path.unlink()
    return seconds


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--directory", default="bench-checkpoints")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="plain steps to time")
    parser.add_argument("--max-async", type=int, default=2)
    parser.add_argument("--chunk-size-mb", type=float, default=256)
    parser.add_argument("--num-threads", type=int, default=8)
    parser.add_argument("--baseline-repeats", type=int, default=1)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    parser.add_argument(
        "--trainer", action="store_true", help="also measure Trainer throughput per interval"
    )
    parser.add_argument("--trainer-intervals", default="1,10,50")
    parser.add_argument("--trainer-policies", default="block,skip", help="on_backpressure values")
    parser.add_argument("--trainer-seconds", type=float, default=15.0)
    parser.add_argument("--trainer-rounds", type=int, default=1)
    parser.add_argument("--output", help="write the JSON report here")
    parser.add_argument("--json", action="store_true", help="print only the JSON report")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiockpt bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    print(text if args.json else _table(report))
    return 0


def _table(report: dict[str, Any]) -> str:
    limits = report["limits"]
    lines = [
        f"{report['preset']}: {report['parameters'] / 1e6:.0f}M parameters, "
        f"{report['state_bytes'] / 1e9:.2f} GB state on {report['device']}",
        f"step {report['step_seconds'] * 1e3:.1f} ms; "
        f"fsync write {limits['fsync_write_gbps']:.2f} GB/s; "
        f"d2d {limits['d2d_gbps'] or 0:.0f} GB/s; "
        f"d2h pinned {limits['d2h_pinned_gbps'] or 0:.1f} GB/s",
        "| mode | call ms (p50/p99) | stall ms (p50/p99) | step ms while persisting | "
        "persist GB/s | first ms | restore s |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in report["aiockpt"].items():
        lines.append(
            f"| {mode} | {r['call_ms_median']:.2f} / {r['call_ms_p99']:.2f} | "
            f"{r['stall_ms_median']:.2f} / {r['stall_ms_p99']:.2f} | "
            f"{r['persisting_step_ms_median']:.1f} (plain {r['plain_step_ms_median']:.1f}) | "
            f"{r['persist_gbps_median']:.2f} | "
            f"{r['first_checkpoint_ms']:.0f} | "
            f"{r['restore_seconds']:.2f} (bound {r['restore_bound_seconds']:.2f}) |"
        )
    lines.append(f"torch.save (fsync'd): {_median(report['torch_save_seconds']):.2f} s")
    if "trainer" in report:
        lines += [
            "| Trainer | samples/s | vs none | checkpoints | skipped | achieved interval |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in report["trainer"].items():
            lines.append(
                f"| {name} | {r['samples_per_second']:.1f} | {r['vs_no_checkpoint']:.3f} | "
                f"{r['checkpoints']} | {r['skipped']} | {r['achieved_interval']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
