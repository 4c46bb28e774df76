"""``aiockpt export`` and ``aiockpt import``: to and from torch.save, safetensors and DCP.

Exports read (and verify) the checkpoint like ``aiockpt.load`` does and write the other
format next to its destination first, renaming it into place at the end, so an
interrupted export never leaves a half-written file under the name asked for.

Imports never run code from the file they read: torch files are loaded with
``weights_only=True``; safetensors has no code to run; for DCP, whose metadata file is a
pickle, the metadata is read through an unpickler that only admits DCP's own metadata
classes, and non-tensor values with ``weights_only=True``.
"""

from __future__ import annotations

import io
import os
import pickle
import secrets
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._engine.capture.flatten import tensor_paths
from .._engine.reader import read_checkpoint, read_manifest
from .._format.manifest import Manifest
from .._util.console import CliError
from .scan import resolve_checkpoint

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
        raise CliError(f"{out} already exists", hint="choose another name, or pass --force")
    if not out.parent.is_dir():
        raise CliError(f"{out.parent}: no such directory", hint="create it first")


def _tensors_of(manifest: Manifest, keys: list[str]) -> set[str]:
    """Names of the tensors reachable from ``keys``, so that only their bytes are read."""
    missing = [k for k in keys if k not in manifest.state]
    if missing:
        raise CliError(
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
            raise CliError(
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


def _export_safetensors(state: dict[str, Any], out: Path, step: int) -> dict[str, Any]:
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise CliError("--to safetensors needs the safetensors package", _SAFETENSORS_HINT) from exc
    flat: dict[str, torch.Tensor] = {}
    # One key: its names are the module's own ("fc1.weight"), so that
    # model.load_state_dict(safetensors.torch.load_file(OUT)) works; several keep theirs.
    if len(state) == 1:
        skipped = _flat_tensors(next(iter(state.values())), "", flat)
    else:
        skipped = _flat_tensors(state, "", flat)
    if not flat:
        raise CliError(
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
    path: Path,
    to: str,
    out: Path,
    *,
    keys: list[str] | None = None,
    force: bool = False,
    threads: int = 8,
    verify: bool = True,
) -> dict[str, Any]:
    """Write checkpoint ``path`` as format ``to`` at ``out``; a JSON-ready summary."""
    _check_destination(out, force)
    if to == "safetensors":
        try:
            import safetensors  # noqa: F401  (fail before reading gigabytes)
        except ImportError as exc:
            raise CliError(
                "--to safetensors needs the safetensors package", _SAFETENSORS_HINT
            ) from exc
    manifest = read_manifest(path)
    if to == "safetensors" and not keys:
        keys = ["model"] if "model" in manifest.state else None
    wanted = _tensors_of(manifest, keys) if keys else None
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
            os.replace(temporary, out)
        finally:
            temporary.unlink(missing_ok=True)
    elif to == "safetensors":
        report.update(_export_safetensors(state, out, loaded.manifest.step))
    elif to == "dcp":
        report.update(_export_dcp(state, out, threads))
    else:
        raise CliError(f"unknown format {to!r}", hint=f"use one of {', '.join(FORMATS)}")
    return report


# -- import -----------------------------------------------------------------------------------


class _DcpMetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle; admit only the classes DCP itself puts there."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("pathlib", "Path"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or module == "torch.distributed.checkpoint.metadata":
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"DCP metadata names {module}.{name}, which a checkpoint's metadata never needs"
        )


def _read_dcp(source: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    try:
        from torch.distributed.checkpoint._traverse import set_element
    except ImportError:  # pragma: no cover - moved in some torch release
        set_element = None  # type: ignore[assignment]

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            with open(Path(self.path) / ".metadata", "rb") as file:
                metadata = _DcpMetadataUnpickler(file).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(".metadata does not hold DCP Metadata")
            storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
            storage_meta.load_id = self.load_id
            metadata.storage_meta = storage_meta
            return metadata

    class SafePlanner(_EmptyStateDictLoadPlanner):
        # DCP loads non-tensor values with weights_only=False (arbitrary code); not here.
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict and set_element is not None:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    if not (source / ".metadata").is_file():
        raise CliError(
            f"{source}: not a torch.distributed.checkpoint directory (no .metadata)",
            hint="pass the directory that dcp.save wrote",
        )
    state: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        _load_state_dict(
            state, storage_reader=SafeReader(source), planner=SafePlanner(), no_dist=True
        )
    return _optimizer_keys_as_ints(state)


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


_WRITERS = {
    "torch": "torch.save",
    "safetensors": "safetensors.torch.save_file",
    "dcp": "torch.distributed.checkpoint.save",
}


def _read_foreign(source: Path, fmt: str, key: str | None) -> dict[str, Any]:
    if fmt == "torch":
        return _as_groups(torch.load(source, map_location="cpu", weights_only=True), key)
    if fmt == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CliError(
                "--from safetensors needs the safetensors package", _SAFETENSORS_HINT
            ) from exc
        try:
            tensors = load_file(str(source))
        except Exception as exc:  # SafetensorError derives from Exception only
            raise CliError(
                f"{source}: cannot be read as safetensors: {exc}",
                hint="check that it was written by safetensors, or pick the right --from",
            ) from exc
        # A flat {name: tensor} file is one module's weights: saved under one key.
        return {key or "model": tensors}
    return _as_groups(_read_dcp(source), key)


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
    directory: Path,
    *,
    key: str | None = None,
    force: bool = False,
    threads: int = 8,
) -> dict[str, Any]:
    """Write the state in ``source`` as checkpoint ``step`` of ``directory``."""
    from ..checkpointer import SyncCheckpointer
    from ..config import Config

    if not source.exists():
        raise CliError(f"{source}: no such file or directory", hint="check the path")
    target = directory / f"step-{step}"
    if target.exists() and not force:
        raise CliError(
            f"{target} already exists",
            hint="pick another --step, or pass --force to replace it",
        )
    if fmt not in FORMATS:
        raise CliError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    try:
        groups = _read_foreign(source, fmt, key)
    except CliError:
        raise
    except pickle.UnpicklingError as exc:
        raise CliError(
            f"{source}: holds objects beyond tensors and plain containers, so it cannot be "
            f"loaded safely: {str(exc).splitlines()[0]}",
            hint="re-save it from Python as plain state_dicts, e.g. "
            "torch.save({'model': model.state_dict()}, path)",
        ) from exc
    except (RuntimeError, ValueError, OSError, EOFError, KeyError) as exc:
        raise CliError(
            f"{source}: cannot be read as {fmt}: {str(exc).strip().splitlines()[0]}",
            hint=f"check that it was written by {_WRITERS[fmt]}, or pick the right --from",
        ) from exc
    # keep_last=None: importing must never prune the checkpoints already there.
    config = Config(directory=directory, keep_last=None, num_threads=max(1, threads))
    holders = {name: _Holder(value) for name, value in groups.items()}
    with SyncCheckpointer(config, **holders) as writer:
        info = writer.checkpoint(step).wait()
    return {
        "source": str(source),
        "format": fmt,
        "step": step,
        "checkpoint": str(info.path if info else target),
        "nbytes": info.nbytes if info else None,
        "keys": list(groups),
    }


def run_export(args: Any) -> int:
    from .._util.console import human_bytes, print_json

    path = resolve_checkpoint(Path(args.path), args.step)
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
        Path(args.directory),
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
    return 0
