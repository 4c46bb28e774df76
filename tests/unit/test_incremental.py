"""Incremental checkpoints: unchanged tensors are shared with the previous checkpoint, not
written again; detection is exact; shared files survive retention and prune; verify names
every checkpoint a damaged shared file belongs to; export is self-contained; tiers share
only within themselves; an older reader refuses the new format clearly."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_state_equal, clone_state

import aiockpt
from aiockpt._format import manifest as manifest_module
from aiockpt._format.manifest import MANIFEST_NAME, Manifest
from aiockpt.cli.main import main
from aiockpt.cli.verify import verify_checkpoints
from aiockpt.errors import CorruptCheckpointError
from aiockpt.storage.sharing import disk_usage


class Adapted(torch.nn.Module):
    """A frozen base (weights and a buffer that never change) and a small trained adapter."""

    def __init__(self, width: int = 256, rank: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(width, width)
        self.base.requires_grad_(False)
        self.register_buffer("table", torch.arange(width * 8, dtype=torch.int64))
        self.down = torch.nn.Linear(width, rank, bias=False)
        self.up = torch.nn.Linear(rank, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def frozen_bytes(model: Adapted) -> int:
    frozen = [*model.base.parameters(), model.table]
    return sum(t.numel() * t.element_size() for t in frozen)


def train(model: Adapted, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(4, model.base.in_features)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def manifest_of(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MANIFEST_NAME).read_bytes())


def shared_files(checkpoint: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.glob("data-*-s*.bin"))


def config(tmp_path: Path, **kw: Any) -> aiockpt.Config:
    kw.setdefault("directory", tmp_path / "ckpt")
    kw.setdefault("num_threads", 2)
    kw.setdefault("keep_last", None)
    kw.setdefault("chunk_size_mb", 0.25)  # several chunks, frozen and trained ones mixed
    return aiockpt.Config(**kw)


def run_steps(
    cfg: aiockpt.Config, model: Adapted, steps: range, **objects: Any
) -> dict[int, dict[str, Any]]:
    """Train and checkpoint each step; the model's state at each."""
    optimizer = torch.optim.AdamW([*model.down.parameters(), *model.up.parameters()])
    saved = {}
    metrics = {}
    with aiockpt.SyncCheckpointer(cfg, model=model, optimizer=optimizer, **objects) as ckpt:
        for step in steps:
            train(model, optimizer)
            saved[step] = clone_state(model.state_dict())
            handle = ckpt.checkpoint(step)
            handle.wait()
            metrics[step] = handle.metrics
    run_steps.metrics = metrics  # type: ignore[attr-defined]
    return saved


def test_a_frozen_base_is_shared_and_only_what_changed_is_written(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    model = Adapted()
    saved = run_steps(cfg, model, range(1, 5))
    metrics = run_steps.metrics  # type: ignore[attr-defined]
    root = tmp_path / "ckpt"
    # The first is written whole, in the format version it needs; later ones share.
    assert manifest_of(root / "step-1")["format_version"] == 1
    assert shared_files(root / "step-1") == []
    assert metrics[1].shared_bytes == 0
    for step in (2, 3, 4):
        assert manifest_of(root / f"step-{step}")["format_version"] == 4
        assert shared_files(root / f"step-{step}")
        assert metrics[step].shared_bytes >= frozen_bytes(model)
    # What each later checkpoint adds on disk is about what changed: the adapters and their
    # optimizer state (4 KiB blocks round each file's pieces up a little).
    changed = metrics[4].nbytes - metrics[4].shared_bytes
    usage = disk_usage([root / f"step-{step}" for step in range(1, 5)])
    assert usage[0][2] >= metrics[1].nbytes
    for _, _, added in usage[1:]:
        assert added <= 1.1 * changed + 4096 * 8
    for step in range(1, 5):
        state = aiockpt.load(root / f"step-{step}")
        assert_state_equal(state["model"], saved[step])


def test_changes_the_version_counter_misses_are_caught(tmp_path: Path) -> None:
    """In-place changes through .data and under no_grad: content decides, not _version."""
    cfg = config(tmp_path)
    model = Adapted()
    optimizer = torch.optim.AdamW([*model.down.parameters(), *model.up.parameters()])
    saved = {}
    with aiockpt.SyncCheckpointer(cfg, model=model, optimizer=optimizer) as ckpt:
        ckpt.checkpoint(1).wait()
        saved[1] = clone_state(model.state_dict())
        version = model.base.weight._version
        model.base.weight.data[3, 5] += 1.0  # .data: a new tensor, its own version counter
        assert model.base.weight._version == version
        ckpt.checkpoint(2).wait()
        saved[2] = clone_state(model.state_dict())
        with torch.no_grad():
            model.table.view(-1)[7] = -1  # under no_grad, in place
            model.base.bias.data.copy_(torch.ones_like(model.base.bias))
        ckpt.checkpoint(3).wait()
        saved[3] = clone_state(model.state_dict())
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        assert_state_equal(aiockpt.load(root / f"step-{step}")["model"], saved[step])
    fresh = Adapted()
    with aiockpt.SyncCheckpointer(cfg, model=fresh) as ckpt:
        assert ckpt.restore() == 3
    assert_state_equal(fresh.state_dict(), saved[3])


def test_incremental_false_writes_every_checkpoint_whole(tmp_path: Path) -> None:
    cfg = config(tmp_path, incremental=False)
    run_steps(cfg, Adapted(), range(1, 4))
    metrics = run_steps.metrics  # type: ignore[attr-defined]
    for step in (1, 2, 3):
        checkpoint = tmp_path / "ckpt" / f"step-{step}"
        assert shared_files(checkpoint) == []
        assert manifest_of(checkpoint)["format_version"] == 1
        assert metrics[step].shared_bytes == 0
        assert all(p.stat().st_nlink == 1 for p in checkpoint.glob("data-*.bin"))


def test_a_state_that_all_changes_keeps_the_old_format_version(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with aiockpt.SyncCheckpointer(cfg, model=model, optimizer=optimizer) as ckpt:
        for step in (1, 2, 3):
            model(torch.randn(2, 64)).sum().backward()
            optimizer.step()
            ckpt.checkpoint(step).wait()
    for step in (1, 2, 3):
        checkpoint = tmp_path / "ckpt" / f"step-{step}"
        assert manifest_of(checkpoint)["format_version"] == 1
        assert shared_files(checkpoint) == []


def test_retention_and_prune_never_delete_bytes_a_checkpoint_lists(tmp_path: Path) -> None:
    cfg = config(tmp_path, keep_last=1)
    saved = run_steps(cfg, Adapted(), range(1, 6))
    root = tmp_path / "ckpt"
    # The base was first written by step 1, which retention deleted long ago.
    assert sorted(p.name for p in root.glob("step-*")) == ["step-5"]
    assert any(name.endswith("-s1.bin") for name in shared_files(root / "step-5"))
    assert_state_equal(aiockpt.load(root / "step-5")["model"], saved[5])
    # More checkpoints, all kept, then pruned down to the newest by the command line.
    saved.update(run_steps(config(tmp_path, keep_last=None), Adapted(), range(6, 9)))
    assert main(["prune", str(root), "--keep-last", "1"]) == 0
    assert sorted(p.name for p in root.glob("step-*")) == ["step-8"]
    (verdict,) = verify_checkpoints([root / "step-8"])
    assert verdict.valid, verdict.problems


def test_a_damaged_shared_file_names_its_checkpoints_and_restore_falls_back(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)
    model = Adapted()
    optimizer = torch.optim.AdamW([*model.down.parameters(), *model.up.parameters()])
    saved = {}
    with aiockpt.SyncCheckpointer(cfg, model=model, optimizer=optimizer) as ckpt:
        for step in (1, 2, 3, 4):
            train(model, optimizer)
            if step == 2:  # the base changes once: steps 3 and 4 share what step 2 wrote
                with torch.no_grad():
                    model.base.weight.mul_(0.5)
            saved[step] = clone_state(model.state_dict())
            ckpt.checkpoint(step).wait()
    root = tmp_path / "ckpt"
    shared = [name for name in shared_files(root / "step-4") if name.endswith("-s2.bin")]
    assert shared
    damaged = root / "step-4" / shared[0]
    # A byte that step 4 reads from the shared file (the middle of one of its pieces there).
    raw = (root / "step-4" / MANIFEST_NAME).read_bytes()
    pieces = [
        piece
        for record in Manifest.parse(raw, "step-4").tensors
        for piece in record.pieces
        if piece.file == shared[0]
    ]
    at = pieces[0].offset + pieces[0].length // 2
    with open(damaged, "r+b") as file:  # really corrupted, in place: every link sees it
        file.seek(at)
        byte = file.read(1)
        file.seek(at)
        file.write(bytes([byte[0] ^ 0xFF]))
    verdicts = verify_checkpoints([root / f"step-{step}" for step in (1, 2, 3, 4)])
    assert [v.valid for v in verdicts] == [True, False, False, False]
    (problem, *_) = verdicts[3].problems
    assert problem.file == shared[0]
    assert set(problem.shared_with) == {"step-2", "step-3"}
    assert "step-2, step-3" in problem.describe()
    # The command names them too.
    assert main(["verify", str(root / "step-4")]) == 1
    fresh = Adapted()
    with aiockpt.SyncCheckpointer(cfg, model=fresh) as ckpt:
        assert ckpt.restore() == 1  # the newest whole checkpoint
    assert_state_equal(fresh.state_dict(), saved[1])


def test_an_older_reader_refuses_shared_files_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_steps(config(tmp_path), Adapted(), range(1, 3))
    raw = (tmp_path / "ckpt" / "step-2" / MANIFEST_NAME).read_bytes()
    assert Manifest.parse(raw, "step-2").step == 2
    # A reader of version 3 refuses by the version, and says to upgrade.
    monkeypatch.setattr(manifest_module, "FORMAT_VERSION", 3)
    with pytest.raises(CorruptCheckpointError, match=r"format_version 4 is newer.*upgrade"):
        Manifest.parse(raw, "step-2")
    monkeypatch.undo()
    # A manifest that claims an older version may not list shared files.
    import crc32c

    document = json.loads(raw)
    del document["manifest_crc32c"]
    document["format_version"] = 3
    canonical = json.dumps(document, separators=(",", ":")).encode()
    document["manifest_crc32c"] = crc32c.crc32c(canonical)
    forged = json.dumps(document, separators=(",", ":")).encode()
    with pytest.raises(CorruptCheckpointError, match=r"-s1\.bin.*not a unique data file"):
        Manifest.parse(forged, "step-2")
    # A version 4 manifest may not name anything outside its directory either.
    for name in ("../step-1/data-r00000-c00000.bin", "data-r00000-c00000-s1.bin/x", "/etc/x"):
        document = json.loads(raw)
        del document["manifest_crc32c"]
        document["files"][0]["name"] = name
        canonical = json.dumps(document, separators=(",", ":")).encode()
        document["manifest_crc32c"] = crc32c.crc32c(canonical)
        hostile = json.dumps(document, separators=(",", ":")).encode()
        with pytest.raises(CorruptCheckpointError, match="names may not contain paths"):
            Manifest.parse(hostile, "step-2")


def test_export_is_self_contained(tmp_path: Path) -> None:
    saved = run_steps(config(tmp_path), Adapted(), range(1, 4))
    root = tmp_path / "ckpt"
    out = tmp_path / "state.pt"
    assert main(["export", str(root / "step-3"), "--to", "torch", str(out)]) == 0
    for checkpoint in root.glob("step-*"):
        for file in checkpoint.iterdir():
            file.unlink()
    exported = torch.load(out, weights_only=True)
    assert_state_equal(exported["model"], saved[3])


def test_ls_and_inspect_show_logical_and_physical_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_steps(config(tmp_path), Adapted(), range(1, 4))
    root = tmp_path / "ckpt"
    capsys.readouterr()
    assert main(["ls", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["step"]: row for row in report["checkpoints"]}
    assert rows[1]["physical_bytes"] >= rows[1]["logical_bytes"]
    assert rows[3]["physical_bytes"] < rows[3]["logical_bytes"] / 4
    assert report["physical_bytes"] == sum(row["physical_bytes"] for row in rows.values())
    assert main(["inspect", str(root / "step-3"), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["logical_bytes"] == rows[3]["logical_bytes"]
    assert 0 < described["shared_bytes"] <= described["physical_bytes"]
    assert main(["ls", str(root)]) == 0
    assert "on disk" in capsys.readouterr().out


def test_a_tier_shares_only_within_itself(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        interval_steps=2,
        keep_last=2,
        memory={"directory": str(tmp_path / "shm"), "keep_last": 2},
    )
    memory, primary = tmp_path / "shm", tmp_path / "ckpt"
    model = Adapted()
    optimizer = torch.optim.AdamW([*model.down.parameters(), *model.up.parameters()])
    saved = {}
    with aiockpt.SyncCheckpointer(cfg, model=model, optimizer=optimizer) as ckpt:
        for step in range(1, 7):
            train(model, optimizer)
            saved[step] = clone_state(model.state_dict())
            ckpt.checkpoint(step).wait()
        ckpt.wait()
        # The memory tier (the entry) shares within itself ...
        assert shared_files(memory / "step-6")
        memory_inodes = {
            (p.stat().st_dev, p.stat().st_ino)
            for c in memory.glob("step-*")
            for p in c.glob("data-*.bin")
        }
        # ... and the primary holds every byte its checkpoints need, in files of its own;
        # a promotion shares with the primary's previous checkpoint what it holds already.
        newest, previous = primary / "step-6", primary / "step-4"
        common = [n for n in shared_files(newest) if (previous / n).exists()]
        assert common and all((newest / n).samefile(previous / n) for n in common)
        for checkpoint in primary.glob("step-*"):
            for file in checkpoint.glob("data-*.bin"):
                assert (file.stat().st_dev, file.stat().st_ino) not in memory_inodes
            (verdict,) = verify_checkpoints([checkpoint])
            assert verdict.valid, verdict.problems
            step = int(checkpoint.name[5:])
            assert_state_equal(aiockpt.load(checkpoint)["model"], saved[step])


def test_a_changed_layout_is_written_whole(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    model = Adapted()
    extra = {"values": torch.zeros(3)}

    class Extra:
        def state_dict(self) -> dict[str, Any]:
            return dict(extra)

        def load_state_dict(self, state: dict[str, Any]) -> None:
            extra.update(state)

    with aiockpt.SyncCheckpointer(cfg, model=model, extra=Extra()) as ckpt:
        ckpt.checkpoint(1).wait()
        ckpt.checkpoint(2).wait()
        extra["more"] = torch.ones(5)  # a new tensor: another layout
        ckpt.checkpoint(3).wait()
        ckpt.checkpoint(4).wait()
    root = tmp_path / "ckpt"
    assert shared_files(root / "step-2") and not shared_files(root / "step-3")
    assert shared_files(root / "step-4")
    assert torch.equal(aiockpt.load(root / "step-4")["extra"]["more"], torch.ones(5))


def test_partial_restore_reads_shared_files(tmp_path: Path) -> None:
    saved = run_steps(config(tmp_path), Adapted(), range(1, 3))
    fresh = Adapted()
    with torch.no_grad():
        for tensor in fresh.state_dict().values():
            tensor.zero_()
    with aiockpt.SyncCheckpointer(config(tmp_path), model=fresh) as ckpt:
        assert ckpt.restore(layers=r"model/base") == 2
    state = fresh.state_dict()
    assert torch.equal(state["base.weight"], saved[2]["base.weight"])
    assert not state["down.weight"].any()  # not asked for, not read


def test_hard_links_are_refused_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without hard links: every checkpoint is written whole, and is exact."""

    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    saved = run_steps(config(tmp_path), Adapted(), range(1, 3))
    checkpoint = tmp_path / "ckpt" / "step-2"
    assert shared_files(checkpoint) == []
    assert manifest_of(checkpoint)["format_version"] == 1
    assert_state_equal(aiockpt.load(checkpoint)["model"], saved[2])


def test_the_lora_preset_trains_its_adapters_only_and_checkpoints_them_alone(
    tmp_path: Path,
) -> None:
    import dataclasses

    from aiockpt.tools.workloads import PRESETS, build_model, make_step

    lora, base = PRESETS["lora"], PRESETS["1.3b"]
    assert lora.lora_rank == 16
    assert (lora.d_model, lora.layers, lora.heads, lora.vocab) == (
        base.d_model,
        base.layers,
        base.heads,
        base.vocab,
    )
    # The same structure at a tiny scale, on the CPU.
    preset = dataclasses.replace(PRESETS["tiny"], lora_rank=4)
    cpu = torch.device("cpu")
    model, optimizer, _ = build_model(preset, cpu)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert trained and all(p.requires_grad for p in trained)
    # Four adapted projections per block, two adapter matrices each.
    assert len(trained) == preset.layers * 4 * 2
    frozen = [p for p in model.parameters() if not p.requires_grad]
    step = make_step(model, optimizer, preset, cpu)
    before = clone_state(model.state_dict())
    step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(
        ".parametrizations." in k and k.endswith((".up", ".down")) for k in changed
    )
    cfg = config(tmp_path)
    with aiockpt.SyncCheckpointer(cfg, model=model, optimizer=optimizer) as ckpt:
        ckpt.checkpoint(1).wait()
        step()
        handle = ckpt.checkpoint(2)
        handle.wait()
    assert handle.metrics.shared_bytes >= sum(p.numel() * p.element_size() for p in frozen)


def test_kept_manifest_text_with_shared_files_and_digests_is_a_full_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_manifest_writer import _fields, _in_full

    from aiockpt._format.writer import ManifestWriter

    fields = _fields(tmp_path, monkeypatch)  # the second checkpoint: it shares files
    assert fields["shared"] is not None and fields["digests"] is not None
    writer = ManifestWriter()
    assert writer.encode(**fields) == _in_full(fields)
    digests = {key: f"{hash(key) % 2**64:064x}" for key in fields["digests"]}
    later = dict(fields, step=7, digests=digests)
    payload = writer.encode(**later)
    assert payload == _in_full(later)
    parsed = Manifest.parse(payload, "manifest")
    assert sorted(p.digest for t in parsed.tensors for p in t.pieces) == sorted(digests.values())
    bad = dict(later, digests={key: "X" * 64 for key in digests})
    with pytest.raises(aiockpt.errors.UnsupportedStateError, match="sha256"):
        writer.encode(**bad)


def test_a_resumed_run_shares_with_the_checkpoint_it_restored(tmp_path: Path) -> None:
    cfg = config(tmp_path, keep_last=2)
    run_steps(cfg, Adapted(), range(1, 3))
    model = Adapted()
    optimizer = torch.optim.AdamW([*model.down.parameters(), *model.up.parameters()])
    with aiockpt.SyncCheckpointer(cfg, model=model, optimizer=optimizer) as ckpt:
        assert ckpt.restore() == 2
        train(model, optimizer)
        handle = ckpt.checkpoint(3)
        handle.wait()
        assert handle.metrics.shared_bytes >= frozen_bytes(model)
        model.base.weight.data[0, 0] = 123.0  # unseen by the version counter
        expected = clone_state(model.state_dict())
        ckpt.checkpoint(4).wait()
    root = tmp_path / "ckpt"
    assert any(name.endswith("-s1.bin") for name in shared_files(root / "step-3"))
    assert_state_equal(aiockpt.load(root / "step-4")["model"], expected)
    # Restored from an older step: the next checkpoint compares with that one.
    fresh = Adapted()
    fresh_optimizer = torch.optim.AdamW([*fresh.down.parameters(), *fresh.up.parameters()])
    with aiockpt.SyncCheckpointer(cfg, model=fresh, optimizer=fresh_optimizer) as ckpt:
        assert ckpt.restore(step=3) == 3
        handle = ckpt.checkpoint(5)
        handle.wait()
        assert handle.metrics.shared_bytes > 0
    assert_state_equal(aiockpt.load(root / "step-5")["model"], fresh.state_dict())


def test_tensors_that_keep_changing_are_written_without_hashing_until_a_probe(
    tmp_path: Path,
) -> None:
    from aiockpt._engine.incremental import PROBE_EVERY, SKIP_AFTER

    cfg = config(tmp_path)
    values = {"moving": torch.zeros(4096), "still": torch.arange(4096.0)}

    class Holder:
        def state_dict(self) -> dict[str, Any]:
            return dict(values)

        def load_state_dict(self, state: dict[str, Any]) -> None:
            values.update(state)

    def digests(step: int) -> dict[str, bool]:
        document = manifest_of(tmp_path / "ckpt" / f"step-{step}")
        return {
            t["name"].rsplit("/", 1)[-1]: all("sha256" in p for p in t["pieces"])
            for t in document["tensors"]
        }

    steps = range(1, PROBE_EVERY + 4)
    with aiockpt.SyncCheckpointer(cfg, holder=Holder()) as ckpt:
        for step in steps:
            if step <= PROBE_EVERY + 1:
                values["moving"].fill_(float(step))  # changes until just after the probe
            ckpt.checkpoint(step).wait()
    seen = {step: digests(step) for step in steps}
    assert all(seen[step]["still"] for step in steps)  # never changed: always compared
    hashed = [step for step in steps if seen[step]["moving"]]
    # Hashed while its changes are counted, then not, then again at the probe (the
    # PROBE_EVERY-th checkpoint) and after it, until it is found unchanged and shared.
    assert hashed[: SKIP_AFTER + 1] == list(range(1, SKIP_AFTER + 2))
    assert SKIP_AFTER + 2 not in hashed and PROBE_EVERY in hashed
    last = tmp_path / "ckpt" / f"step-{steps[-1]}"
    assert shared_files(last)
    for step in steps:
        state = aiockpt.load(tmp_path / "ckpt" / f"step-{step}")["holder"]
        assert torch.equal(state["moving"], torch.full((4096,), float(min(step, PROBE_EVERY + 1))))
        assert torch.equal(state["still"], torch.arange(4096.0))


_RANK_WORKER = """
import sys, torch, torch.distributed as dist, aiockpt
dist.init_process_group("gloo")
rank = dist.get_rank()
tables = {"a": torch.arange(64 * 1024.0), "b": torch.arange(32 * 1024) * 3}
values = {"value": torch.zeros(4096)}

class Frozen:
    def state_dict(self):
        return dict(tables)
    def load_state_dict(self, state):
        tables.update(state)

class Mine:
    def state_dict(self):
        return dict(values)
    def load_state_dict(self, state):
        values.update(state)

config = aiockpt.Config(directory=sys.argv[1], keep_last=None, num_threads=2)
with aiockpt.SyncCheckpointer(config, frozen=aiockpt.Replicated(Frozen()), mine=Mine()) as ck:
    for step in (1, 2, 3):
        values["value"].fill_(rank * 100 + step)
        handle = ck.checkpoint(step)
        handle.wait()
        print(step, handle.metrics.shared_bytes, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_every_rank_shares_its_own_unchanged_files(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = tmp_path / "ckpt"
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_WORKER, str(directory)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=180) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    # Each rank shared the frozen tensors it wrote itself, from the second checkpoint on.
    shared = [dict(line.split() for line in out.split("\n") if line) for out, _ in outputs]
    assert [s["1"] for s in shared] == ["0", "0"]
    assert all(int(s["2"]) > 0 and int(s["3"]) > 0 for s in shared)
    newest = directory / "step-3"
    assert manifest_of(newest)["format_version"] == 4
    assert {name[:11] for name in shared_files(newest)} == {"data-r00000", "data-r00001"}
    (verdict,) = verify_checkpoints([newest])
    assert verdict.valid, verdict.problems
    for rank in (0, 1):
        state = aiockpt.load(newest, rank=rank)
        assert torch.equal(state["mine"]["value"], torch.full((4096,), rank * 100 + 3.0))
        assert torch.equal(state["frozen"]["a"], torch.arange(64 * 1024.0))
        assert torch.equal(state["frozen"]["b"], torch.arange(32 * 1024) * 3)
