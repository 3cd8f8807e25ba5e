"""Reader for the IDX format used by (Fashion-)MNIST, raw or gzipped."""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

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


def _read_bytes(path: Path) -> bytes:
    """Whole file content, gunzipped if it is gzip (by magic bytes, not by name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise HeteroError(f"{path}: no such IDX file; check the data folder path") from None
    except OSError as e:
        raise HeteroError(f"{path}: cannot read IDX file ({e.strerror}); check its permissions") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HeteroError(
            f"{path}: corrupt or truncated gzip ({msg}); delete it and download it again"
        ) from None


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file: magic ``00 00 <dtype> <ndim>``, big-endian int32 dims, then the data.

    Returns an array in native byte order with the file's shape.
    """
    path = Path(path)
    buf = _read_bytes(path)
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
    if len(buf) < header:
        raise HeteroError(f"{path}: truncated IDX header ({len(buf)} bytes, need {header}); the file is corrupt")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise HeteroError(f"{path}: negative IDX dimension in {dims}; the file is corrupt")
    dtype = np.dtype(_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    got = len(buf) - header
    if got != expected:
        raise HeteroError(
            f"{path}: IDX data is {got} bytes but dims {dims} need {expected}; "
            "the file is truncated or corrupt, get it again"
        )
    data = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)
