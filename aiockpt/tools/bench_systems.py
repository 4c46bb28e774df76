"""The systems ``aiockpt bench`` sets side by side, and the training round that runs one.

Every system checkpoints the same ``{"model": ..., "optimizer": ...}`` state the way its
documentation recommends:

- ``none``: no checkpoint at all, the throughput everything else is held against;
- ``torch.save``: blocking; written to a temporary file, fsync'd, renamed over the last;
- ``dcp``: ``torch.distributed.checkpoint.async_save`` with one reused
  ``FileSystemWriter(thread_count=N, cache_staged_state_dict=True)`` (the staged copy is
  pinned memory, kept between saves), waiting on the previous save's future before the
  next one, as its docs show; two directories take turns, so no deletion runs on the
  training thread;
- ``aiockpt-<staging>``: a SyncCheckpointer with ``keep_last = 1``.
- ``aiockpt-<staging>-tiered`` (``--systems tiered``): the same with a shared-memory tier:
  every checkpoint is written to /dev/shm and every ``TIERED_PRIMARY_EVERY``-th is copied
  on to the disk, so its restore reads RAM.

The stall of a checkpoint is the time the training thread spent in it: the whole save for
torch.save, the wait on the previous save plus ``async_save`` for DCP, ``checkpoint()``
for aiockpt.
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._util.console import CliError
from .._util.location import local_directory
from ..checkpointer import SyncCheckpointer, SyncCheckpointHandle
from ..config import Config
from ..storage.local import list_checkpoints
from .bench_memory import MemoryMark, tensor_bytes
from .workloads import Workload, sync

__all__ = [
    "AiockptSystem",
    "CheckpointRecord",
    "DcpSystem",
    "NoCheckpoint",
    "System",
    "TieredSystem",
    "TorchSave",
    "drop_page_cache",
    "restore_timed",
    "train_round",
    "warm_up",
]


@dataclass
class CheckpointRecord:
    """One checkpoint as the training thread saw it, completed once it is durable."""

    at: int  # index of the step it came before, in its round (-1: the warm-up)
    stall_s: float  # the training thread blocked by the checkpoint
    wait_s: float = 0.0  # of which waiting for an earlier save (dcp)
    skipped: bool = False
    persist_s: float | None = None  # from the call to durable
    detail: dict[str, float] = field(default_factory=dict)  # aiockpt's own breakdown

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class System:
    """A way of checkpointing the workload; subclasses override what they do."""

    name = "none"
    checkpoints = False
    warm = False  # whether a first checkpoint pays a one-time cost worth taking out

    def __init__(self, workload: Workload, directory: Path) -> None:
        self.workload = workload
        self.directory = directory
        self.number = 0  # checkpoints taken, warm-up included: the next one's step

    def settings(self) -> dict[str, Any]:
        return {}

    def checkpoint(self, at: int) -> CheckpointRecord:
        raise NotImplementedError

    def busy(self) -> bool:
        """Whether a checkpoint is still on its way to disk."""
        return False

    def drain(self) -> None:
        """Wait until everything in flight is durable, and complete its records."""

    def files(self) -> list[Path]:
        return [p for p in self.directory.rglob("*") if p.is_file()]

    def discard(self) -> None:
        """Delete what is on disk (with nothing in flight); keeps the disk from filling."""

    def restore(self) -> None:
        raise NotImplementedError

    def staging_bytes(self) -> tuple[int, bool] | None:
        """Host staging memory the system keeps between checkpoints, and if it is pinned."""
        return None

    def close(self) -> None:
        pass

    def _state(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.workload.state().items()}

    def _load(self, state: dict[str, Any]) -> None:
        for name, obj in self.workload.state().items():
            obj.load_state_dict(state[name])


class NoCheckpoint(System):
    def restore(self) -> None:  # pragma: no cover - never asked: it saves nothing
        raise AssertionError("nothing to restore")


class TorchSave(System):
    name = "torch.save"
    checkpoints = True

    def __init__(self, workload: Workload, directory: Path) -> None:
        super().__init__(workload, directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "checkpoint.pt"

    def checkpoint(self, at: int) -> CheckpointRecord:
        start = time.perf_counter()
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "wb") as f:
            torch.save(self._state(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)
        self.number += 1
        stall = time.perf_counter() - start
        return CheckpointRecord(at, stall, persist_s=stall)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)

    def restore(self) -> None:
        self._load(torch.load(self.path, map_location="cpu", weights_only=True))


def _dcp_writer_class() -> Any:
    try:
        import torch.distributed.checkpoint as dcp
    except ImportError as exc:
        raise _dcp_missing(f"torch.distributed.checkpoint cannot be imported: {exc}") from exc
    writer = getattr(dcp, "FileSystemWriter", None)
    if writer is None or not hasattr(dcp, "async_save"):
        raise _dcp_missing(f"torch {torch.__version__} has no dcp.async_save/FileSystemWriter")
    accepted = inspect.signature(writer.__init__).parameters
    missing = [k for k in ("thread_count", "cache_staged_state_dict") if k not in accepted]
    if missing:
        raise _dcp_missing(
            f"torch {torch.__version__}'s FileSystemWriter takes no {' or '.join(missing)}, "
            "which the dcp baseline's documented best setting needs"
        )
    return writer


def _dcp_missing(message: str) -> CliError:
    return CliError(
        message, hint="use torch 2.4 or later, or leave dcp out: --systems none,torch.save,aiockpt"
    )


class DcpSystem(System):
    name = "dcp"
    checkpoints = True
    warm = True

    def __init__(self, workload: Workload, directory: Path, threads: int) -> None:
        super().__init__(workload, directory)
        writer_class = _dcp_writer_class()
        # DCP warns at every save that no process group exists (one process is what is
        # measured) and when a save replaces an older one's files (the slots take turns).
        # Saves warn from DCP's own thread, so only a process-wide filter silences them.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
        self.slots = [directory / "a", directory / "b"]
        # The cache is pinned memory, and pinning needs CUDA; on the CPU the staged copy
        # is plain memory, allocated at every save.
        self.cached = torch.cuda.is_available()
        self.threads = threads
        self.writer = writer_class(
            self.slots[0], thread_count=threads, cache_staged_state_dict=self.cached
        )
        self._future: Future[Any] | None = None
        self._record: CheckpointRecord | None = None
        self._slot: Path | None = None
        self._started = 0.0
        self._finished: float | None = None
        self.last: Path | None = None  # the newest durable checkpoint

    def settings(self) -> dict[str, Any]:
        return {"thread_count": self.threads, "cache_staged_state_dict": self.cached}

    def checkpoint(self, at: int) -> CheckpointRecord:
        import torch.distributed.checkpoint as dcp

        start = time.perf_counter()
        self._settle()  # the staged copy is reused: the previous save must be done first
        self._started = time.perf_counter()
        waited = self._started - start
        self._finished = None
        self._slot = self.slots[self.number % 2]
        response = dcp.async_save(
            self._state(), storage_writer=self.writer, checkpoint_id=self._slot
        )
        # Newer torch may hand back staging and upload futures; the upload one is durable.
        future: Future[Any] = getattr(response, "upload_completion", response)  # type: ignore[arg-type]
        future.add_done_callback(self._mark_finished)
        self._future = future
        self.number += 1
        self._record = CheckpointRecord(at, time.perf_counter() - start, wait_s=waited)
        return self._record

    def _mark_finished(self, _: Future[Any]) -> None:
        self._finished = time.perf_counter()

    def _settle(self) -> None:
        """Wait for the save in flight, if any, and complete its record."""
        if self._future is None:
            return
        self._future.result()
        record, self._future = self._record, None
        assert record is not None
        # result() can return a moment before the done-callback has run; its time is the
        # moment the save finished, so give it that moment.
        deadline = time.perf_counter() + 1.0
        while self._finished is None and time.perf_counter() < deadline:
            time.sleep(1e-4)
        record.persist_s = (self._finished or time.perf_counter()) - self._started
        self.last = self._slot

    def busy(self) -> bool:
        return self._future is not None and not self._future.done()

    def drain(self) -> None:
        self._settle()

    def discard(self) -> None:
        for slot in self.slots:
            shutil.rmtree(slot, ignore_errors=True)
        self.last = None

    def restore(self) -> None:
        import torch.distributed.checkpoint as dcp

        assert self.last is not None, "restore() before any checkpoint"
        state = self._state()
        dcp.load(state, checkpoint_id=self.last)  # in place, into the state_dict's tensors
        self._load(state)

    def staging_bytes(self) -> tuple[int, bool] | None:
        cache = getattr(self.writer, "state_dict_cache", None)
        if cache is None:
            return None
        return tensor_bytes(cache), tensor_bytes(cache, pinned_only=True) > 0


class AiockptSystem(System):
    checkpoints = True
    warm = True

    def __init__(self, workload: Workload, directory: Path, staging: str, config: Config) -> None:
        super().__init__(workload, directory)
        self.staging = staging
        self.name = f"aiockpt-{staging}" + ("" if config.use_monitor else "-direct")
        # "cpu" is what host staging does with CPU tensors; Config calls it "host".
        self.config = config.replace(
            directory=directory, staging="host" if staging == "cpu" else staging, keep_last=1
        )
        self.ckpt = SyncCheckpointer(self.config, **workload.state())
        self._pending: list[tuple[SyncCheckpointHandle, CheckpointRecord]] = []

    def settings(self) -> dict[str, Any]:
        return self.config.to_dict()

    def checkpoint(self, at: int) -> CheckpointRecord:
        start = time.perf_counter()
        handle = self.ckpt.checkpoint(self.number)
        stall = time.perf_counter() - start
        self.number += 1
        m = handle.metrics
        record = CheckpointRecord(
            at,
            stall,
            skipped=handle.skipped,
            detail={
                "state_dict_ms": m.state_dict_ms,
                "staging_ms": m.staging_ms,
                "queue_wait_ms": m.queue_wait_ms,
            },
        )
        if not handle.skipped:
            self._pending.append((handle, record))
        return record

    def busy(self) -> bool:
        return any(not handle.done() for handle, _ in self._pending)

    def drain(self) -> None:
        self.ckpt.wait()
        for handle, record in self._pending:
            handle.wait()  # raises what went wrong in the background, if anything did
            m = handle.metrics
            record.persist_s = m.persist_seconds
            record.detail["write_gbps"] = m.write_gbps
            if m.copy_seconds:  # CPU state has no separate copy stage
                record.detail["copy_gbps"] = m.copy_gbps
        self._pending.clear()

    def discard(self) -> None:
        # Retention lists the directory afresh each time, so removing committed
        # checkpoints behind the checkpointer's back leaves it consistent.
        for info in list_checkpoints(self.directory):
            shutil.rmtree(info.path, ignore_errors=True)

    def files(self) -> list[Path]:
        # The bench writes to a local directory: every path listed is local.
        listed = list_checkpoints(self.directory)
        return [p for info in listed for p in local_directory(info.path).iterdir()]

    def restore(self) -> None:
        if self.ckpt.restore() is None:
            raise RuntimeError(f"{self.name}: no committed checkpoint in {self.directory}")

    def staging_bytes(self) -> tuple[int, bool] | None:
        staging = self.ckpt.staging
        if staging is None:  # nothing checkpointed yet: no pool sized
            return None
        return staging.host_pool_bytes, staging.pinned

    def close(self) -> None:
        self.ckpt.close()


# A tiered system copies every this many checkpoints on from memory to the disk: with
# --checkpoint-interval 5, the memory tier every 5 steps and the disk every 50.
TIERED_PRIMARY_EVERY = 10


class TieredSystem(AiockptSystem):
    def __init__(self, workload: Workload, directory: Path, staging: str, config: Config) -> None:
        tiered = config.replace(memory={"keep_last": 1}, interval_steps=TIERED_PRIMARY_EVERY)
        super().__init__(workload, directory, staging, tiered)
        self.name += "-tiered"
        self.memory = Path(self.ckpt.stats.tiers["memory"].location)

    def discard(self) -> None:
        super().discard()
        for info in list_checkpoints(self.memory):
            shutil.rmtree(info.path, ignore_errors=True)

    def files(self) -> list[Path]:
        # The memory tier is a local directory: its checkpoints are local paths.
        in_memory = [
            p for info in list_checkpoints(self.memory) for p in Path(str(info.path)).iterdir()
        ]
        return super().files() + in_memory

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.memory, ignore_errors=True)  # the bench's own: nothing to resume


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Evict the files' pages, so a restore reads the disk as after a crash or reboot."""
    for path in paths:
        # Written and fsync'd pages are clean, so DONTNEED evicts them.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_up(system: System, device: torch.device) -> dict[str, Any]:
    """The first checkpoint, which allocates (and pins) what later ones reuse."""
    mark = MemoryMark.take()
    result: dict[str, Any] = {"first_checkpoint": None}
    if system.warm:
        start = time.perf_counter()
        record = system.checkpoint(at=-1)
        system.drain()
        sync(device)
        result["first_checkpoint"] = {
            "stall_s": record.stall_s,
            "durable_s": time.perf_counter() - start,
        }
        system.discard()
    result["memory"] = mark.since()
    staging = system.staging_bytes()
    result["staging_bytes"], result["staging_pinned"] = staging or (None, None)
    return result


def train_round(
    system: System, workload: Workload, *, steps: int, interval: int, device: torch.device
) -> dict[str, Any]:
    """``steps`` training steps with a checkpoint before every ``interval``-th, timed.

    Checkpoints come before steps 0, interval, 2 x interval ..., so each one has a whole
    interval of training inside the round to persist behind. Every step is timed to its
    end on the training stream, the way a loop that logs its loss is.
    """
    mark = MemoryMark.take()
    step_s: list[float] = []
    checkpoint_at: list[int] = []
    persisting: list[int] = []
    records: list[CheckpointRecord] = []
    sync(device)
    start = last = time.perf_counter()
    for i in range(steps):
        if system.checkpoints and i % interval == 0:
            records.append(system.checkpoint(at=i))
            checkpoint_at.append(i)
        busy = system.busy()
        workload.step()
        sync(device)
        now = time.perf_counter()
        step_s.append(now - last)
        last = now
        if busy or system.busy():
            persisting.append(i)
    elapsed = last - start
    system.drain()
    drained = time.perf_counter() - last
    return {
        "elapsed_s": elapsed,
        "samples_per_second": steps * workload.samples_per_step / elapsed,
        "step_ms": [s * 1e3 for s in step_s],
        "checkpoint_at": checkpoint_at,
        "persisting": persisting,
        "checkpoints": [r.to_dict() for r in records],
        "drain_s": drained,
        "memory": mark.since(),
    }


def restore_timed(system: System, device: torch.device) -> float:
    drop_page_cache(system.files())
    sync(device)
    start = time.perf_counter()
    system.restore()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def cold_starts(
    makers: list[Callable[[], System]],
    workload: Workload,
    *,
    steps: int,
    interval: int,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Seconds from making each system to reaching ``steps`` steps, its set-up included.

    What a run loses to checkpointing from its first moment: making the system (aiockpt
    starts pinning its pool there), a first checkpoint right away, then one every
    ``interval`` steps. No checkpoint is waited for at the end: training would go on.
    "none" (when measured) runs first and last, so that its two times show how much the
    machine drifts over the phase: a difference from it smaller than that drift is noise.
    """
    names = [_system_name(make) for make in makers]
    order = list(range(len(makers)))
    if "none" in names:
        first = names.index("none")
        order = [first, *(i for i in order if i != first), first]
    times: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    for index in order:
        sync(device)
        start = time.perf_counter()
        system: System | None = None
        try:
            system = makers[index]()
            result = train_round(system, workload, steps=steps, interval=interval, device=device)
            seconds = time.perf_counter() - start - result["drain_s"]
            system.discard()
        except Exception as exc:
            # Left out of this figure only: the rounds try the system again and report
            # its failure with the traceback.
            failed[names[index] if system is None else system.name] = f"{type(exc).__name__}: {exc}"
            continue
        finally:
            if system is not None:
                system.close()
        times.setdefault(system.name, []).append(seconds)
        log(f"cold start {system.name}: {steps} steps in {seconds:.2f} s")
    return {"steps": steps, "interval": interval, "seconds": times, "failed": failed}


def _system_name(make: Callable[[], System]) -> str:
    # The makers are partials of a System class: "none" is the only name needed ahead.
    func = getattr(make, "func", None)
    return "none" if func is NoCheckpoint else getattr(func, "__name__", "?")
