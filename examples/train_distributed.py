"""aiockpt under torchrun: one checkpoint for all ranks, resumable at another world size.

    torchrun --nproc-per-node 2 examples/train_distributed.py                 # DDP
    torchrun --nproc-per-node 2 examples/train_distributed.py --wrap fsdp     # FSDP2
    torchrun --nproc-per-node 4 examples/train_distributed.py --dir ckpts     # then again
    torchrun --nproc-per-node 2 examples/train_distributed.py --dir ckpts     # on 2 ranks

The Trainer is the same as on one GPU. Every rank writes its share of each checkpoint
(DDP: replicated state split ~1/world per rank; FSDP2: each rank its own shards), and
rank 0 commits it once every rank's bytes are durable. A run on another number of ranks
resumes from it: the model and optimizer are resharded, per-rank state (RNG) comes back
for the ranks that saved it. Uses NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import aiockpt


def build(wrap: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # every rank starts from the same weights
    model = nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4)
    )
    model = model.to(device)
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wrap", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--dir", help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
    directory = args.dir or os.path.join(tempfile.gettempdir(), f"aiockpt-dist-{os.getuid()}")

    model = build(args.wrap, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = aiockpt.Config(directory=directory, interval_steps=10, keep_last=2)
    with aiockpt.SyncTrainer(model, optimizer, loss_fn, config=config) as trainer:
        start = trainer.resume()
        if rank == 0:
            print(f"{dist.get_world_size()} ranks ({args.wrap}), starting at step {start}")
        data = torch.Generator().manual_seed(rank)  # each rank its own batches
        for _ in range(start, args.steps):
            inputs = torch.randn(16, 32, generator=data).to(device)
            targets = torch.randint(0, 4, (16,), generator=data).to(device)
            loss = trainer.train_step((inputs, targets))
        trainer.wait()
        if rank == 0 and start < args.steps:
            stalls = ", ".join(f"{s * 1e3:.1f}" for s in trainer.stalls)
            print(f"step {trainer.step}: loss {loss.item():.4f}; checkpoint stalls (ms): {stalls}")
    if rank == 0:
        print("checkpoints:", [info.step for info in aiockpt.list_checkpoints(directory)])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
