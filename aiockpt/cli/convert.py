"""``aiockpt export`` and ``aiockpt import``: to and from torch.save, safetensors and DCP.

Exports read (and verify) the checkpoint like ``aiockpt.load`` does and write the other
format next to its destination first, renaming it into place at the end, so an
interrupted export never leaves a half-written file under the name asked for.

Imports read their source as hostile input (``foreign``, ``foreign_dcp``: nothing runs,
nothing outside the source is opened, nothing blocks, nothing is allocated beyond what the
files hold), write it with the same writer training uses, and read the result back the way
``aiockpt.load`` does before reporting success.
"""

from __future__ import annotations

import os
import pickle
import secrets
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._engine.capture import check_state_name
from .._engine.reader import read_checkpoint, read_manifest
from .._format.manifest import Manifest, TensorRecord
from .._format.skeleton import tensor_paths
from .._format.tags import dtype_name
from .._util.console import note
from .._util.location import Location, storage_location
from ..errors import AiockptError, ConversionError, UnsupportedStateError, UsageError
from ..storage import open_storage
from ..storage.local import CheckpointInfo, step_dir_name
from .foreign import read_safetensors, read_torch, refused_global, tied_keys_left_out
from .foreign_dcp import read_dcp
from .scan import checkpoint_exists, resolve_checkpoint

__all__ = ["FORMATS", "export_checkpoint", "import_checkpoint", "run_export", "run_import"]

FORMATS = ("torch", "safetensors", "dcp")
_SAFETENSORS_HINT = "install it: pip install 'aiockpt[export]' (or pip install safetensors)"


def _portable(value: Any) -> Any:
    """The state with numpy values turned into torch/Python ones.

    ``torch.load(weights_only=True)`` refuses numpy arrays and scalars (numpy RNG state
    holds both), and DCP would pickle them; tensors and plain numbers load everywhere.
    """
    if isinstance(value, torch.Tensor):
        return value
    module = type(value).__module__
    if module.startswith("numpy"):
        import numpy as np

        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, np.generic):
            return value.item()
    if isinstance(value, OrderedDict):
        copy: OrderedDict[Any, Any] = OrderedDict((k, _portable(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            copy._metadata = value._metadata  # type: ignore[attr-defined]
        return copy
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_portable(v) for v in value)
    return value


def _temporary_next_to(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UsageError(f"{out} already exists", hint="choose another name, or pass --force")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such directory", hint="create it first")


def _tensors_of(manifest: Manifest, keys: list[str]) -> set[str]:
    """Names of the tensors reachable from ``keys``, so that only their bytes are read."""
    missing = [k for k in keys if k not in manifest.state]
    if missing:
        raise UsageError(
            f"the checkpoint has no top-level key {', '.join(map(repr, missing))}",
            hint=f"it holds: {', '.join(manifest.state)}",
        )
    # By path, not by name prefix: a tensor first found under "model" may also be
    # referenced from another key (tied state), and must be read for either.
    return {manifest.tensors[i].name for k in keys for i in tensor_paths(manifest.state[k], k)}


# -- export -----------------------------------------------------------------------------------


def _flat_tensors(value: Any, prefix: str, out: dict[str, torch.Tensor]) -> int:
    """Tensors of a nested state under dotted names; returns how many non-tensors it skipped."""
    skipped = 0
    if isinstance(value, torch.Tensor):
        if prefix in out:
            raise ConversionError(
                f"two tensors flatten to the same name {prefix!r}",
                hint="export fewer keys (--key), or use --to torch or --to dcp",
            )
        out[prefix] = value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            skipped += _flat_tensors(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            skipped += _flat_tensors(v, f"{prefix}.{i}" if prefix else str(i), out)
    else:
        skipped += 1
    return skipped


def _check_safetensors_installed() -> None:
    try:
        import safetensors  # noqa: F401
    except ImportError as exc:
        raise ConversionError(
            "--to safetensors needs the safetensors package", _SAFETENSORS_HINT
        ) from exc
    try:
        import numpy  # noqa: F401  (safetensors.torch writes tensors through it)
    except ImportError as exc:
        raise ConversionError(
            "--to safetensors needs numpy, which safetensors writes tensors with",
            hint="install it: pip install numpy (or use --to torch)",
        ) from exc


# The dtypes of the safetensors format, for a safetensors that does not list its own.
_SAFETENSORS_DTYPES = frozenset(
    getattr(torch, name, None)
    for name in [
        "bool",
        "uint8",
        "int8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "complex64",
        "float8_e4m3fn",
        "float8_e5m2",
    ]
) - {None}


def _check_safetensors_dtypes(records: list[TensorRecord]) -> None:
    """Refuse tensors whose dtype the safetensors format has no name for, naming them."""
    import safetensors.torch

    known = getattr(safetensors.torch, "_SIZE", None)
    supported = set(known) if isinstance(known, dict) else _SAFETENSORS_DTYPES
    for record in records:
        if record.dtype not in supported:
            raise ConversionError(
                f"tensor {record.name!r} is {dtype_name(record.dtype)}, which safetensors "
                "cannot hold; nothing was written",
                hint="export to torch instead (--to torch), or leave that key out with --key",
            )


def _export_safetensors(state: dict[str, Any], out: Path, step: int) -> dict[str, Any]:
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise ConversionError(
            "--to safetensors needs the safetensors package", _SAFETENSORS_HINT
        ) from exc
    flat: dict[str, torch.Tensor] = {}
    # One key: its names are the module's own ("fc1.weight"), so that
    # model.load_state_dict(safetensors.torch.load_file(OUT)) works; several keep theirs.
    if len(state) == 1:
        skipped = _flat_tensors(next(iter(state.values())), "", flat)
    else:
        skipped = _flat_tensors(state, "", flat)
    if not flat:
        raise ConversionError(
            f"no tensors under {', '.join(state)}", hint="pick keys that hold tensors with --key"
        )
    seen: set[int] = set()
    for name, tensor in flat.items():
        # safetensors refuses tensors sharing memory (tied weights): store each copy.
        if id(tensor) in seen or not tensor.is_contiguous():
            flat[name] = tensor.contiguous().clone()
        seen.add(id(tensor))
    metadata = {"format": "pt", "aiockpt_step": str(step), "aiockpt_keys": ",".join(state)}
    temporary = _temporary_next_to(out)
    try:
        save_file(flat, str(temporary), metadata=metadata)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return {"tensors": len(flat), "skipped_values": skipped}


def _check_loads_weights_only(written: Path, out: Path) -> None:
    """Refuse to publish a torch export that ``torch.load(weights_only=True)`` refuses.

    mmap: only the pickled structure is read, not the tensors' bytes.
    """
    try:
        torch.load(written, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        what = refused_global(exc) or "a value"
        raise ConversionError(
            f"{out}: not written: the state holds {what}, which torch.load(weights_only=True) "
            "refuses",
            hint="export to dcp or safetensors instead, or leave that key out with --key",
        ) from exc


def _export_dcp(state: dict[str, Any], out: Path, threads: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    temporary = _temporary_next_to(out)
    try:
        with warnings.catch_warnings():
            # Saving without a process group is what we want; torch warns that it assumes so.
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(
                state,
                storage_writer=dcp.FileSystemWriter(temporary, thread_count=max(1, threads)),
                no_dist=True,
            )
        if out.exists():  # --force: swap the new directory in, then drop the old one
            trash = _temporary_next_to(out)
            os.rename(out, trash)
            os.rename(temporary, out)
            if trash.is_dir():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink()
        else:
            os.rename(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return {"files": sorted(p.name for p in out.iterdir())}


def export_checkpoint(
    path: Location,
    to: str,
    out: Path,
    *,
    keys: list[str] | None = None,
    force: bool = False,
    threads: int = 8,
    verify: bool = True,
) -> dict[str, Any]:
    """Write checkpoint ``path`` as format ``to`` at ``out``; a JSON-ready summary.

    ``UsageError`` when the arguments cannot work (an unknown format or key, an ``out``
    that exists without ``force``), ``ConversionError`` when the state or the environment
    refuses (a dtype the format lacks, safetensors not installed).
    """
    _check_destination(out, force)
    if to == "safetensors":
        _check_safetensors_installed()
    manifest = read_manifest(path)
    if to == "safetensors" and not keys:
        keys = ["model"] if "model" in manifest.state else None
    wanted = _tensors_of(manifest, keys) if keys else None
    if to == "safetensors":
        # Before reading gigabytes, and before anything is written.
        _check_safetensors_dtypes(
            [t for t in manifest.tensors if wanted is None or t.name in wanted]
        )
    loaded = read_checkpoint(
        path,
        select=None if wanted is None else (lambda record: record.name in wanted),
        threads=threads,
        verify=verify,
    )
    state = _portable(loaded.state("cpu", keys=keys))
    report: dict[str, Any] = {
        "source": str(path),
        "step": loaded.manifest.step,
        "format": to,
        "output": str(out),
        "keys": list(state),
        "bytes_read": loaded.bytes_read,
    }
    if to == "torch":
        temporary = _temporary_next_to(out)
        try:
            torch.save(state, temporary)
            _check_loads_weights_only(temporary, out)
            os.replace(temporary, out)
        finally:
            temporary.unlink(missing_ok=True)
    elif to == "safetensors":
        report.update(_export_safetensors(state, out, loaded.manifest.step))
    elif to == "dcp":
        report.update(_export_dcp(state, out, threads))
    else:
        raise UsageError(f"unknown format {to!r}", hint=f"use one of {', '.join(FORMATS)}")
    return report


# -- import -----------------------------------------------------------------------------------


def _optimizer_keys_as_ints(node: Any) -> Any:
    """Give optimizer state its int parameter keys back.

    DCP names every value by a string path, so an optimizer's ``state`` comes back keyed
    ``"0", "1", ...``; ``load_state_dict`` matches them against the int ids in
    ``param_groups`` and would silently keep none of them.
    """
    if not isinstance(node, dict):
        return node
    groups, per_param = node.get("param_groups"), node.get("state")
    if isinstance(groups, list) and isinstance(per_param, dict):
        ids = {p for group in groups if isinstance(group, dict) for p in group.get("params", [])}
        if ids and all(isinstance(p, int) for p in ids):
            node["state"] = {
                int(k) if isinstance(k, str) and k.isdigit() and int(k) in ids else k: v
                for k, v in per_param.items()
            }
        return node
    for key, value in node.items():
        node[key] = _optimizer_keys_as_ints(value)
    return node


def _as_groups(obj: Any, key: str | None) -> dict[str, Any]:
    """The top-level keys to save under: the file's own keys, or everything under ``key``."""
    if key is not None:
        return {key: obj}
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        # A bare state_dict ({"fc1.weight": tensor, ...}) is a model, not a set of groups.
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"model": dict(obj)}
        return dict(obj)
    return {"model": obj}


def _read_foreign(source: Path, fmt: str) -> Any:
    if fmt == "torch":
        return read_torch(source)
    if fmt == "safetensors":
        return read_safetensors(source)
    return _optimizer_keys_as_ints(read_dcp(source))


def _check_top_level(groups: dict[str, Any], source: Path) -> None:
    """Top-level keys become the keyword names a Checkpointer restores by; refuse those that
    cannot be such a name before anything is written."""
    for name in groups:
        try:
            check_state_name(name)  # the rule the Checkpointer applies to its keywords
        except UnsupportedStateError:
            raise ConversionError(
                f"{source}: top-level key {name!r} cannot name a checkpointed object "
                "(it must be a non-empty string without '/' that does not start with '$')",
                hint="put everything under one name with --key NAME",
            ) from None


class _Holder:
    """A Stateful that hands the imported state to the checkpointer unchanged."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def import_checkpoint(
    source: Path,
    fmt: str,
    step: int,
    directory: Location,
    *,
    key: str | None = None,
    force: bool = False,
    threads: int = 8,
) -> dict[str, Any]:
    """Write the state in ``source`` as checkpoint ``step`` of ``directory``.

    ``UsageError`` when the arguments cannot work (no ``source``, an unknown format, a
    ``step`` that exists without ``force``), ``ConversionError`` when the source is refused.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    if not os.path.lexists(source):
        raise UsageError(f"{source}: no such file or directory", hint="check the path")
    target = directory / step_dir_name(step)
    if checkpoint_exists(target) and not force:
        raise UsageError(
            f"{target} already exists",
            hint="pick another --step, or pass --force to replace it",
        )
    loaded = _read_foreign(source, fmt)
    groups = _as_groups(loaded, key)
    _check_top_level(groups, source)
    keys = list(groups)
    tied = tied_keys_left_out(source, list(loaded)) if fmt == "safetensors" else {}
    info = _write_imported(groups, source, step, directory, threads)
    del loaded, groups  # the read-back below holds a whole state again: not two at once
    if info is None:  # only a writer that skips under backpressure returns none
        raise ConversionError(f"{target} was not written: the writer skipped it", hint="run again")
    written = info.path
    _verify_written(written)
    return {
        "source": str(source),
        "format": fmt,
        "step": step,
        "checkpoint": str(written),
        "nbytes": info.nbytes,
        "keys": keys,
        "tied_keys_missing": [
            {"key": name, "tied_to": embedding, "under": keys[0]}
            for name, embedding in tied.items()
        ],
    }


def _write_imported(
    groups: dict[str, Any], source: Path, step: int, directory: Location, threads: int
) -> CheckpointInfo | None:
    """Save ``groups`` as checkpoint ``step`` with the writer training uses."""
    from ..checkpointer import SyncCheckpointer
    from ..config import Config

    # keep_last=None: importing must never prune the checkpoints already there.
    config = Config(directory=directory, keep_last=None, num_threads=max(1, threads))
    holders = {name: _Holder(value) for name, value in groups.items()}
    try:
        with SyncCheckpointer(config, **holders) as writer:
            return writer.checkpoint(step).wait()
    except UnsupportedStateError as exc:
        raise ConversionError(
            f"{source}: {exc}", hint="re-save the file without that value, or convert it"
        ) from exc
    except RecursionError as exc:
        raise ConversionError(
            f"{source}: its state nests too deep to be saved",
            hint="re-save it with flatter containers",
        ) from exc


def _verify_written(path: Location) -> None:
    """Read back what an import wrote the way ``aiockpt.load`` does; withdraw it if refused.

    An import must not report success for a checkpoint that restore would then refuse (or
    silently skip for an older one).
    """
    try:
        read_checkpoint(path, verify=True).state("cpu")
    except AiockptError as exc:
        _withdraw(path)
        raise ConversionError(
            f"the imported checkpoint fails to load back, so it was removed: {exc}",
            hint="re-save the source with plain state_dicts, or put it under --key NAME",
        ) from exc


def _withdraw(path: Location) -> None:
    """Delete checkpoint ``path`` under its directory's lock, and point ``latest`` at the
    newest one left (or remove it), so that nothing names what is gone."""
    store = open_storage(path.parent, durable=True)
    store.open()
    try:
        store.remove(path)
        if store.latest_name() == path.name:
            remaining = store.list_committed()
            store.point_latest(remaining[-1].path.name if remaining else None)
    finally:
        store.close()


def run_export(args: Any) -> int:
    from .._util.console import human_bytes, print_json

    given = storage_location(args.path)
    path = resolve_checkpoint(given, args.step)
    if args.step is None and path != given:
        # Said on stderr so that --json output stays one document.
        note(f"{given}: using its newest checkpoint, {path.name}")
    report = export_checkpoint(
        path,
        args.to,
        Path(args.out),
        keys=args.key,
        force=args.force,
        threads=args.threads,
        verify=not args.no_verify,
    )
    if args.json:
        print_json(report)
    else:
        extra = ""
        if report.get("skipped_values"):
            extra = f" ({report['skipped_values']} non-tensor values left out)"
        print(
            f"exported step {report['step']} ({', '.join(report['keys'])}; "
            f"{human_bytes(report['bytes_read'])}) to {report['output']} as {args.to}{extra}"
        )
    return 0


def run_import(args: Any) -> int:
    from .._util.console import human_bytes, print_json

    report = import_checkpoint(
        Path(args.source),
        args.format,
        args.step,
        storage_location(args.directory),
        key=args.key,
        force=args.force,
        threads=args.threads,
    )
    if args.json:
        print_json(report)
    else:
        size = human_bytes(report["nbytes"]) if report["nbytes"] is not None else "?"
        print(
            f"imported {report['source']} ({', '.join(report['keys'])}) as "
            f"{report['checkpoint']} ({size})"
        )
    for tie in report["tied_keys_missing"]:
        # stderr, also with --json (where the same facts are a field): restore() would fail.
        key, tied_to = tie["key"], tie["tied_to"]
        note(
            f"warning: {key} is not in {report['source']}: its config.json ties it to "
            f"{tied_to} (tie_word_embeddings), and restore() will fail on the missing "
            f"{tie['under']}/{key}; to import it tied: sd = safetensors.torch.load_file(SRC); "
            f"sd[{key!r}] = sd[{tied_to!r}]; torch.save(sd, 'tied.pt'), then import tied.pt "
            "with --from torch"
        )
    return 0
