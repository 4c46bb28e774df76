"""What a Checkpointer publishes about itself: per-chunk spans, staging and layout summaries.

Tools and tests read these instead of the Checkpointer's private fields; the last tests
here hold the package (and the tests) to that.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from conftest import Bag, make_config, run

import aiockpt
from aiockpt.metrics import ChunkSpan

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "aiockpt"
CHUNKS = 4
ELEMENTS = 1 << 16  # float32: 256 KiB per tensor


def four_tensors() -> Bag:
    return Bag({f"t{i}": torch.full((ELEMENTS,), float(i)) for i in range(CHUNKS)})


def data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name != "manifest.json")


# -- per-chunk spans -----------------------------------------------------------------------
def test_every_written_chunk_has_a_span_in_order_of_its_stages(tmp_path: Path) -> None:
    config = make_config(tmp_path, chunk_count=CHUNKS)
    with aiockpt.SyncCheckpointer(config, bag=four_tensors()) as ckpt:
        handle = ckpt.checkpoint(1)
        info = handle.wait()
        assert info is not None
        metrics = handle.metrics
    spans = metrics.chunk_spans
    assert [s.index for s in spans] == list(range(CHUNKS))
    assert all(isinstance(s, ChunkSpan) for s in spans)
    # Each span's bytes are its chunk's data file, as committed.
    assert [s.nbytes for s in spans] == [p.stat().st_size for p in data_files(info.path)]
    for span in spans:
        # CPU state is copied inside capture: no copy stage of its own.
        assert span.copy_started is None and span.copy_finished is None
        assert span.copy_seconds == 0.0
        # Measured from the capture's start: after the state_dict() calls, before the
        # commit that makes the checkpoint durable.
        assert metrics.state_dict_ms / 1e3 <= span.write_queued
        assert span.write_queued <= span.write_started <= span.write_finished
        assert span.write_finished <= metrics.persist_seconds
        assert span.queue_seconds >= 0 and span.write_seconds > 0
    first = min(s.write_started for s in spans)
    last = max(s.write_finished for s in spans)
    assert metrics.write_seconds == pytest.approx(last - first)


def test_one_writer_thread_shows_as_chunks_queueing_for_it(tmp_path: Path) -> None:
    config = make_config(tmp_path, chunk_count=CHUNKS, num_threads=1)
    with aiockpt.SyncCheckpointer(config, bag=four_tensors()) as ckpt:
        handle = ckpt.checkpoint(1)
        handle.wait()
    spans = sorted(handle.metrics.chunk_spans, key=lambda s: s.write_started)
    # One thread writes one chunk at a time: no write starts before the one ahead of it
    # ended, and none before its chunk was queued. (How long each waited depends on when
    # the loop queued it, so that is not asserted.)
    for before, after in itertools.pairwise(spans):
        assert after.write_started >= before.write_finished
    assert all(s.queue_seconds >= 0 for s in spans)


def test_spans_are_frozen_and_left_out_of_the_flat_record(tmp_path: Path) -> None:
    config = make_config(tmp_path, chunk_count=2)
    with aiockpt.SyncCheckpointer(config, bag=four_tensors()) as ckpt:
        handle = ckpt.checkpoint(1)
        handle.wait()
    span = handle.metrics.chunk_spans[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        span.nbytes = 0  # type: ignore[misc]
    record = handle.metrics.to_dict()
    assert "chunk_spans" not in record
    assert all(isinstance(v, (int, float, bool)) for v in record.values())


def test_a_skipped_checkpoint_has_no_spans(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_async=1, pinned_ratio=1.0, on_backpressure="skip")
    bag = four_tensors()
    with aiockpt.SyncCheckpointer(config, bag=bag) as ckpt:
        ckpt.checkpoint(1).wait()
        handles = [ckpt.checkpoint(step) for step in range(2, 12)]
        ckpt.wait()
    skipped = [h for h in handles if h.skipped]
    assert skipped, "ten requests into one in-flight place: some are skipped"
    assert all(h.metrics.chunk_spans == [] for h in skipped)
    assert all(h.metrics.chunk_spans for h in handles if not h.skipped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_staged_chunks_are_copied_before_they_are_written(tmp_path: Path) -> None:
    config = make_config(tmp_path, chunk_count=CHUNKS, staging="gpu")
    bag = Bag({f"t{i}": torch.full((ELEMENTS,), float(i), device="cuda") for i in range(4)})
    with aiockpt.SyncCheckpointer(config, bag=bag) as ckpt:
        handle = ckpt.checkpoint(1)
        handle.wait()
        staging = ckpt.staging
    assert staging is not None and staging.modes == {"cuda:0": "gpu"}
    assert staging.gpu_staging_bytes["cuda:0"] >= 4 * ELEMENTS * 4
    assert staging.pinned
    for span in handle.metrics.chunk_spans:
        assert span.copy_started is not None and span.copy_finished is not None
        assert 0 <= span.copy_started <= span.copy_finished <= span.write_queued
    assert handle.metrics.copy_seconds > 0


# -- staging and layout summaries ----------------------------------------------------------
def test_summaries_describe_what_the_first_checkpoint_set_up(tmp_path: Path) -> None:
    config = make_config(tmp_path, chunk_count=CHUNKS, pinned_ratio=2.0)
    with aiockpt.SyncCheckpointer(config, bag=four_tensors()) as ckpt:
        assert ckpt.staging is None and ckpt.layout is None  # nothing laid out yet
        info = ckpt.checkpoint(1).wait()
        assert info is not None
        layout, staging = ckpt.layout, ckpt.staging
    assert layout is not None and staging is not None
    files = data_files(info.path)
    assert layout.chunks == len(files) == CHUNKS
    assert layout.chunk_sizes == tuple(p.stat().st_size for p in files)
    assert layout.tensors == CHUNKS
    assert layout.nbytes == CHUNKS * ELEMENTS * 4 == info.nbytes
    assert layout.device_bytes == {"cpu": sum(layout.chunk_sizes)}
    assert staging.modes == {"cpu": "cpu"}
    assert staging.gpu_staging_bytes == {} and not staging.pinned
    # pinned_ratio = 2: whole chunks for two checkpoints, each buffer holding the largest.
    assert staging.host_buffers == 2 * CHUNKS
    assert staging.host_pool_bytes >= staging.host_buffers * max(layout.chunk_sizes)
    assert staging.in_flight == 0 and staging.host_buffers_free == staging.host_buffers
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.chunks = 1  # type: ignore[misc]


def test_the_layout_summary_follows_a_state_that_changes_shape(tmp_path: Path) -> None:
    bag = Bag({"w": torch.ones(1000)})
    config = make_config(tmp_path, chunk_count=1)

    async def main() -> tuple[aiockpt.LayoutSummary | None, aiockpt.LayoutSummary | None]:
        async with aiockpt.Checkpointer(config, bag=bag) as ckpt:
            await (await ckpt.checkpoint(1))
            before = ckpt.layout
            bag.state = {"w": torch.ones(3000), "b": torch.zeros(10, dtype=torch.int64)}
            await (await ckpt.checkpoint(2))
            return before, ckpt.layout

    before, after = run(main())
    assert before is not None and after is not None
    assert (before.tensors, before.nbytes) == (1, 4000)
    assert (after.tensors, after.nbytes) == (2, 12000 + 80)


def test_in_flight_counts_checkpoints_holding_staging_memory(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_async=2, pinned_ratio=2.0, chunk_count=2)
    bag = four_tensors()

    async def main() -> list[int]:
        seen = []
        async with aiockpt.Checkpointer(config, bag=bag) as ckpt:
            await (await ckpt.checkpoint(0))
            for step in range(1, 9):
                await ckpt.checkpoint(step)
                staging = ckpt.staging
                assert staging is not None
                seen.append(staging.in_flight)
            await ckpt.wait()
            staging = ckpt.staging
            assert staging is not None
            seen.append(staging.in_flight)
        return seen

    seen = run(main())
    assert max(seen) <= 2 and seen[-1] == 0
    assert max(seen) >= 1  # a checkpoint just captured is still in flight


def test_summaries_are_gone_after_close(tmp_path: Path) -> None:
    ckpt = aiockpt.SyncCheckpointer(make_config(tmp_path), bag=four_tensors())
    ckpt.checkpoint(1).wait()
    assert ckpt.staging is not None
    ckpt.close()
    assert ckpt.staging is None and ckpt.layout is None


def test_stats_count_the_captures_that_replayed_the_flattening(tmp_path: Path) -> None:
    bag = four_tensors()
    with aiockpt.SyncCheckpointer(make_config(tmp_path), bag=bag) as ckpt:
        for step in range(1, 5):
            ckpt.checkpoint(step).wait()
        replayed = ckpt.stats.replayed
        assert 1 <= replayed <= 3  # the first capture had nothing to replay
        bag.state = {"other": torch.ones(3)}  # a new structure: flattened afresh
        ckpt.checkpoint(5).wait()
        assert ckpt.stats.replayed == replayed


# -- nothing reaches into private fields -----------------------------------------------------
def _python_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py"))


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _is_module(dotted: list[str]) -> bool:
    target = ROOT.joinpath(*dotted)
    return target.with_suffix(".py").exists() or (target / "__init__.py").exists()


def _private_imports(path: Path, module: list[str] | None = None) -> list[str]:
    """Underscore names ``path`` (the module ``module``, by default where it lies) imports
    from an aiockpt module of another subpackage."""
    module = module or _module(path)
    package = module if path.name == "__init__.py" else module[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            source = package[: len(package) - (node.level - 1)] + (
                node.module.split(".") if node.module else []
            )
        elif node.module and node.module.split(".")[0] == "aiockpt":
            source = node.module.split(".")
        else:
            continue  # another library's names are its own business
        for alias in node.names:
            name = alias.name
            if not name.startswith("_") or name.startswith("__"):
                continue
            if _is_module([*source, name]):
                continue  # a private subpackage or module, imported by the layers above it
            # A module's private names are shared within its own subpackage only (and a
            # top-level module's with nobody).
            if source[:-1] == package and package != ["aiockpt"]:
                continue
            found.append(f"{path.name}:{node.lineno}: {name} from {'.'.join(source)}")
    return found


def _core_reaches(path: Path, allowed_on_self: bool) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "_core":
            on_self = isinstance(node.value, ast.Name) and node.value.id == "self"
            if not (allowed_on_self and on_self):
                found.append(f"{path.name}:{node.lineno}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "setattr", "hasattr"}
            and any(isinstance(a, ast.Constant) and a.value == "_core" for a in node.args)
        ):
            found.append(f"{path.name}:{node.lineno} ({node.func.id})")
    return found


def test_nothing_outside_the_checkpointer_touches_its_core() -> None:
    reaches = []
    for path in _python_files(PACKAGE, ROOT / "tests"):
        # The front-ends hold their core as self._core; nobody else reads it.
        own = path == PACKAGE / "checkpointer.py"
        reaches.extend(_core_reaches(path, allowed_on_self=own))
    assert reaches == [], "reach for the published metrics, stats and summaries instead"


def test_no_module_imports_another_subpackages_private_names() -> None:
    found = [line for path in _python_files(PACKAGE) for line in _private_imports(path)]
    assert found == [], "\n".join(found)


def test_the_checks_catch_a_reach_in(tmp_path: Path) -> None:
    # The checks must fail on what they forbid, or the tests above prove nothing.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from ..checkpointer import _FrontEnd\n"
        "from .._engine.pipeline import _span\n"
        "from .bench import _private_helper\n"  # its own subpackage: allowed
        "from .._engine import _private_module_name\n"
    )
    found = _private_imports(probe, ["aiockpt", "tools", "probe"])
    assert len(found) == 3, found
    assert "_FrontEnd" in found[0] and "_span" in found[1]
    # At the top level a module shares its private names with nobody.
    assert len(_private_imports(probe, ["aiockpt", "probe"])) == 4
    probe.write_text("def f(ckpt):\n    return ckpt._core, getattr(ckpt, '_core'), self._core\n")
    assert len(_core_reaches(probe, allowed_on_self=False)) == 3
    assert len(_core_reaches(probe, allowed_on_self=True)) == 2


# -- one Trainer body ------------------------------------------------------------------------
def _trainer_run(tmp_path: Path, blocking: bool) -> tuple[list[float], list[int], int, dict]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = make_config(tmp_path, interval_steps=3)
    batches = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(8)]

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).pow(2).mean()

    def args() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
        return model, optimizer, loss_fn

    if blocking:
        with aiockpt.SyncTrainer(*args(), config=config, grad_accumulation_steps=2) as trainer:
            start = trainer.resume()
            losses = [float(trainer.train_step(b)) for b in batches]
            trainer.checkpoint().wait()
            trainer.wait()
    else:

        async def main() -> tuple[int, list[float]]:
            async with aiockpt.Trainer(
                *args(), config=config, grad_accumulation_steps=2
            ) as trainer:
                start = await trainer.resume()
                losses = [float(await trainer.train_step(b)) for b in batches]
                await (await trainer.checkpoint())
                await trainer.wait()
                return start, losses

        start, losses = run(main())
    steps = [info.step for info in aiockpt.list_checkpoints(config.directory)]
    newest = aiockpt.load(config.directory / f"step-{steps[-1]}")
    return losses, steps, start, newest["model"]


def test_sync_and_async_trainers_run_the_same_body_to_the_same_checkpoints(
    tmp_path: Path,
) -> None:
    losses_a, steps_a, start_a, model_a = _trainer_run(tmp_path / "async", blocking=False)
    losses_s, steps_s, start_s, model_s = _trainer_run(tmp_path / "sync", blocking=True)
    assert start_a == start_s == 0
    assert losses_a == losses_s
    # Eight micro-batches, two per optimizer step: steps 1-4; the policy takes step 3,
    # the explicit checkpoint step 4.
    assert steps_a == steps_s == [3, 4]
    assert model_a.keys() == model_s.keys()
    assert all(torch.equal(model_a[k], model_s[k]) for k in model_a)
