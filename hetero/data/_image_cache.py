"""On-disk caches of an ImageFolder split: decoded images (one uint8 ``.npy``) and per-file sha256s.

Both are keyed by a digest of the file list (absolute paths, byte sizes, mtimes in ns), so any added,
removed, replaced or touched file gives a new key. Both are written through a unique temp file beside
them (:func:`hetero._atomic.write_atomic`), fsynced and renamed into place only when complete, so a
killed run never leaves a file under a trusted name. Each is checked against its expected size before
it is used; a damaged one (zero bytes, cut short) is deleted with a one-line warning and rebuilt.

The directory may be shared by several hosts: a temp file is deleted only once it is an hour old
(:func:`hetero._atomic.stale_temps`), and only files named as :func:`image_cache_path` and
:func:`file_hashes` name them are hetero's (:func:`cache_files`).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hetero._atomic import discard_damaged, remove_stale_temps, stale_temps, write_atomic
from hetero._progress import progress_bar
from hetero.errors import HeteroError
from hetero.locations import cache_dir

_FORMAT = b"hetero-image-cache-v1"
# the names this module gives: decoded pixels and per-file sha256s (anything else there is not hetero's)
_NAMES = re.compile(r"^[0-9a-f]{24}(-\d+x\d+x\d+x\d+-(auto|L|RGB)(-c\d+)?\.npy|\.sha256)$")


def images_dir() -> Path:
    return cache_dir() / "images"


def files_key(paths: np.ndarray, stats: np.ndarray) -> str:
    """sha256 over the paths (bytes) and their [size, mtime_ns] rows."""
    h = hashlib.sha256(_FORMAT)
    h.update(np.asarray(len(paths), dtype="<i8").tobytes())
    h.update(b"\0".join(paths.tolist()))
    h.update(np.ascontiguousarray(stats, dtype="<i8").tobytes())
    return h.hexdigest()


def image_cache_path(key: str, shape: tuple[int, ...], convert: int | None, crop: float | None = None) -> Path:
    n, h, w, c = shape
    mode = {None: "auto", 1: "L", 3: "RGB"}[convert]
    cut = "" if crop is None else f"-c{round(crop * 10000):d}"  # a centre-cropped decode is another file
    return images_dir() / f"{key[:24]}-{n}x{h}x{w}x{c}-{mode}{cut}.npy"


def is_cache_name(name: str) -> bool:
    """Whether ``name`` is one this module gives its files."""
    return _NAMES.match(name) is not None


def cache_files(directory: Path | None = None) -> list[Path]:
    """hetero's files in the image cache: entries named as this module names them, and temp files of
    killed writers once an hour old; never a user's file, nor a temp file another run may still write."""
    directory = Path(directory) if directory else images_dir()
    try:
        names = sorted(e.name for e in os.scandir(directory) if e.is_file(follow_symlinks=False))
    except OSError:
        return []
    return [directory / n for n in names if is_cache_name(n)] + sorted(stale_temps(directory, is_cache_name))


def clear_image_cache(directory: Path | None = None) -> dict[Path, int]:
    """Delete :func:`cache_files` (hetero's files only); returns each one's size in bytes."""
    gone = {}
    for f in cache_files(directory):
        try:
            size = f.stat().st_size
            f.unlink()
        except FileNotFoundError:  # another run's clear got there first
            continue
        gone[f] = size
    return gone


def open_image_cache(path: Path, shape: tuple[int, ...]) -> int | None:
    """Byte offset of the pixel data if ``path`` is a complete cache of ``shape``, else None; a damaged
    one is deleted with a one-line warning (the caller builds it again)."""
    try:
        seen = os.lstat(path)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            got, fortran, dtype = np.lib.format.read_array_header_1_0(f) if version == (1, 0) else (None, None, None)
            offset = f.tell()
    except OSError:  # absent, or not ours to read: built again
        return None
    except (ValueError, EOFError, SyntaxError):  # numpy's words for a file that is no .npy
        got = None
    want = offset + int(np.prod(shape)) if got is not None else -1
    if got is not None and tuple(got) == tuple(shape) and not fortran and dtype == np.uint8 and seen.st_size == want:
        return offset
    why = ("zero bytes" if seen.st_size == 0 else f"{seen.st_size:,} bytes, not a complete uint8 {list(shape)} .npy"
           + (f" of {want:,} bytes" if want > 0 else ""))
    discard_damaged(path, seen, "image cache", why)
    return None


def write_image_cache(path: Path, shape: tuple[int, ...], batches: Iterable[np.ndarray]) -> int:
    """Stream ``batches`` (in row order) into ``path`` atomically; returns the data offset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, is_cache_name)

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
        written = 0
        for b in batches:
            f.write(np.ascontiguousarray(b, dtype=np.uint8).data)
            written += len(b)
        if written != shape[0]:
            raise HeteroError(f"image cache {path}: wrote {written} of {shape[0]} images; delete it and retry")

    write_atomic(path, write)
    offset = open_image_cache(path, shape)
    if offset is None:
        raise HeteroError(f"image cache {path} is unreadable right after writing it; check the disk (df -h {path.parent})")
    return offset


def read_rows(path: Path, offset: int, shape: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """The images at ``rows`` of a cache file, read with ``preadv`` into one fresh array.

    No memory map: pages of a mapped file count in the process's RSS once touched, so reading a
    whole gallery through a map would show (and pin, under pressure) its full size."""
    _, h, w, c = shape
    item = h * w * c
    out = np.empty((len(rows), h, w, c), dtype=np.uint8)
    flat = out.reshape(-1)
    fd = os.open(path, os.O_RDONLY)
    try:
        i = 0
        while i < len(rows):
            j = i + 1  # one read per run of consecutive rows
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            buf, pos = memoryview(flat[i * item:j * item]), offset + int(rows[i]) * item
            while len(buf):
                got = os.preadv(fd, [buf], pos)
                if got <= 0:
                    raise HeteroError(f"image cache {path} is shorter than expected; delete it and retry")
                buf, pos = buf[got:], pos + got
            i = j
    finally:
        os.close(fd)
    return out


def _sha256_file(path: bytes) -> bytes:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise HeteroError(f"{os.fsdecode(path)}: cannot read ({e.strerror or e}); the folder changed since it "
                          "was loaded, load it again") from None
    return h.digest()


def file_hashes(paths: np.ndarray, key: str, *, progress: bool = False) -> np.ndarray:
    """sha256 of every file's bytes, uint8 ``[N, 32]``; memoised on disk under the file-list ``key``
    so a later run costs one ``stat`` per file (done when the folder is indexed) instead of a read."""

    memo = images_dir() / f"{key[:24]}.sha256"
    n = len(paths)
    try:
        seen = os.lstat(memo)
        raw = memo.read_bytes()
    except OSError:
        pass
    else:
        if len(raw) == 32 * n:
            return np.frombuffer(raw, dtype=np.uint8).reshape(n, 32)
        discard_damaged(memo, seen, "file-hash cache", f"{len(raw):,} bytes, not {32 * n:,}")
    # hashlib and file reads release the GIL: threads overlap I/O and hashing on every core
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        it = pool.map(_sha256_file, paths.tolist(), chunksize=64)
        digests = list(progress_bar(it, total=n, desc="hashing images", unit="img", disable=not progress, leave=False))
    out = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(n, 32)
    try:
        write_atomic(memo, out.tobytes())
    except OSError:
        pass  # a read-only or full cache dir only costs the re-hash next time
    return out
