"""``aiockpt inspect``: what a checkpoint holds, from its manifest; one tensor's statistics.

The tree view reads only ``manifest.json``. ``--tensor`` reads just that tensor's byte
ranges (``read_checkpoint(select=...)``), so inspecting one weight of a 100 GB checkpoint
costs the weight, not the checkpoint.
"""

from __future__ import annotations

import difflib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .._engine.memory import byte_view
from .._engine.reader import read_checkpoint, validate_checkpoint
from .._format.manifest import Manifest, TensorRecord
from .._format.skeleton import tensor_paths
from .._format.tags import TENSOR_TAG, dtype_name
from .._util.console import (
    human_bytes,
    human_time,
    iso_time,
    json_number,
    note,
    print_json,
    stdout_console,
)
from .._util.location import Location, storage_location
from ..errors import UsageError
from ..storage.fileio import checksum
from ..storage.sharing import disk_usage
from .scan import resolve_checkpoint

__all__ = ["describe", "run", "tensor_stats"]

# Lists of plain values longer than this (RNG states) are abbreviated in the text view.
_MAX_LIST_SHOWN = 8


def _groups(manifest: Manifest) -> dict[int, str]:
    """Tensor index -> the top-level key (``model``, ``optimizer``...) it was first found in."""
    group: dict[int, str] = {}
    for key, value in manifest.state.items():
        for index in tensor_paths(value, key):
            group.setdefault(index, key)
    return group


def _tensor_aliases(manifest: Manifest) -> dict[int, list[str]]:
    return tensor_paths(manifest.state)


def _plain_items(items: list[Any]) -> bool:
    return all(not isinstance(v, (dict, list)) for v in items)


def _value_leaves(node: Any, path: str, out: dict[str, Any]) -> None:
    """Every non-tensor leaf of the skeleton, by path, in its JSON encoding."""
    if isinstance(node, dict):
        tag = next(iter(node), None)
        if tag in (TENSOR_TAG, "$ndarray"):
            return
        if tag == "$tuple":
            if _plain_items(node[tag]):
                out[path] = node  # (0.9, 0.999), or Python's RNG state: one leaf
                return
            for i, v in enumerate(node[tag]):
                _value_leaves(v, f"{path}/{i}", out)
            return
        if tag == "$odict":
            _value_leaves(node[tag], path, out)
            return
        if tag == "$dict":
            for k, v in node[tag]:
                _value_leaves(v, f"{path}/{json.dumps(k)}", out)
            return
        if isinstance(tag, str) and tag.startswith("$"):
            out[path] = node  # $float, $bytes, $dtype, $npscalar: a leaf in tagged form
            return
        for k, v in node.items():
            _value_leaves(v, f"{path}/{k}" if path else k, out)
        return
    if isinstance(node, list):
        if _plain_items(node):
            out[path] = node  # a list of plain values is one leaf (e.g. an RNG state)
            return
        for i, v in enumerate(node):
            _value_leaves(v, f"{path}/{i}", out)
        return
    out[path] = node


def describe(path: Location) -> dict[str, Any]:
    """The ``inspect`` report: manifest summary, tensors by group, non-tensor values.

    The checkpoint passes the checks restore makes before reading tensor bytes, so what
    inspect shows is never something that restore would refuse."""
    manifest = validate_checkpoint(path)
    group_of = _groups(manifest)
    aliases = _tensor_aliases(manifest)
    groups: dict[str, dict[str, Any]] = {
        key: {"tensors": 0, "nbytes": 0, "dtypes": defaultdict(int)} for key in manifest.state
    }
    tensors = []
    layers: dict[str, dict[str, int]] = {}
    for index, record in enumerate(manifest.tensors):
        key = group_of.get(index, record.name.split("/", 1)[0])
        group = groups.setdefault(key, {"tensors": 0, "nbytes": 0, "dtypes": defaultdict(int)})
        group["tensors"] += 1
        group["nbytes"] += record.nbytes
        group["dtypes"][dtype_name(record.dtype)] += record.nbytes
        if record.layer is not None:
            layer = layers.setdefault(record.layer, {"tensors": 0, "nbytes": 0})
            layer["tensors"] += 1
            layer["nbytes"] += record.nbytes
        tensors.append(
            {
                "index": index,
                "name": record.name,
                "group": key,
                "dtype": dtype_name(record.dtype),
                "shape": list(record.shape),
                "nbytes": record.nbytes,
                "layer": record.layer,
                "files": sorted({p.file for p in record.pieces}),
                "also_at": [p for p in aliases.get(index, []) if p != record.name],
            }
        )
    values: dict[str, Any] = {}
    _value_leaves(manifest.state, "", values)
    # Files are shared by hard link on local disks only.
    ((on_disk, shared, _),) = (
        disk_usage([path]) if isinstance(path, Path) else [(manifest.nbytes, 0, manifest.nbytes)]
    )
    return {
        "path": str(path),
        "step": manifest.step,
        "created": manifest.created,
        "created_iso": iso_time(manifest.created),
        "world_size": manifest.world_size,
        "versions": manifest.versions,
        "files": [{"name": f.name, "nbytes": f.nbytes} for f in manifest.files],
        "nbytes": manifest.nbytes,
        "tensor_bytes": sum(t.nbytes for t in manifest.tensors),
        # Logical: the tensors' bytes. Physical: what its data files take on disk, and of
        # that what it shares with other checkpoints (unchanged tensors, incremental).
        "logical_bytes": sum(t.nbytes for t in manifest.tensors),
        "physical_bytes": on_disk,
        "shared_bytes": shared,
        "groups": {k: {**g, "dtypes": dict(g["dtypes"])} for k, g in groups.items()},
        "layers": layers,
        "tensors": tensors,
        "values": values,
    }


def _short(value: Any) -> str:
    brackets = "[]"
    if isinstance(value, dict) and next(iter(value), None) == "$tuple":
        value, brackets = value["$tuple"], "()"
    if isinstance(value, list):
        if len(value) > _MAX_LIST_SHOWN:
            head = ", ".join(json.dumps(v) for v in value[:3])
            return f"{brackets[0]}{head}, ... {len(value)} items{brackets[1]}"
        return brackets[0] + ", ".join(json.dumps(v) for v in value) + brackets[1]
    text = json.dumps(value)
    return text if len(text) <= 200 else text[:197] + "..."


def render(report: dict[str, Any], *, summary: bool) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.tree import Tree

    console = stdout_console()
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    root = Tree(
        f"[bold]{escape(report['path'])}[/bold]: step {report['step']}, "
        f"{human_time(report['created'])}, world size {report['world_size']}, "
        f"{len(report['files'])} files, {human_bytes(report['nbytes'])}"
        f" (logical {human_bytes(report['logical_bytes'])}, on disk "
        f"{human_bytes(report['physical_bytes'])} of which shared "
        f"{human_bytes(report['shared_bytes'])})" + (f" ({escape(versions)})" if versions else "")
    )
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for tensor in report["tensors"]:
        by_group[tensor["group"]].append(tensor)
    values_by_group: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for path, value in report["values"].items():
        values_by_group[path.split("/", 1)[0]].append((path, value))
    has_layers = bool(report["layers"])
    for key, group in report["groups"].items():
        dtypes = ", ".join(
            f"{d} {human_bytes(n)}" for d, n in sorted(group["dtypes"].items(), key=lambda x: -x[1])
        )
        node = root.add(
            f"[bold]{escape(key)}[/bold]: {group['tensors']} tensors, "
            f"{human_bytes(group['nbytes'])}" + (f" ({dtypes})" if dtypes else "")
        )
        if summary:
            continue
        if by_group[key]:
            table = Table(box=None, pad_edge=False, show_edge=False)
            table.add_column("name", no_wrap=True)
            table.add_column("dtype", no_wrap=True)
            table.add_column("shape", no_wrap=True)
            table.add_column("bytes", justify="right", no_wrap=True)
            if has_layers:
                table.add_column("layer", no_wrap=True)
            for tensor in by_group[key]:
                name = tensor["name"].removeprefix(f"{key}/")
                if tensor["also_at"]:
                    name += f"  (= {', '.join(tensor['also_at'])})"
                row = [
                    escape(name),
                    tensor["dtype"],
                    escape(str(tensor["shape"])),
                    human_bytes(tensor["nbytes"]),
                ]
                if has_layers:
                    row.append(escape(tensor["layer"] or "-"))
                table.add_row(*row)
            node.add(table)
        if values_by_group[key]:
            values = node.add("values")
            for path, value in values_by_group[key]:
                shown = path.removeprefix(f"{key}/") if path != key else key
                values.add(f"{escape(shown)} = {escape(_short(value))}")
    if has_layers:
        layers = root.add("[bold]layers[/bold]")
        for name, layer in report["layers"].items():
            size = human_bytes(layer["nbytes"])
            layers.add(f"{escape(name)}: {layer['tensors']} tensors, {size}")
    console.print(root)


# -- one tensor ------------------------------------------------------------------------------


def _find(manifest: Manifest, name: str) -> tuple[int, TensorRecord]:
    for index, record in enumerate(manifest.tensors):
        if record.name == name:
            return index, record
    # Also accept any path at which it appears (a tied weight's second name), and dotted
    # names as people write them ("model.fc1.weight" for "model/fc1.weight").
    for index, paths in tensor_paths(manifest.state).items():
        if name in paths or name in {p.replace("/", ".") for p in paths}:
            return index, manifest.tensors[index]
    for index, record in enumerate(manifest.tensors):
        if record.name.replace("/", ".") == name:
            return index, record
    names = [t.name for t in manifest.tensors]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    raise UsageError(
        f"no tensor named {name!r} in this checkpoint",
        hint=(f"did you mean: {', '.join(close)}? " if close else "")
        + "`aiockpt inspect PATH` lists every tensor name",
    )


def _number(value: torch.Tensor) -> float | int | bool:
    item = value.item()
    return item if isinstance(item, (bool, int)) else float(item)


def tensor_stats(path: Location, name: str, *, threads: int = 8) -> dict[str, Any]:
    """Statistics of one tensor, reading only its bytes; checksums checked, not raised."""
    manifest = validate_checkpoint(path)
    index, record = _find(manifest, name)
    # verify=False: a bad checksum is reported as a result below instead of an error, so
    # the statistics still show what the damaged bytes hold.
    loaded = read_checkpoint(
        path, select=lambda r: r.name == record.name, threads=threads, verify=False
    )
    tensor = loaded.tensors[index]
    flat = tensor.reshape(-1).contiguous()  # keeps the memory byte_view points into alive
    raw = byte_view(flat)
    bad_pieces = []
    done = 0
    for piece in record.pieces:
        if checksum(raw[done : done + piece.length]) != piece.checksum:
            bad_pieces.append(
                {"file": piece.file, "start": piece.offset, "end": piece.offset + piece.length}
            )
        done += piece.length
    report: dict[str, Any] = {
        "path": str(path),
        "name": record.name,
        "dtype": dtype_name(record.dtype),
        "shape": list(record.shape),
        "numel": tensor.numel(),
        "nbytes": record.nbytes,
        "layer": record.layer,
        "pieces": len(record.pieces),
        "bytes_read": loaded.bytes_read,
        "checksum_ok": not bad_pieces,
        "bad_pieces": bad_pieces,
    }
    report.update(_statistics(tensor))
    return report


def _statistics(tensor: torch.Tensor) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "kind": "empty",
        "min": None,
        "max": None,
        "mean": None,
        "std": None,
        "nan": 0,
        "inf": 0,
        "zeros": 0,
    }
    if tensor.numel() == 0:
        return stats
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        values = flat.to(torch.float64)
        stats.update(kind="bool", min=bool(flat.min()), max=bool(flat.max()))
        stats.update(mean=float(values.mean()), zeros=int((~flat).sum()))
        return stats
    if flat.is_complex():
        bad = ~torch.isfinite(flat)
        stats["nan"] = int(torch.isnan(flat).sum())
        stats["inf"] = int(bad.sum()) - stats["nan"]
        # Complex numbers have no order: the statistics are of their magnitudes.
        values = flat[~bad].abs().to(torch.float64)
        stats["kind"] = "complex (statistics of |x|)"
    elif flat.is_floating_point():
        # float64 holds every value of every float dtype exactly (fp8 and bf16 included).
        values = flat.to(torch.float64)
        stats["nan"] = int(torch.isnan(values).sum())
        stats["inf"] = int(torch.isinf(values).sum())
        values = values[torch.isfinite(values)]
        stats["kind"] = "floating (statistics of finite values)"
    else:
        values = flat.to(torch.float64)
        stats["kind"] = "integer"
        try:  # exact extremes in the tensor's own dtype (int64 beyond 2**53 included)
            stats.update(min=_number(flat.min()), max=_number(flat.max()))
        except RuntimeError:  # a dtype without min/max kernels (e.g. uint32 on older torch)
            stats.update(min=_number(values.min()), max=_number(values.max()))
    stats["zeros"] = int((flat == 0).sum())
    if values.numel():
        if stats["min"] is None:
            stats.update(min=_number(values.min()), max=_number(values.max()))
        stats["mean"] = float(values.mean())
        stats["std"] = float(values.std()) if values.numel() > 1 else 0.0
    return stats


def render_stats(report: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", no_wrap=True)

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}" if math.isfinite(value) else str(value)
        return "-" if value is None else str(value)

    checks = "ok" if report["checksum_ok"] else "[red]FAILED[/red]"
    rows = [
        ("tensor", escape(report["name"])),
        ("checkpoint", escape(report["path"])),
        ("dtype", report["dtype"]),
        ("shape", escape(str(report["shape"]))),
        ("elements", str(report["numel"])),
        ("bytes", f"{report['nbytes']} ({human_bytes(report['nbytes'])})"),
        ("kind", report["kind"]),
        ("min", fmt(report["min"])),
        ("max", fmt(report["max"])),
        ("mean", fmt(report["mean"])),
        ("std", fmt(report["std"])),
        ("zeros", str(report["zeros"])),
        ("NaN", str(report["nan"])),
        ("inf", str(report["inf"])),
        ("checksum", f"{checks} ({report['pieces']} pieces)"),
    ]
    if report["layer"]:
        rows.insert(4, ("layer", escape(report["layer"])))
    for field, value in rows:
        table.add_row(field, value)
    console.print(table)
    for bad in report["bad_pieces"]:
        console.print(
            f"  [red]{escape(bad['file'])} bytes {bad['start']}..{bad['end']}[/red]: "
            "crc32c mismatch (`aiockpt verify` checks the whole checkpoint)"
        )


def run(args: Any) -> int:
    given = storage_location(args.path)
    path = resolve_checkpoint(given, args.step)
    if args.step is None and path != given:
        # Said on stderr so that --json output stays one document.
        note(f"{given}: using its newest checkpoint, {path.name}")
    if args.tensor is not None:
        report = tensor_stats(path, args.tensor, threads=args.threads)
        if args.json:
            print_json(
                {k: json_number(v) if isinstance(v, float) else v for k, v in report.items()}
            )
        else:
            render_stats(report)
        return 0 if report["checksum_ok"] else 1
    report = describe(path)
    if args.json:
        print_json(report)
    else:
        render(report, summary=args.summary)
    return 0
