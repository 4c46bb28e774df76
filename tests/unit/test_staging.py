"""The copies a capture issues, prepared once per layout.

The GPU staging copy needs a CUDA device to run, but which views it writes and which
tensors it reads are plain tensor bookkeeping: here they are built for CPU tensors and
the copies run on the CPU, byte for byte as the device would run them.
"""

from __future__ import annotations

import torch

from aiockpt._engine.layout import plan_layout
from aiockpt._engine.memory import StagingMemory
from aiockpt._engine.staging import Capturer


def mixed_tensors() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [
        torch.randn(5, 3),
        torch.arange(7, dtype=torch.int64),
        torch.randn(4).bfloat16(),
        torch.randn(2, 2),
        torch.tensor(True),
        torch.randn(3).bfloat16(),
    ]


def staged_bytes(buffer: torch.Tensor, offset: int, tensor: torch.Tensor) -> torch.Tensor:
    nbytes = tensor.numel() * tensor.element_size()
    return buffer[offset : offset + nbytes]


def test_device_staging_copies_one_group_per_dtype_into_the_layout() -> None:
    tensors = mixed_tensors()
    names = [f"t{i}" for i in range(len(tensors))]
    layout = plan_layout(tensors, names, chunk_bytes=1 << 20)
    device = torch.device("cpu")
    memory = StagingMemory(max_async=1)
    capturer = Capturer(layout, memory, {device: "gpu"})
    copies = capturer._gpu_destinations(device)
    # _foreach_copy_ batches a list only when every source has one dtype.
    assert len(copies) == len({t.dtype for t in tensors})
    for destinations, pick in copies:
        sources = pick(tensors)
        assert len({s.dtype for s in sources}) == 1
        torch._foreach_copy_(destinations, sources)
    start, _ = layout.device_span(device)
    buffer = memory.gpu_buffer(device, 0)
    for placement, tensor in zip(layout.tensors, tensors, strict=True):
        got = staged_bytes(buffer, placement.stream_offset - start, tensor)
        assert torch.equal(got, tensor.reshape(-1).view(torch.uint8)), placement.name
    # Prepared once: the next capture of this layout reuses the same views.
    assert capturer._gpu_destinations(device) is copies


def test_one_dtype_reads_the_table_itself() -> None:
    tensors = [torch.randn(3), torch.randn(2, 2)]
    layout = plan_layout(tensors, ["a", "b"], chunk_bytes=1 << 20)
    device = torch.device("cpu")
    capturer = Capturer(layout, StagingMemory(max_async=1), {device: "gpu"})
    [(_, pick)] = capturer._gpu_destinations(device)
    assert pick(tensors) is tensors
