"""Single-file outputs: one durable atomic write, and which existing files are hetero's to replace.

Standard library and numpy only (the standalone runner packs it); hetero's own writes go through it
too (:mod:`hetero._atomic`).

A command writes a file only to a new path or, with ``--overwrite``, over an earlier hetero output of
the same kind. A single file has no marker beside it, so it is recognised by its content:

- latency JSON: a JSON object whose ``schema`` is ``hetero-latency/1`` (``bench --json``), or
  ``hetero-latency-compare/1`` (a latency comparison: ``hetero bench --compare --json``);
- runner zip: a zip whose comment is ``hetero-runner/1`` (``hetero pack-runner``; one packed before
  the comment existed: its ``__main__.py`` starts as the packed runner's does);
- runner embeddings: the ``--out`` of ``python -m devices run``, a complete .npy of float32
  ``[N, dim]`` whose rows have unit length, as every exported embedding model gives them;
- runner image list: the ``.txt`` beside runner embeddings, one line per row (:func:`run_refusal`).

Anything else (a user's file, a preprocessed input batch, a directory, a link, a fifo, another kind)
is refused, even with ``--overwrite``, in one line naming the path and what it holds.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

import numpy as np

from devices.bench import SCHEMA as LATENCY_SCHEMA
from devices.schema import LATENCY_COMPARE_SCHEMA, RUNNER_ZIP_COMMENT

COMPARE_SCHEMA = LATENCY_COMPARE_SCHEMA
_RUNNER_MAIN_START = b'"""hetero\'s standalone runner'  # the packed __main__.py (standalone.PACKED_MAIN)
_MAX_JSON_BYTES = 64 << 20  # a latency JSON is kilobytes: a larger file is not read to find out
_UNIT_TOLERANCE = 0.02  # |norm - 1| of an embedding row from any precision (fp16, int8 dynamic)

Data = Union[bytes, Callable[[BinaryIO], None]]


# ----------------------------------------------------------------------------------------- writing

def write_atomic(path: str | os.PathLike, data: Data, durable: bool = True) -> None:
    """Write ``data`` (bytes, or a callback that writes to the open binary file: ``np.save``, a zip,
    ...) to ``path`` through a unique temp file beside it, created exclusively (``mkstemp``: never a
    planted file or link), then renamed into place. ``durable``: the file is fsynced before the rename
    and the directory after it, so a power cut leaves the old file or the new one, never a short one.
    On any error (a full disk included) the temp file is removed and ``path`` is as it was."""
    write_all({Path(path): data}, durable=durable)


def write_all(files: dict[Path, Data], durable: bool = True) -> None:
    """:func:`write_atomic` for several files that belong together: every temp file is written (and
    fsynced) first, then all are renamed, so a failure before the renames leaves none of them."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            temps.append((_temp_written(Path(path), data, durable), Path(path)))
        for tmp, path in temps:
            os.replace(tmp, path)
        if durable:
            for d in {path.parent for _, path in temps}:
                fsync_dir(d)
    finally:
        for tmp, _ in temps:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _temp_written(path: Path, data: Data, durable: bool) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would make the file private to its writer
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def fsync_dir(d: str | os.PathLike) -> None:
    """fsync a directory, so that a rename in it survives a power cut (a no-op where directories
    cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (read without changing it for longer than a call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------- recognising

def _json_schema(path: Path) -> str | None:
    if path.stat().st_size > _MAX_JSON_BYTES:
        return None
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return doc.get("schema") if isinstance(doc, dict) and isinstance(doc.get("schema"), str) else None


def _is_runner_zip(path: Path) -> bool:
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            if z.comment == RUNNER_ZIP_COMMENT:
                return True
            with z.open("__main__.py") as f:
                return f.read(len(_RUNNER_MAIN_START)) == _RUNNER_MAIN_START
    except (KeyError, zipfile.BadZipFile, ValueError, RuntimeError, EOFError):
        return False


def embedding_rows(path: Path) -> int | None:
    """The number of rows if ``path`` is runner embeddings (see the module's docstring), else None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                return None
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, EOFError, SyntaxError, TypeError):  # numpy's words for a file that is no .npy
        return None
    if dtype != np.dtype("<f4") or fortran or len(shape) != 2 or \
            path.stat().st_size != offset + 4 * int(np.prod(shape)):
        return None
    emb = np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=tuple(shape)) if shape[0] * shape[1] else \
        np.zeros(shape, np.float32)
    for i in range(0, shape[0], 1 << 16):  # a chunk at a time: the file may be larger than memory
        rows = np.asarray(emb[i:i + (1 << 16)], dtype=np.float64)
        norms = np.sqrt((rows * rows).sum(axis=1))
        if not (np.abs(norms - 1.0) <= _UNIT_TOLERANCE).all():
            return None
    return int(shape[0])


# kind -> detector: is the existing regular file at this path an output of that kind?
DETECTORS: dict[str, Callable[[Path], bool]] = {
    "latency JSON": lambda p: _json_schema(p) == LATENCY_SCHEMA,
    "latency comparison": lambda p: _json_schema(p) == COMPARE_SCHEMA,
    "runner zip": _is_runner_zip,
    "runner embeddings": lambda p: embedding_rows(p) is not None,
}


def file_kind(path: str | os.PathLike) -> str | None:
    """The kind of hetero single-file output at ``path`` (a regular file), or None."""
    path = Path(path)
    for kind, detect in DETECTORS.items():
        try:
            if detect(path):
                return kind
        except OSError:
            return None
    return None


def refusal(path: str | os.PathLike, kind: str, overwrite: bool) -> str | None:
    """Why writing a ``kind`` output to ``path`` is refused (one line naming the path and what it
    holds), or None if the path is new, or an earlier output of that kind and ``overwrite`` is set."""
    if kind not in DETECTORS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(path)
    held = holds(path)
    if held is None:
        return None
    if held == f"holds a hetero {kind}":
        if overwrite:
            return None
        return f"{path} already {held}; pass --overwrite to replace it, or choose another output path"
    return (f"{path} {held}; nothing was touched: choose another output path (--overwrite replaces only an "
            f"earlier hetero {kind})")


def holds(path: Path) -> str | None:
    """What is at ``path``, as the words that follow it in a message; None for nothing."""
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        return "is a link"
    if path.is_dir():
        return "is a directory"
    if not path.is_file():
        return "is not a regular file"
    held = file_kind(path)
    if held is not None:
        return f"holds a hetero {held}"
    try:
        return f"holds a file hetero did not write ({path.stat().st_size:,} bytes)"
    except OSError:
        return "holds a file hetero did not write"


def run_refusal(out: Path, listing: Path | None, overwrite: bool) -> str | None:
    """:func:`refusal` for ``python -m devices run``: the embeddings at ``out`` and, when images are
    embedded, their list at ``listing``. The list is the runner's only beside runner embeddings with
    exactly one line per row (an earlier run's pair); another ``.txt`` there is refused, even when
    ``out`` is new."""
    why = refusal(out, "runner embeddings", overwrite)
    if why is not None or listing is None or not os.path.lexists(listing) or listing_is_ours(listing, out):
        return why
    return (f"{listing} {holds(listing)}, not the image list of an earlier run's {out.name}; nothing was touched: "
            "choose another --out (the image list is written beside it as .txt)")


def listing_is_ours(listing: Path, out: Path) -> bool:
    """Whether ``listing`` is the image list of the runner embeddings at ``out``: a regular UTF-8 text
    file with one non-empty line per embedding row."""
    if listing.is_symlink() or not listing.is_file() or out.is_symlink() or not out.is_file():
        return False
    try:
        rows = embedding_rows(out)
        if rows is None:
            return False
        lines = 0
        with open(listing, "rb") as f:
            for line in f:
                if not line.endswith(b"\n") or not line.strip():
                    return False
                line.decode("utf-8")
                lines += 1
                if lines > rows:
                    return False
        return lines == rows
    except (OSError, UnicodeDecodeError):
        return False
