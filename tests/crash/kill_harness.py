"""Kill anywhere: SIGKILL a checkpointing process at chosen points of every phase.

Not a test module (pytest collects only ``test_*.py``); tests/crash/test_faults.py runs a short
form of it. Run the full harness as::

    python tests/crash/kill_harness.py --kills 200 --seed 1 --out report.json

Each kill runs a child process that checkpoints step 1, 2, 3, ... of
``tests/crash/crash_child.py``'s state (every tensor encodes its step) and records each committed
step in a progress file (fsync'd). Before it starts, the child wraps a few functions *in
its own process* (aiockpt's write/commit/retention entry points, ``os.pwrite``,
``os.fsync``, ``os.rename`` ..., and the aiofiles calls the commit awaits) so that the
N-th event of one chosen phase and point calls ``os.kill(os.getpid(), SIGKILL)``: a real
kill at a precise instant, with nothing mocked in the parent and no hook in the library.
Phases and their points:

- capture:   inside the user's state_dict(); just before / after the staging copy
- copy:      a chunk's copy task starting; the checksum of the staged bytes;
             (CUDA) the device-to-host copy in flight
- write:     data file created empty; a *torn* pwrite (half the bytes, then the kill);
             after a whole pwrite; (CUDA, O_DIRECT) padded to the block, not yet truncated
- fsync:     before / after the fsync of a data file, the manifest, the temporary
             directory, the parent directory (commit or retention), ``latest.tmp``
- commit:    a torn manifest; before / after the rename into place; ``latest.tmp``
             written but not renamed; after ``latest`` moved
- retention: before / after the rename to ``.trash-``; in the middle of deleting it;
             after it is gone

After each kill the parent opens the directory as a restarted job would and checks the
promise: the lock is taken, no temporary file or directory survives the open, restore()
returns a checkpoint at least as new as the newest one the child recorded, every value is
exactly that step's, every committed checkpoint verifies its checksums, ``latest`` names a
committed checkpoint, and the next checkpoint commits.

The seed makes it reproducible: ``--seed S`` draws every kill's plan (phase, point, N,
state seed, keep_last, max_async, chunk size) from ``random.Random(S)``; the plan is
printed with each kill, and ``--only I`` reruns kill I of that seed alone. Which chunk is
the N-th one written can differ between runs (writer threads race), the point cannot.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import importlib.util
import inspect
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PHASES = ("capture", "copy", "write", "fsync", "commit", "retention")
_FSYNC_KINDS = ("data", "manifest", "checkpoint-dir", "parent-dir", "retention-dir", "latest")
POINTS: dict[str, tuple[str, ...]] = {
    "capture": ("state_dict", "before-staging-copy", "after-staging-copy"),
    "copy": ("task-start", "staged-checksum"),
    "write": ("created", "torn-pwrite", "after-pwrite"),
    "fsync": tuple(f"{when}-{kind}" for kind in _FSYNC_KINDS for when in ("before", "after")),
    "commit": ("torn-manifest", "before-rename", "after-rename", "latest-written", "after-latest"),
    "retention": ("before-rename", "after-rename", "mid-delete", "after-delete"),
}
# Only with a CUDA state: pinned host buffers are block-aligned, so durable writes take
# the O_DIRECT path (padded to the block, then truncated back).
CUDA_POINTS = {"copy": ("device-copy",), "write": ("padded-before-truncate",)}
TEMPORARY = (".tmp-", ".trash-")
CHILD_SECONDS = 60.0  # a child whose kill never fired exits on its own after this long
STATE_MIB = 8.3  # crash_child's state


def _load_crash_child() -> Any:
    spec = importlib.util.spec_from_file_location("crash_child", HERE / "crash_child.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_child"] = module
    spec.loader.exec_module(module)
    return module


# -- plans ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """Where one child dies: the ``count``-th event of ``phase``/``point``, counted once
    ``arm_after`` checkpoints are recorded committed (0: from the very first one)."""

    index: int
    seed: int
    phase: str
    point: str
    count: int
    arm_after: int
    keep_last: int
    max_async: int
    chunk_mb: float
    # A deliberate protocol bug in the child, to show that the checks catch one:
    # "visible-early" renames the checkpoint into place before writing its manifest.
    sabotage: str = ""

    def __str__(self) -> str:
        return (
            f"kill {self.index}: {self.phase}/{self.point} #{self.count} after "
            f"{self.arm_after} commits (seed {self.seed}, keep_last {self.keep_last}, "
            f"max_async {self.max_async}, chunks of {self.chunk_mb} MiB)"
            + (f" SABOTAGED: {self.sabotage}" if self.sabotage else "")
        )


def _events_per_checkpoint(phase: str, point: str, chunks: int) -> int:
    per_chunk = {"copy", "write"}
    if phase in per_chunk or point.endswith("-data"):
        return chunks
    if point.endswith("parent-dir"):
        return 2  # after the rename, and after `latest` is replaced
    return 1


def make_plans(seed: int, kills: int, phases: tuple[str, ...], cuda: bool = False) -> list[Plan]:
    """Kill i goes to phases[i % len(phases)]; everything else is drawn from ``seed``."""
    rng = random.Random(seed)
    plans = []
    for index in range(kills):
        phase = phases[index % len(phases)]
        points = POINTS[phase] + (CUDA_POINTS.get(phase, ()) if cuda else ())
        point = rng.choice(points)
        chunk_mb = rng.choice((0.25, 1.0, 3.0))
        chunks = int(STATE_MIB / chunk_mb) + 1
        keep_last = rng.choice((1, 2, 3))
        # Retention starts only once keep_last checkpoints exist.
        arm_after = rng.choice((0, 1, 2, 3)) if phase != "retention" else keep_last
        spread = 3 if phase != "retention" else 2  # over a few checkpoints
        count = rng.randint(1, _events_per_checkpoint(phase, point, chunks) * spread)
        plans.append(
            Plan(
                index=index,
                seed=rng.randrange(1, 2**31),
                phase=phase,
                point=point,
                count=count,
                arm_after=arm_after,
                keep_last=keep_last,
                max_async=rng.choice((1, 2, 3)),
                chunk_mb=chunk_mb,
            )
        )
    return plans


# -- the child's side: hooks installed in its own process ------------------------------------
class Trigger:
    """Counts events of the planned phase/point and SIGKILLs this process at the N-th."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.armed = plan.arm_after == 0
        self.seen = 0
        self.lock = threading.Lock()
        self.where = threading.local()  # the aiockpt operation this thread is inside
        # The coroutine operation (the commit) in progress: its file operations run on
        # aiofiles' executor threads, which no thread-local marks. Commits run one at a
        # time, and a thread inside another operation keeps its own mark.
        self.awaiting: str | None = None

    def phase(self) -> str | None:
        return getattr(self.where, "phase", None) or self.awaiting

    def due(self, phase: str, point: str) -> bool:
        """Whether this event is the one to die at (counts it if it matches the plan)."""
        if (phase, point) != (self.plan.phase, self.plan.point) or not self.armed:
            return False
        with self.lock:
            self.seen += 1
            return self.seen == self.plan.count

    def die(self, detail: str = "") -> None:
        plan = self.plan
        note = f"KILL {plan.phase}/{plan.point} #{plan.count} {detail}".rstrip()
        os.write(2, (note + "\n").encode())
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL cannot be caught; this line is never passed

    def inside(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with this thread (a coroutine: the process) marked as inside ``phase``
        while it runs."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awaiting(*args: Any, **kwargs: Any) -> Any:
                previous, self.awaiting = self.awaiting, phase
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self.awaiting = previous

            return awaiting

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            previous = self.phase()
            self.where.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.where.phase = previous

        return wrapper


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _fsync_kind(path: str, phase: str | None, root: str) -> str | None:
    name = os.path.basename(path)
    if name.startswith("data-") and name.endswith(".bin"):
        return "data"
    if name == "manifest.json":
        return "manifest"
    if name == "latest.tmp":
        return "latest"
    if name.startswith(".tmp-step-"):
        return "checkpoint-dir"
    if path == root:
        return "retention-dir" if phase == "retention" else "parent-dir"
    return None


def install_hooks(plan: Plan, directory: Path, crash_child: Any) -> Trigger:
    """Wrap aiockpt's entry points and the OS calls it makes, in this process only."""
    import aiofiles.os
    import aiofiles.threadpool.binary

    import aiockpt._engine.pipeline
    import aiockpt._engine.staging
    import aiockpt.storage.fileio
    import aiockpt.storage.local

    trigger = Trigger(plan)
    root = os.path.realpath(directory)

    # Arm once the child has recorded enough commits.
    record = crash_child._record
    recorded = [0]

    def record_and_arm(fd: int, step: int) -> None:
        record(fd, step)
        recorded[0] += 1
        if recorded[0] >= plan.arm_after:
            trigger.armed = True

    crash_child._record = record_and_arm

    # Which aiockpt operation a thread is in, for the OS-call wrappers below.
    pipeline = aiockpt._engine.pipeline
    store_cls = aiockpt.storage.local.CheckpointStore
    store_cls.write_chunk = trigger.inside("write", store_cls.write_chunk)  # type: ignore[method-assign]
    commit = _visible_early_commit if plan.sabotage == "visible-early" else store_cls.commit
    store_cls.commit = trigger.inside("commit", commit)  # type: ignore[method-assign]
    retain = trigger.inside("retention", store_cls.retain)

    def retain_and_maybe_die(self: Any, keep_last: int | None) -> list[Path]:
        removed = retain(self, keep_last)
        if removed and trigger.due("retention", "after-delete"):
            trigger.die(f"removed {[p.name for p in removed]}")
        return removed  # type: ignore[no-any-return]

    store_cls.retain = retain_and_maybe_die  # type: ignore[method-assign]

    # capture: the user's state_dict(), and either side of the staging copy.
    state_dict = crash_child.CrashState.state_dict

    def state_dict_and_maybe_die(self: Any) -> Any:
        if trigger.due("capture", "state_dict"):
            trigger.die(f"in state_dict() of step {self.step}")
        return state_dict(self)

    crash_child.CrashState.state_dict = state_dict_and_maybe_die
    capture = aiockpt._engine.staging.Capturer.capture

    def capture_and_maybe_die(self: Any, *args: Any, **kwargs: Any) -> Any:
        if trigger.due("capture", "before-staging-copy"):
            trigger.die()
        result = capture(self, *args, **kwargs)
        if trigger.due("capture", "after-staging-copy"):
            trigger.die()
        return result

    aiockpt._engine.staging.Capturer.capture = capture_and_maybe_die  # type: ignore[method-assign]

    # copy: a chunk's copy task, the checksum of the staged bytes, the CUDA copy.
    move_chunk = pipeline.Pipeline._move_chunk

    async def move_chunk_and_maybe_die(self: Any, job: Any, chunk: Any, *args: Any) -> Any:
        if trigger.due("copy", "task-start"):
            trigger.die(f"step {job.snapshot.step} chunk {chunk.index}")
        return await move_chunk(self, job, chunk, *args)

    pipeline.Pipeline._move_chunk = move_chunk_and_maybe_die  # type: ignore[method-assign]
    checksum = aiockpt.storage.fileio.checksum

    def checksum_and_maybe_die(data: Any) -> int:
        if trigger.due("copy", "staged-checksum"):
            trigger.die(f"({len(data)} bytes)")
        return checksum(data)

    aiockpt.storage.fileio.checksum = checksum_and_maybe_die
    wait_cuda_event = pipeline.wait_cuda_event

    async def wait_cuda_event_and_maybe_die(event: Any, waiter: Any) -> None:
        if trigger.due("copy", "device-copy"):
            trigger.die("with a device-to-host copy in flight")
        await wait_cuda_event(event, waiter)

    pipeline.wait_cuda_event = wait_cuda_event_and_maybe_die  # type: ignore[assignment]

    # OS calls. Only calls made inside an aiockpt operation count (never the progress file).
    real = {name: getattr(os, name) for name in ("open", "pwrite", "fsync", "ftruncate")}
    real.update(rename=os.rename, replace=os.replace, unlink=os.unlink)

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real["open"](path, flags, *args, **kwargs)
        created = trigger.phase() == "write" and flags & os.O_CREAT
        if created and trigger.due("write", "created"):
            trigger.die(str(path))
        return fd  # type: ignore[no-any-return]

    def os_pwrite(fd: int, data: Any, offset: int) -> int:
        if trigger.phase() == "write":
            if trigger.due("write", "torn-pwrite"):
                half = max(len(data) // 2, 1)
                if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
                    half -= half % 4096  # O_DIRECT writes whole blocks only
                if half:
                    real["pwrite"](fd, data[:half], offset)
                trigger.die(f"after {half} of {len(data)} bytes of {_fd_path(fd)}")
            written = real["pwrite"](fd, data, offset)
            if trigger.due("write", "after-pwrite"):
                trigger.die(_fd_path(fd))
            return written  # type: ignore[no-any-return]
        return real["pwrite"](fd, data, offset)  # type: ignore[no-any-return]

    def os_ftruncate(fd: int, length: int) -> None:
        if trigger.phase() == "write" and trigger.due("write", "padded-before-truncate"):
            trigger.die(f"{_fd_path(fd)} padded to {os.fstat(fd).st_size}, not yet {length}")
        real["ftruncate"](fd, length)

    def os_fsync(fd: int) -> None:
        phase = trigger.phase()
        kind = _fsync_kind(_fd_path(fd), phase, root) if phase is not None else None
        if kind is not None and trigger.due("fsync", f"before-{kind}"):
            trigger.die(_fd_path(fd))
        real["fsync"](fd)
        if kind is not None and trigger.due("fsync", f"after-{kind}"):
            trigger.die(_fd_path(fd))

    def os_rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        phase = trigger.phase()
        point = None
        if phase == "commit" and os.path.basename(str(src)).startswith(".tmp-"):
            point = "commit"
        elif phase == "retention":
            point = "retention"
        if point and trigger.due(point, "before-rename"):
            trigger.die(f"{src} -> {dst}")
        real["rename"](src, dst, *args, **kwargs)
        if point and trigger.due(point, "after-rename"):
            trigger.die(f"{src} -> {dst}")

    def os_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        latest = trigger.phase() == "commit" and str(src).endswith("latest.tmp")
        if latest and trigger.due("commit", "latest-written"):
            trigger.die(str(src))
        real["replace"](src, dst, *args, **kwargs)
        if latest and trigger.due("commit", "after-latest"):
            trigger.die(str(dst))

    def os_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        real["unlink"](path, *args, **kwargs)
        if trigger.phase() == "retention" and trigger.due("retention", "mid-delete"):
            trigger.die(f"after unlinking {path}")

    os.open = os_open  # type: ignore[assignment]
    os.pwrite = os_pwrite
    os.ftruncate = os_ftruncate
    os.fsync = os_fsync
    os.rename = os_rename
    os.replace = os_replace
    os.unlink = os_unlink  # type: ignore[assignment]
    # The commit path awaits these through aiofiles, which bound the real ones at import.
    aiofiles.os.rename = aiofiles.os.wrap(os_rename)
    aiofiles.os.replace = aiofiles.os.wrap(os_replace)
    aiofiles.os.unlink = aiofiles.os.wrap(os_unlink)
    # ... and writes the manifest through aiofiles.open (io.FileIO.write, not os.write).
    file_write = aiofiles.threadpool.binary.AsyncFileIO.write

    async def file_write_maybe_torn(self: Any, data: Any) -> int:
        name = str(getattr(self._file, "name", ""))
        manifest = trigger.phase() == "commit" and name.endswith("/manifest.json")
        if manifest and trigger.due("commit", "torn-manifest"):
            half = max(len(data) // 2, 1)
            self._file.write(data[:half])
            trigger.die(f"after {half} of {len(data)} manifest bytes")
        return await file_write(self, data)  # type: ignore[no-any-return]

    aiofiles.threadpool.binary.AsyncFileIO.write = file_write_maybe_torn  # type: ignore[method-assign]
    return trigger


async def _visible_early_commit(store: Any, temporary: Path, step: int, manifest: bytes) -> Path:
    """A broken commit for the harness's own control test: the checkpoint becomes visible
    before its manifest is complete, so a kill can leave a torn committed checkpoint."""
    from aiockpt.storage.commitio import create_file

    final = store.root / f"step-{step}"
    os.rename(temporary, final)
    await create_file(final / "manifest.json", manifest, durable=False)  # as commits write it
    store.point_latest(final.name)
    return final  # type: ignore[no-any-return]


def child_main(plan: Plan, argv: list[str], cuda: bool) -> int:
    """In the child: install the hooks, then checkpoint forever (crash_child.main)."""
    crash_child = sys.modules.get("crash_child") or _load_crash_child()
    if cuda:
        # The state lives on the GPU, so the copy phase moves real device-to-host bytes.
        expected = crash_child.expected_tensors

        def on_gpu(step: int, seed: int) -> dict[str, Any]:
            return {k: v.cuda() for k, v in expected(step, seed).items()}

        crash_child.expected_tensors = on_gpu
    install_hooks(plan, Path(argv[0]), crash_child)
    return int(crash_child.main(argv))


def serve() -> int:
    """Fork server: pays for ``import torch`` once, forks one child per kill.

    ``spawn {"plan": {...}, "argv": [...], "log": PATH, "cuda": bool}`` -> pid;
    ``wait PID SECONDS`` -> its exit code (negative: a signal), after SIGKILLing it
    itself if it is still alive after SECONDS (then the reply is ``timeout CODE``).
    """
    import torch  # noqa: F401  (the point of the server: import once, before forking)

    import aiockpt  # noqa: F401

    crash_child = _load_crash_child()
    children: set[int] = set()
    try:
        for line in sys.stdin:
            command, _, rest = line.strip().partition(" ")
            if command == "spawn":
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    request = json.loads(rest)
                    crash_child.run_in_forked_child(
                        request["log"],
                        lambda request=request: child_main(
                            Plan(**request["plan"]), request["argv"], request["cuda"]
                        ),
                    )
                children.add(pid)
                reply = str(pid)
            elif command == "wait":
                pid_text, seconds = rest.split()
                pid = int(pid_text)
                deadline = time.monotonic() + float(seconds)
                prefix = ""
                while True:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        break
                    if time.monotonic() > deadline:
                        os.kill(pid, signal.SIGKILL)
                        _, status = os.waitpid(pid, 0)
                        prefix = "timeout "
                        break
                    time.sleep(0.005)
                children.discard(pid)
                reply = prefix + str(os.waitstatus_to_exitcode(status))
            else:
                reply = f"error unknown command {command!r}"
            print(reply, flush=True)
    finally:
        for pid in children:  # the parent went away: leave no orphan writing forever
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return 0


# -- the parent's side --------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """What one kill did and what the restarted job found."""

    plan: Plan
    fired: str = ""  # the child's KILL line: where it died ("" if the plan never fired)
    exit_code: int | None = None
    recorded: list[int] = dataclasses.field(default_factory=list)
    left_at_kill: list[str] = dataclasses.field(default_factory=list)
    restored: int | None = None
    problems: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def landed(self) -> bool:
        return bool(self.fired)

    @property
    def survived(self) -> bool:
        return self.landed and not self.problems

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["recorded"] = self.recorded[-3:]
        record["landed"], record["survived"] = self.landed, self.survived
        return record

    def __str__(self) -> str:
        newest = self.recorded[-1] if self.recorded else None
        verdict = "ok" if self.survived else ("NOT LANDED" if not self.landed else "FAILED")
        text = (
            f"{verdict}: {self.plan} | {self.fired or 'no kill'}; newest recorded {newest}, "
            f"restored {self.restored}; at the kill {self.left_at_kill or 'no temporaries'}"
        )
        return text + "".join(f"\n    problem: {p}" for p in self.problems)


def _committed_steps(progress: Path) -> list[int]:
    try:
        text = progress.read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split("\n")[:-1] if line]


def _entries(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def check_recovery(
    directory: Path, plan: Plan, recorded: list[int]
) -> tuple[int | None, list[str]]:
    """Open, restore and verify as a restarted training job would: (restored, problems)."""
    import aiockpt
    from aiockpt._engine.reader import read_manifest

    crash_child = sys.modules.get("crash_child") or _load_crash_child()
    problems: list[str] = []
    state = crash_child.CrashState(plan.seed)
    state.poison()
    config = aiockpt.Config(
        directory=directory,
        chunk_size_mb=plan.chunk_mb,
        max_async=plan.max_async,
        keep_last=plan.keep_last,
        num_threads=4,
    )
    restored = None
    with aiockpt.SyncCheckpointer(config, state=state) as ckpt:
        holder = (directory / ".aiockpt.lock").read_text().strip()
        if holder != str(os.getpid()):
            problems.append(f"lock file names pid {holder}")
        names = _entries(directory)
        stray = [
            n
            for n in names
            if n not in (".aiockpt.lock", "latest") and not re.fullmatch(r"step-\d+", n)
        ]
        if stray:
            problems.append(f"left after open: {stray}")
        committed = aiockpt.list_checkpoints(directory)
        steps = [info.step for info in committed]
        try:
            restored = ckpt.restore()
        except aiockpt.AiockptError as exc:
            problems.append(f"restore() raised {type(exc).__name__}: {exc}")
            return None, problems
        newest = recorded[-1] if recorded else None
        if restored is None:
            if newest is not None:
                problems.append(f"restore() found nothing; the child had committed {newest}")
        else:
            if newest is not None and restored < newest:
                problems.append(f"restored step {restored}, older than committed {newest}")
            bad = crash_child.mismatches(state.state_dict(), restored, plan.seed)
            if bad:
                problems.append(f"restored step {restored} is torn: {bad}")
            if steps and steps[-1] != restored:
                problems.append(f"restore() chose {restored} of {steps}")
        if len(steps) > plan.keep_last + 1:
            problems.append(f"{len(steps)} committed with keep_last={plan.keep_last}: {steps}")
        for info in committed:
            try:
                loaded = aiockpt.load(info.path)  # verifies every crc32c
            except aiockpt.AiockptError as exc:
                problems.append(f"{info.path.name} does not load: {exc}")
                continue
            bad = crash_child.mismatches(loaded["state"], info.step, plan.seed)
            if bad:
                problems.append(f"{info.path.name} is torn: {bad}")
            extra = (
                set(_entries(info.path))
                - {"manifest.json"}
                - {f.name for f in read_manifest(info.path).files}
            )
            if extra:
                problems.append(f"{info.path.name} holds unlisted files {sorted(extra)}")
        latest = directory / "latest"
        if latest.exists():
            name = latest.read_text().strip()
            if name not in {info.path.name for info in committed}:
                problems.append(f"latest names {name!r}, not a committed checkpoint")
        # Training goes on from there: the next checkpoint commits.
        next_step = (restored or 0) + 1
        state.set_step(next_step)
        info = ckpt.checkpoint(next_step).wait()
        if info is None or info.step != next_step:
            problems.append(f"the checkpoint after the restart gave {info}")
    after = aiockpt.list_checkpoints(directory)
    if not after or after[-1].step != next_step:
        problems.append(f"newest after resuming is {after[-1] if after else None}")
    else:
        bad = crash_child.mismatches(aiockpt.load(after[-1].path)["state"], next_step, plan.seed)
        if bad:
            problems.append(f"the checkpoint written after the restart is wrong: {bad}")
    left = [n for n in _entries(directory) if n.startswith(TEMPORARY) or n == "latest.tmp"]
    if left:
        problems.append(f"temporaries after the restarted job closed: {left}")
    return restored, problems


def run_kill(server: Any, workdir: Path, plan: Plan, cuda: bool = False) -> Outcome:
    started = time.monotonic()
    run_dir = workdir / f"kill-{plan.index:04d}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    directory, progress, log = run_dir / "ckpt", run_dir / "progress", run_dir / "child.log"
    argv = [
        str(directory),
        str(plan.seed),
        "--progress",
        str(progress),
        "--keep-last",
        str(plan.keep_last),
        "--max-async",
        str(plan.max_async),
        "--chunk-mb",
        str(plan.chunk_mb),
        "--max-seconds",
        str(CHILD_SECONDS),
    ]
    request = {"plan": dataclasses.asdict(plan), "argv": argv, "log": str(log), "cuda": cuda}
    pid = int(server.ask("spawn " + json.dumps(request)))
    reply = server.ask(f"wait {pid} {CHILD_SECONDS + 30}")
    outcome = Outcome(plan, exit_code=int(reply.split()[-1]))
    # The child is gone: nothing it recorded can change any more.
    output = log.read_text(errors="replace") if log.exists() else ""
    kills = [line for line in output.splitlines() if line.startswith("KILL ")]
    outcome.fired = kills[-1] if kills else ""
    outcome.recorded = _committed_steps(progress)
    outcome.left_at_kill = [n for n in _entries(directory) if n.startswith(TEMPORARY)]
    if outcome.fired and outcome.exit_code != -signal.SIGKILL:
        outcome.problems.append(f"exit code {outcome.exit_code}, not -SIGKILL")
    if not outcome.fired:
        outcome.problems.append(f"the planned kill never fired ({reply}); log:\n{output[-2000:]}")
    try:
        outcome.restored, problems = check_recovery(directory, plan, outcome.recorded)
        outcome.problems += problems
    except Exception as exc:  # a crash of the check itself is a failure too, never hidden
        outcome.problems.append(f"recovery raised {type(exc).__name__}: {exc}")
    outcome.seconds = time.monotonic() - started
    return outcome


@contextlib.contextmanager
def fork_server() -> Iterator[Any]:
    server = (sys.modules.get("crash_child") or _load_crash_child()).ForkServer(
        Path(__file__).resolve()
    )
    try:
        yield server
    finally:
        server.close()


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    for outcome in outcomes:
        phase = phases.setdefault(
            outcome.plan.phase, {"tried": 0, "landed": 0, "survived": 0, "points": {}}
        )
        point = phase["points"].setdefault(outcome.plan.point, {"tried": 0, "survived": 0})
        phase["tried"] += 1
        point["tried"] += 1
        phase["landed"] += outcome.landed
        phase["survived"] += outcome.survived
        point["survived"] += outcome.survived
    return phases


def harness(
    *,
    kills: int,
    seed: int,
    workdir: Path,
    phases: tuple[str, ...] = PHASES,
    only: int | None = None,
    cuda: bool = False,
    keep: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    plans = make_plans(seed, kills, phases, cuda)
    if only is not None:
        plans = [plans[only]]
    echo(f"kill harness: seed {seed}, {len(plans)} kills over {', '.join(phases)}")
    started = time.monotonic()
    outcomes = []
    with fork_server() as server:
        for plan in plans:
            outcome = run_kill(server, workdir, plan, cuda)
            outcomes.append(outcome)
            echo(str(outcome))
            if outcome.survived and not keep:
                shutil.rmtree(workdir / f"kill-{plan.index:04d}", ignore_errors=True)
    tried = len(outcomes)
    survived = sum(o.survived for o in outcomes)
    report = {
        "seed": seed,
        "kills": tried,
        "landed": sum(o.landed for o in outcomes),
        "survived": survived,
        "seconds": round(time.monotonic() - started, 1),
        "device": "cuda" if cuda else "cpu",
        "phases": summarize(outcomes),
        "failures": [o.to_dict() for o in outcomes if not o.survived],
        "runs": [o.to_dict() for o in outcomes],
    }
    echo(f"\n{'phase':<10} {'tried':>6} {'landed':>7} {'survived':>9}")
    for phase, row in report["phases"].items():
        echo(f"{phase:<10} {row['tried']:>6} {row['landed']:>7} {row['survived']:>9}")
    echo(f"{'total':<10} {tried:>6} {report['landed']:>7} {survived:>9}  ({report['seconds']} s)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None, help="default: drawn and printed")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--only", type=int, help="rerun only kill number ONLY of this seed")
    parser.add_argument("--workdir", type=Path, help="default: a fresh temporary directory")
    parser.add_argument("--cuda", action="store_true", help="keep the child's state on the GPU")
    parser.add_argument("--keep", action="store_true", help="keep the directories of every kill")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    phases = tuple(p for p in args.phases.split(",") if p)
    unknown = [p for p in phases if p not in POINTS]
    if unknown:
        parser.error(f"unknown phases {unknown}; known: {list(POINTS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="aiockpt-kills-"))
    report = harness(
        kills=args.kills,
        seed=seed,
        workdir=workdir,
        phases=phases,
        only=args.only,
        cuda=args.cuda,
        keep=args.keep,
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if report["failures"]:
        print(f"{len(report['failures'])} failed; their directories are kept under {workdir}")
    elif args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"seed {seed}: rerun with --seed {seed} [--only INDEX]")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
