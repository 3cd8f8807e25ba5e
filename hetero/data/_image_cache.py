"""On-disk caches of an ImageFolder split: decoded images (one uint8 ``.npy``) and per-file sha256s.

Both are keyed by a digest of the file list (absolute paths, byte sizes, mtimes in ns), so any added,
removed, replaced or touched file gives a new key. Both are written to a temporary sibling and renamed
into place only when complete, so a killed run never leaves a file under a trusted name; the image
cache is also checked against its expected shape and byte length before it is used.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hetero.errors import HeteroError

_FORMAT = b"hetero-image-cache-v1"


def images_dir() -> Path:
    from hetero.embed import cache_dir

    return cache_dir() / "images"


def files_key(paths: np.ndarray, stats: np.ndarray) -> str:
    """sha256 over the paths (bytes) and their [size, mtime_ns] rows."""
    h = hashlib.sha256(_FORMAT)
    h.update(np.asarray(len(paths), dtype="<i8").tobytes())
    h.update(b"\0".join(paths.tolist()))
    h.update(np.ascontiguousarray(stats, dtype="<i8").tobytes())
    return h.hexdigest()


def image_cache_path(key: str, shape: tuple[int, ...], convert: int | None) -> Path:
    n, h, w, c = shape
    mode = {None: "auto", 1: "L", 3: "RGB"}[convert]
    return images_dir() / f"{key[:24]}-{n}x{h}x{w}x{c}-{mode}.npy"


def open_image_cache(path: Path, shape: tuple[int, ...]) -> int | None:
    """Byte offset of the pixel data if ``path`` is a complete cache of ``shape``, else None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                return None
            got, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return None
    if tuple(got) != tuple(shape) or fortran or dtype != np.uint8 or size != offset + int(np.prod(shape)):
        return None
    return offset


def write_image_cache(path: Path, shape: tuple[int, ...], batches: Iterable[np.ndarray]) -> int:
    """Stream ``batches`` (in row order) into ``path`` atomically; returns the data offset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
            for b in batches:
                f.write(np.ascontiguousarray(b, dtype=np.uint8).data)
                written += len(b)
            f.flush()
            os.fsync(f.fileno())
        if written != shape[0]:
            raise HeteroError(f"image cache {path}: wrote {written} of {shape[0]} images; delete it and retry")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    offset = open_image_cache(path, shape)
    if offset is None:
        raise HeteroError(f"image cache {path} is unreadable right after writing it; check the disk (df -h {path.parent})")
    return offset


def _remove_dead_temps(path: Path) -> None:
    """Delete temp files of ``path`` left by writers that were killed (their pid is gone)."""
    for t in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            os.kill(int(t.name[len(path.name) + 2:-4]), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            t.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


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
    from hetero._progress import progress_bar

    memo = images_dir() / f"{key[:24]}.sha256"
    n = len(paths)
    try:
        raw = memo.read_bytes()
        if len(raw) == 32 * n:
            return np.frombuffer(raw, dtype=np.uint8).reshape(n, 32)
    except OSError:
        pass
    # hashlib and file reads release the GIL: threads overlap I/O and hashing on every core
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        it = pool.map(_sha256_file, paths.tolist(), chunksize=64)
        digests = list(progress_bar(it, total=n, desc="hashing images", unit="img", disable=not progress, leave=False))
    out = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(n, 32)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_bytes(out.tobytes())
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache dir only costs the re-hash next time
    return out
