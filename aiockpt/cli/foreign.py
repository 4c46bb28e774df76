"""Reading torch.save and safetensors files for ``aiockpt import``, as hostile input.

A file to import may come from anywhere, so reading it must never run code, open anything
outside it, block, or allocate more than it holds:

- every file is opened with O_NONBLOCK (a FIFO planted as the source would otherwise block
  open() forever) and must be a regular file by fstat before a byte is read;
- torch files must be torch.save's zip archives of stored (uncompressed) records that lie
  inside the file, so that no declared size exceeds what the file holds, and load with
  ``torch.load(weights_only=True)``.

DCP directories are read by :mod:`aiockpt.cli.foreign_dcp` with the same helpers.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..storage.fileio import read_exact

__all__ = [
    "first_line",
    "load_weights",
    "read_range",
    "read_safetensors",
    "read_torch",
    "refused_global",
    "regular_file",
    "tied_keys_left_out",
]

# config.json of a Hugging Face model is a few KiB.
_MAX_CONFIG_BYTES = 16 * 2**20

_RESAVE_HINT = (
    "load it in Python from a source you trust and save plain state_dicts, e.g. "
    "torch.save({'model': model.state_dict()}, path)"
)


# -- opening files -----------------------------------------------------------------------------


def _kind_of(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular(path: Path, *, follow_symlinks: bool) -> tuple[int, int]:
    """Open ``path`` read-only without blocking; (fd, size) of a regular file, else refused.

    ``follow_symlinks`` is for the path a user named (a Hugging Face cache links its files);
    names found inside a source are never followed.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise ConversionError(f"{path}: no such file", hint="check the path") from exc
    except OSError as exc:
        if not follow_symlinks and os.path.islink(path):
            raise ConversionError(
                f"{path}: is a symbolic link, which import never follows",
                hint="copy the file itself into place",
            ) from exc
        raise ConversionError(
            f"{path}: cannot be opened ({exc.strerror})", hint="check the path and permissions"
        ) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ConversionError(
            f"{path}: is {_kind_of(info.st_mode)}, not a regular file",
            hint="import reads regular files only",
        )
    return fd, info.st_size


@contextmanager
def regular_file(path: Path, *, follow_symlinks: bool) -> Iterator[tuple[int, int]]:
    fd, size = _open_regular(path, follow_symlinks=follow_symlinks)
    try:
        yield fd, size
    finally:
        os.close(fd)


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (torch's run to paragraphs), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_range(fd: int, offset: int, length: int, where: str) -> bytes:
    buffer = bytearray(length)
    try:
        read_exact(fd, memoryview(buffer), offset)
    except (EOFError, OSError) as exc:  # the file shrank under us, or the disk failed
        raise ConversionError(f"{where}: cannot be read ({exc})", hint="check the file") from exc
    return bytes(buffer)


# -- torch.save files --------------------------------------------------------------------------


def _check_torch_archive(file: Any, size: int, where: str) -> None:
    """Refuse anything but torch.save's zip format with stored records inside the file.

    torch.load allocates what a record declares before reading it: a compressed record, or
    the legacy (pre-1.6) format, could declare far more than the file holds.
    """
    try:
        with zipfile.ZipFile(file) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ConversionError(
            f"{where}: is not a torch.save zip archive (the legacy format of torch < 1.6 "
            "and _use_new_zipfile_serialization=False is not read, nor are other files)",
            hint="re-save it with torch.save from a current torch, or pick the right --from",
        ) from exc
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.compress_size != record.file_size:
            raise ConversionError(
                f"{where}: record {record.filename!r} is compressed, which torch.save never does",
                hint=_RESAVE_HINT,
            )
        if record.header_offset + record.file_size > size:
            raise ConversionError(
                f"{where}: record {record.filename!r} declares {record.file_size} bytes "
                f"past the end of the data ({size} bytes)",
                hint="the file is truncated or forged; export it again",
            )
    file.seek(0)


# How torch's weights_only unpickler names what it refused (worded differently for classes
# and for blocked modules).
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


def refused_global(exc: BaseException) -> str | None:
    """The class or function that ``torch.load(weights_only=True)`` refused, if it says."""
    named = _UNSUPPORTED_GLOBAL.search(str(exc))
    return named.group(1) if named else None


def load_weights(file: Any, size: int, where: str) -> Any:
    """``torch.load(weights_only=True)`` of a checked archive; refusals as ConversionError."""
    _check_torch_archive(file, size, where)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = refused_global(exc)
        what = f"names {named}" if named else "holds objects beyond tensors"
        raise ConversionError(
            f"{where}: {what}, which is not a tensor or plain container, so it cannot be "
            "loaded safely",
            hint=_RESAVE_HINT,
        ) from exc
    except Exception as exc:  # a forged archive can fail torch's reader in many ways
        raise ConversionError(
            f"{where}: cannot be read as torch.save data: {first_line(exc)}",
            hint="check that torch.save wrote it, or pick the right --from",
        ) from exc


def read_torch(source: Path) -> Any:
    """The object in torch.save file ``source``, loaded without running code."""
    fd, size = _open_regular(source, follow_symlinks=True)
    with os.fdopen(fd, "rb") as file:
        return load_weights(file, size, str(source))


# -- safetensors -------------------------------------------------------------------------------

_SAFETENSORS_HINT = "install it: pip install 'aiockpt[export]' (or pip install safetensors)"


def read_safetensors(source: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ConversionError(
            "--from safetensors needs the safetensors package", hint=_SAFETENSORS_HINT
        ) from exc
    with regular_file(source, follow_symlinks=True) as (fd, _):
        # Read through the descriptor just checked, so the file cannot be swapped for a
        # FIFO between the check and the read.
        opened = Path(f"/proc/self/fd/{fd}")
        try:
            return load_file(str(opened if opened.exists() else source))
        except Exception as exc:  # SafetensorError derives from Exception only
            raise ConversionError(
                f"{source}: cannot be read as safetensors: {first_line(exc)}",
                hint="check that safetensors wrote it, or pick the right --from",
            ) from exc


# Names Hugging Face models give the input embedding that an output head may be tied to.
_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "word_embeddings.weight",
    "wte.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
)
_TIED_HEAD = "lm_head.weight"


def tied_keys_left_out(source: Path, names: Iterable[str]) -> dict[str, str]:
    """Tied weights that ``save_pretrained`` left out of ``source``: {missing: tied to}.

    save_pretrained stores a weight tied to the input embedding once, under the
    embedding's name, and the ``config.json`` next to the file says whether the head is
    tied (``tie_word_embeddings``, true unless set). The file itself carries no tie.
    """
    present = set(names)
    if _TIED_HEAD in present:
        return {}
    embedding = next((n for n in sorted(present) if n.endswith(_EMBEDDING_SUFFIXES)), None)
    config_path = source.parent / "config.json"
    if embedding is None or not config_path.exists():
        return {}
    try:
        with regular_file(config_path, follow_symlinks=True) as (fd, size):
            if size > _MAX_CONFIG_BYTES:
                return {}
            config = json.loads(read_range(fd, 0, size, str(config_path)))
    except (ConversionError, ValueError):
        return {}  # not a config we can read: nothing to say about ties
    if not isinstance(config, dict) or config.get("tie_word_embeddings", True) is not True:
        return {}
    return {_TIED_HEAD: embedding}
