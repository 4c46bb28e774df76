"""The ``aiockpt`` command line (also ``python -m aiockpt``).

Each subcommand lives in its own module and is imported only when it runs, so ``aiockpt
ls`` does not pay for DCP or safetensors. Results go to stdout (text, or one JSON document
with ``--json``); notes, progress bars, log records and errors go to stderr.

The commands raise aiockpt's own errors and print nothing about them; here each becomes one
line (and a hint), never a traceback, with one exit status for all commands: 0 success;
2 bad usage (argparse's refusals, ``UsageError``: a path argument that does not exist or is
the wrong kind, an option out of range, an output that exists; ``ConfigError``); 1 failure
(a corrupt checkpoint, no checkpoint, a live writer, an I/O error, a refused conversion,
or anything unforeseen); 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from .._version import __version__
from ..errors import AiockptError, ConfigError, CorruptCheckpointError, UsageError
from .options import add_json, add_step, add_threads, nonnegative

__all__ = ["main"]

logger = logging.getLogger(__name__)

_EXIT_CODES = """\
exit status: 0 success, 1 failure (corrupt or missing checkpoint, I/O error: see stderr),
2 bad usage (unknown flag, bad value, a path that does not exist or is the wrong kind).
Every command takes --json: one JSON document on stdout. AIOCKPT_LOG_LEVEL=INFO (or DEBUG)
logs more on stderr."""

_MAIN_EPILOG = f"""\
examples:
  aiockpt ls checkpoints                  what is there, and is a job writing it?
  aiockpt inspect checkpoints/step-100    tensors, dtypes, shapes, bytes per group
  aiockpt verify checkpoints              re-read every byte, check every checksum
  aiockpt export checkpoints/step-100 --to safetensors model.safetensors
  aiockpt prune checkpoints --keep-last 3 --keep-every 1000 --dry-run
  aiockpt diagnose --config aiockpt.toml --step-ms 60 --state-gb 4.5
                                          what will slow training down, and what to change
  aiockpt bench --preset 350m --config aiockpt.toml
                                          aiockpt, torch.save and DCP side by side

Run `aiockpt COMMAND --help` for each command's options and examples.
{_EXIT_CODES}"""

_LS_EPILOG = """\
Lists committed checkpoints (step, creation time, size, world size, tensor count, status),
then everything that is not a checkpoint: .tmp-* (a write in progress, or abandoned by a
writer that died), .trash-* (a deletion in progress or abandoned), step directories
without a manifest. It also says whether a live training job holds the directory's lock.

status: "unverified" = manifest and file sizes fine, tensor bytes not read (fast);
"valid" / "corrupt" = every checksum checked (--verify); "corrupt" also when the manifest
or a file size is wrong.

examples:
  aiockpt ls checkpoints
  aiockpt ls checkpoints --verify          read everything (slow on big checkpoints)
  aiockpt ls checkpoints --json | jq '.checkpoints[].step'
  aiockpt ls checkpoints --remote /mnt/nfs/run-1   the tiers too

Tiers: the memory tier that a run with [checkpoint.memory] keeps in /dev/shm (its
location derived from DIR, or --memory-dir) is listed after DIR, with the steps it
holds; so is the remote tier with --remote.

exit status: 0, or 1 when a listed checkpoint is corrupt. 2 bad usage."""

_INSPECT_EPILOG = f"""\
PATH is a checkpoint (checkpoints/step-100) or the directory holding them (its newest
checkpoint, or --step N). The tree groups tensors by top-level key (the keyword names given
to the Checkpointer: model, optimizer, ...), with dtype, shape and bytes, then the
non-tensor values (learning rates, step counters, RNG states). Only manifest.json is read.

--tensor NAME reads that tensor's bytes alone and prints min/max/mean/std, NaN/inf/zero
counts and whether its checksums hold. NAME is as listed (model/fc1.weight); the dotted
form (model.fc1.weight) works too.

examples:
  aiockpt inspect checkpoints/step-100
  aiockpt inspect checkpoints --summary            newest checkpoint, groups only
  aiockpt inspect checkpoints/step-100 --tensor model/fc1.weight
  aiockpt inspect checkpoints/step-100 --json | jq '.groups'

{_EXIT_CODES} With --tensor, 1 also when its checksum fails."""

_VERIFY_EPILOG = """\
Reads every byte of every data file and checks the CRC-32C of every piece (and the
manifest's own checksum), with --threads files read at once. A directory of checkpoints
means all its committed checkpoints. Every problem is reported with its file, byte range
and tensor, so you know what is lost. A checkpoint that a live writer deletes while it is
being verified is reported as removed, not corrupt.

examples:
  aiockpt verify checkpoints/step-100
  aiockpt verify checkpoints                 every committed checkpoint
  aiockpt verify checkpoints --json > report.json

exit status: 0 only when every checkpoint is valid; 1 when any is corrupt (or on an
error); 2 bad usage."""

_EXPORT_EPILOG = f"""\
formats:
  torch        one torch.save file of the whole state ({{"model": ..., "optimizer": ...}}),
               loadable with torch.load(OUT, weights_only=True). numpy arrays and scalars
               (numpy's RNG state) become tensors and Python numbers.
  safetensors  the tensors of one key (default: "model") under their module names
               ("fc1.weight"), for model.load_state_dict(safetensors.torch.load_file(OUT)).
               With several --key, names start with the key ("optimizer.state.0.exp_avg").
               Non-tensor values are left out. Needs: pip install 'aiockpt[export]'.
               A dtype safetensors has no name for (complex128, bits8, ...) is refused,
               naming the tensor, before anything is written.
  dcp          a torch.distributed.checkpoint directory, for dcp.load(state, checkpoint_id=OUT).

The checkpoint is read and verified first; OUT is written under a temporary name and renamed
into place, and an existing OUT is replaced only with --force. A torch export is renamed into
place only once torch.load(weights_only=True) has read it back.

examples:
  aiockpt export checkpoints/step-100 --to torch state.pt
  aiockpt export checkpoints --to safetensors model.safetensors      newest checkpoint
  aiockpt export checkpoints/step-100 --to dcp dcp_step100 --key model --key optimizer

{_EXIT_CODES}"""

_IMPORT_EPILOG = f"""\
Writes the state in SRC as checkpoint step-N of DIR (with the same writer training uses,
so it is committed atomically), without pruning what DIR already holds.

top-level keys: a torch file holding a dict of state_dicts ({{"model": ..., "optimizer": ...}})
keeps its keys; a bare state_dict ({{"fc1.weight": tensor, ...}}) and a safetensors file go
under "model"; --key NAME puts everything under NAME. These keys are the keyword names to
give the Checkpointer that restores it: Checkpointer(cfg, model=model). A key that cannot
be one (empty, starting with "$", containing "/") is refused: put everything under --key NAME.

SRC is read as hostile input. Nothing in it is executed: torch files load with
weights_only=True (and only in torch.save's zip format), DCP metadata through an unpickler
that admits exactly DCP's own metadata classes. Only regular files are read (a FIFO is
refused, not waited on); DCP data files must be plain relative paths inside SRC, and every
declared byte range must lie within its file. The new checkpoint is read back and checked
like `aiockpt.load` does before the import reports success.

tied weights: save_pretrained leaves a head tied to the input embedding (lm_head.weight)
out of model.safetensors. When config.json next to it says the weights are tied
(tie_word_embeddings, true unless set), import warns on stderr and lists the key under
"tied_keys_missing" with --json: restoring into the model will report it missing.

examples:
  aiockpt import state.pt --from torch --step 0 checkpoints
  aiockpt import model.safetensors --from safetensors --step 0 checkpoints
  aiockpt import dcp_step100 --from dcp --step 100 checkpoints

{_EXIT_CODES}"""

_PRUNE_EPILOG = f"""\
Keeps the newest N committed checkpoints, plus (--keep-every M) those whose step is a
multiple of M, and removes the others. Never removed, whatever the rules say:
  - the newest checkpoint that verifies (checksums are read newest-first until one passes;
    if none does, nothing is removed);
  - anything, while a live training job holds the directory, unless --force. That job
    prunes by its own keep_last and may be restoring from an older step. With --force only
    committed checkpoints go; the job's temporaries and `latest` are never touched.
Without a live writer, prune takes the directory's lock while it works and also deletes
the leftovers of a writer that died (.tmp-*, .trash-*). Each checkpoint is renamed to
.trash-* before it is deleted, so none is ever seen half-deleted.

--memory frees the shared-memory tier of a run with [checkpoint.memory] instead: every
checkpoint it holds in /dev/shm/aiockpt-<hash> (derived from DIR; --memory-dir for a
configured one) and the derived directory. A run frees it itself when it closes after
its last checkpoint reached DIR; one that crashed leaves it for the next run to resume
from. Refused while a writer holds it, or while it holds a step newer than DIR's newest
valid checkpoint (a restart would need it), unless --force.

examples:
  aiockpt prune checkpoints --keep-last 3 --dry-run        show the plan, change nothing
  aiockpt prune checkpoints --keep-last 3 --keep-every 1000
  aiockpt prune checkpoints --keep-last 2 --force          a job is running; you are sure
  aiockpt prune checkpoints --memory                       free the memory tier

{_EXIT_CODES}"""


_DIAGNOSE_EPILOG = f"""\
One short run in a scratch directory under the checkpoint directory (removed afterwards),
with a real checkpointer and the settings of --config, AIOCKPT_* variables and the flags:

  frequency   persist time of a checkpoint against the interval (steps x step time): does
              a backlog build, what `block` and `skip` then do, and what a checkpoint
              costs per 100 steps at this interval
  queueing    write slots (max_async x chunks) against chunks in flight; chunks waiting
              for writer threads (measured per chunk); writer threads against what the
              disk takes (one writer against several, fsync'd)
  copy        what checkpoint() costs the step, and how much slower steps run while a
              checkpoint persists (interleaved with plain steps)
  memory      the host staging pool against MemAvailable; the GPU staging buffer against
              free GPU memory, and what staging = "auto" picks

Then advice: one concrete change per line, with the numbers behind it, or "no changes
needed". The model is a preset of `aiockpt bench` (--preset), or your own figures
(--step-ms, --state-gb): a state of that size in a few tensors, and steps that keep the
device busy that long. On a CPU, contention figures are for the CPU alone.

examples:
  aiockpt diagnose --preset 350m
  aiockpt diagnose --config aiockpt.toml --step-ms 60 --state-gb 4.5
  aiockpt diagnose --step-ms 60 --state-gb 4.5 --checkpoint-interval 1 --max-async 2
  aiockpt diagnose --preset tiny --json | jq '.advice[].code'

{_EXIT_CODES}"""


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="aiockpt",
        description="See, check, convert and clean aiockpt checkpoints.",
        epilog=_MAIN_EPILOG,
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"aiockpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = commands.add_parser(
        "ls",
        help="list committed checkpoints and leftovers",
        description="List the checkpoints of a directory.",
        epilog=_LS_EPILOG,
        formatter_class=raw,
    )
    ls.add_argument("directory", metavar="DIR", help="the checkpoint directory")
    ls.add_argument("--verify", action="store_true", help="check every checksum (reads all)")
    ls.add_argument(
        "--memory-dir",
        metavar="DIR",
        help="the memory tier's directory, when the config sets one (default: the one "
        "derived from DIR, /dev/shm/aiockpt-<hash>)",
    )
    ls.add_argument("--remote", metavar="URL", help="also list the remote tier at URL")
    add_threads(ls)
    add_json(ls)

    inspect = commands.add_parser(
        "inspect",
        help="show what a checkpoint holds; statistics of one tensor",
        description="Show a checkpoint's tensors and values.",
        epilog=_INSPECT_EPILOG,
        formatter_class=raw,
    )
    inspect.add_argument("path", metavar="PATH", help="a checkpoint, or a directory of them")
    add_step(inspect)
    inspect.add_argument("--tensor", metavar="NAME", help="statistics of this one tensor")
    inspect.add_argument(
        "--summary", action="store_true", help="groups only, not every tensor and value"
    )
    add_threads(inspect)
    add_json(inspect)

    verify = commands.add_parser(
        "verify",
        help="re-read every byte and check every checksum",
        description="Verify checkpoints byte for byte.",
        epilog=_VERIFY_EPILOG,
        formatter_class=raw,
    )
    verify.add_argument(
        "paths", nargs="+", metavar="PATH", help="checkpoints, or directories of them"
    )
    add_threads(verify)
    add_json(verify)

    export = commands.add_parser(
        "export",
        help="write a checkpoint as torch.save, safetensors or DCP",
        description="Convert a checkpoint to another format.",
        epilog=_EXPORT_EPILOG,
        formatter_class=raw,
    )
    export.add_argument("path", metavar="PATH", help="a checkpoint, or a directory of them")
    export.add_argument("--to", required=True, choices=("torch", "safetensors", "dcp"))
    export.add_argument("out", metavar="OUT", help="the file (torch, safetensors) or directory")
    add_step(export)
    export.add_argument(
        "--key",
        action="append",
        metavar="KEY",
        help="export only this top-level key (repeatable); safetensors defaults to model",
    )
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.add_argument(
        "--no-verify", action="store_true", help="skip checksum checks while reading"
    )
    add_threads(export)
    add_json(export)

    imp = commands.add_parser(
        "import",
        help="make a checkpoint from a torch.save, safetensors or DCP file",
        description="Convert torch.save / safetensors / DCP state into an aiockpt checkpoint.",
        epilog=_IMPORT_EPILOG,
        formatter_class=raw,
    )
    imp.add_argument("source", metavar="SRC", help="the file or DCP directory to read")
    imp.add_argument(
        "--from", dest="format", required=True, choices=("torch", "safetensors", "dcp")
    )
    imp.add_argument("--step", type=nonnegative, required=True, metavar="N", help="its step")
    imp.add_argument("directory", metavar="DIR", help="the checkpoint directory to write into")
    imp.add_argument("--key", metavar="NAME", help="save everything under this top-level key")
    imp.add_argument("--force", action="store_true", help="replace step-N if it exists")
    add_threads(imp)
    add_json(imp)

    prune = commands.add_parser(
        "prune",
        help="delete old checkpoints, keeping what a restart needs",
        description="Delete old checkpoints by rule.",
        epilog=_PRUNE_EPILOG,
        formatter_class=raw,
    )
    prune.add_argument("directory", metavar="DIR", help="the checkpoint directory")
    prune.add_argument(
        "--keep-last",
        type=nonnegative,
        metavar="N",
        help="keep the newest N (required, but with --memory)",
    )
    prune.add_argument(
        "--keep-every", type=int, metavar="M", help="also keep steps that are multiples of M"
    )
    prune.add_argument(
        "--memory",
        action="store_true",
        help="free DIR's shared-memory tier instead (/dev/shm/aiockpt-<hash>, or --memory-dir)",
    )
    prune.add_argument("--memory-dir", metavar="DIR", help="the memory tier's configured directory")
    prune.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    prune.add_argument(
        "--force", action="store_true", help="prune even while a live writer holds the directory"
    )
    add_threads(prune)
    add_json(prune)

    from ..tools.diagnose import add_arguments as diagnose_arguments

    diagnose = commands.add_parser(
        "diagnose",
        help="measure what will slow training down under a config, and advise",
        description="Measure checkpoint costs for a config and a model, and say what to change.",
        epilog=_DIAGNOSE_EPILOG,
        formatter_class=raw,
    )
    diagnose_arguments(diagnose)

    from ..tools import bench_cli

    bench = commands.add_parser(
        "bench",
        help="aiockpt, torch.save and DCP side by side in a training run, against this "
        "machine's limits",
        description=bench_cli.DESCRIPTION,
        epilog=bench_cli.EPILOG,
        formatter_class=raw,
    )
    bench_cli.add_arguments(bench)
    return parser


def _handler(command: str) -> Callable[[Any], int]:
    if command == "ls":
        from .ls import run
    elif command == "inspect":
        from .inspect import run
    elif command == "verify":
        from .verify import run
    elif command == "export":
        from .convert import run_export as run
    elif command == "import":
        from .convert import run_import as run
    elif command == "prune":
        from .prune import run
    elif command == "diagnose":
        from ..tools.diagnose import run
    elif command == "bench":
        from ..tools.bench import command as run
    else:  # pragma: no cover - argparse rejects unknown commands first
        raise AssertionError(command)
    return run


def _run(command: str, args: argparse.Namespace) -> int:
    return _handler(command)(args)


def _fail(command: str, message: str, hint: str | None) -> None:
    print(f"aiockpt {command}: error: {message}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)


def _exit_status(error: AiockptError) -> int:
    """2 when the command as typed cannot run (fix the command), 1 when it ran and failed."""
    return 2 if isinstance(error, (UsageError, ConfigError)) else 1


def _hint(error: AiockptError) -> str | None:
    if error.hint is None and isinstance(error, CorruptCheckpointError):
        return "`aiockpt verify PATH` lists every damaged file and range"
    return error.hint  # a DirectoryLockedError's message already says what to do


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = args.command
    run = functools.partial(_run, command, args)
    from .._util.logs import level_from_env, log_to_stderr

    try:
        level = level_from_env()
    except ConfigError as exc:  # a bad AIOCKPT_LOG_LEVEL, like any other bad setting
        _fail(command, str(exc), exc.hint)
        return _exit_status(exc)
    with log_to_stderr(logging.WARNING if level is None else level):
        return _run_reporting_errors(command, run)


def _run_reporting_errors(command: str, run: Callable[[], int]) -> int:
    """``run()``'s exit status; what it raises, as one line on stderr and its status."""
    from .._util.console import CliError

    try:
        return run()
    except AiockptError as exc:
        _fail(command, str(exc), _hint(exc))
        return _exit_status(exc)
    except CliError as exc:
        _fail(command, str(exc), exc.hint)
        return exc.code
    except OSError as exc:
        _fail(command, str(exc), "check the path and its permissions")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Not an error aiockpt foresaw (torch, a bug): still one line, and the traceback
        # for whoever asks for it.
        logger.debug("aiockpt %s failed", command, exc_info=exc)
        _fail(
            command,
            f"{type(exc).__name__}: {exc}",
            "AIOCKPT_LOG_LEVEL=DEBUG shows the traceback; please report it if aiockpt is at fault",
        )
    return 1


if __name__ == "__main__":
    sys.exit(main())
