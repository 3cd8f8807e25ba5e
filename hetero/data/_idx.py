"""Reader for the IDX format used by (Fashion-)MNIST, raw or gzipped."""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hetero.errors import HeteroError

# IDX type code -> big-endian numpy dtype.
_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


# an IDX file larger than this once decompressed is refused (the largest MNIST-family file, EMNIST's
# byclass training images, is 550 MB); a caller that knows the exact size passes it instead
MAX_IDX_BYTES = 2 << 30
_CHUNK = 1 << 20


def _open(path: Path) -> BinaryIO:
    """The file's content as a stream, gunzipped if it is gzip (by magic bytes, not by name)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise HeteroError(f"{path}: no such IDX file; check the data folder path") from None
    except OSError as e:
        raise HeteroError(f"{path}: cannot read IDX file ({e.strerror}); check its permissions") from None
    if f.read(2) != b"\x1f\x8b":
        f.seek(0)
        return f
    f.seek(0)
    return _Gunzip(f)


class _Gunzip(gzip.GzipFile):
    """A GzipFile that closes the file it reads when closed (gzip.GzipFile(fileobj=) does not)."""

    def __init__(self, f: BinaryIO):
        super().__init__(fileobj=f, mode="rb")
        self._raw = f

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def _read(stream: BinaryIO, n: int, path: Path) -> bytes:
    """Up to ``n`` bytes: no more is ever decompressed, whatever the gzip stream would expand to."""
    try:
        out = bytearray()
        while len(out) < n:
            chunk = stream.read(min(_CHUNK, n - len(out)))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    except (EOFError, OSError, zlib.error) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HeteroError(f"{path}: corrupt or truncated gzip ({msg}); delete it and download it again") from None


def read_idx(path: str | Path, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Parse an IDX file: magic ``00 00 <dtype> <ndim>``, big-endian int32 dims, then the data.

    Returns an array in native byte order with the file's shape. At most ``max_bytes`` (header
    included) are read or decompressed: a file whose header claims more, or whose data runs on past
    what its header says (a gzip bomb), is refused without reading the rest.
    """
    path = Path(path)
    with _open(path) as stream:
        buf = _read(stream, 4, path)
        if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
            raise HeteroError(
                f"{path}: not an IDX file (bad magic {buf[:4].hex() or 'empty'}, expected 0000<type><ndim>); "
                "pass the original Fashion-MNIST files"
            )
        code, ndim = buf[2], buf[3]
        if code not in _DTYPES:
            raise HeteroError(
                f"{path}: unknown IDX data type code 0x{code:02X} "
                f"(expected one of {', '.join(f'0x{c:02X}' for c in _DTYPES)}); the file is corrupt"
            )
        header = 4 + 4 * ndim
        buf += _read(stream, header - 4, path)
        if len(buf) < header:
            raise HeteroError(f"{path}: truncated IDX header ({len(buf)} bytes, need {header}); the file is corrupt")
        dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">i4", count=ndim, offset=4))
        if any(d < 0 for d in dims):
            raise HeteroError(f"{path}: negative IDX dimension in {dims}; the file is corrupt")
        dtype = np.dtype(_DTYPES[code])
        expected = math.prod(dims) * dtype.itemsize
        if header + expected > max_bytes:
            raise HeteroError(f"{path}: IDX dims {dims} claim {header + expected:,} bytes, more than the "
                              f"{max_bytes:,} expected of this file; the file is corrupt or not the one wanted")
        data = _read(stream, expected, path)
        extra = _read(stream, _CHUNK, path) if len(data) == expected else b""  # bounded: one chunk past the end
    if len(data) != expected or extra:
        got = f"{len(data)}" if not extra else f"{expected + len(extra)}{'+' if len(extra) == _CHUNK else ''}"
        raise HeteroError(
            f"{path}: IDX data is {got} bytes but dims {dims} need {expected}; "
            "the file is truncated or corrupt, get it again"
        )
    arr = np.frombuffer(data, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)
