"""Chunk writes: around the page cache where the filesystem allows it, byte-exact either way."""

from __future__ import annotations

import os

import pytest
import torch

import aiockpt.storage.fileio as fileio
from aiockpt._engine.memory import byte_view


def _aligned_buffer(nbytes: int) -> torch.Tensor:
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
    start = (-raw.data_ptr()) % 4096
    buffer = raw[start : start + nbytes]
    buffer.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    return buffer


@pytest.mark.parametrize("size", [1, 4096, 5000, 3 * 4096 + 17])
@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_write_pieces_is_byte_exact_with_or_without_o_direct(tmp_path, monkeypatch, size, where):
    directory = tmp_path if where == "tmp_path" else where
    if not os.path.isdir(directory):
        pytest.skip(f"{directory} does not exist here")
    attempts: list[str] = []
    direct = fileio._write_direct
    monkeypatch.setattr(fileio, "_write_direct", lambda *a: (attempts.append(a[0]), direct(*a)))
    buffer = _aligned_buffer(4 * 4096)
    path = os.path.join(directory, f"aiockpt-test-{os.getpid()}-{size}.bin")
    try:
        sums = fileio.write_pieces(
            path, byte_view(buffer, size), [(0, size), (0, 1)], durable=True, room=byte_view(buffer)
        )
        with open(path, "rb") as file:
            written = file.read()
    finally:
        if os.path.exists(path):
            os.unlink(path)
    assert written == bytes(byte_view(buffer, size))  # the block padding was cut off again
    assert sums == [fileio.checksum(written), fileio.checksum(written[:1])]
    assert attempts == [path]  # O_DIRECT was tried; tmpfs refuses it and falls back


def test_unaligned_or_not_durable_writes_use_the_page_cache(tmp_path, monkeypatch):
    attempts: list[str] = []
    monkeypatch.setattr(fileio, "_write_direct", lambda *a: attempts.append(a[0]))
    buffer = _aligned_buffer(8192)
    fileio.write_pieces(
        str(tmp_path / "a"), byte_view(buffer, 100), [], durable=False, room=byte_view(buffer)
    )
    fileio.write_pieces(
        str(tmp_path / "b"),
        byte_view(buffer[1:], 100),
        [],
        durable=True,
        room=byte_view(buffer[1:]),
    )
    fileio.write_pieces(str(tmp_path / "c"), byte_view(buffer, 100), [], durable=True)
    assert attempts == []
    for name in "abc":
        assert (tmp_path / name).stat().st_size == 100
