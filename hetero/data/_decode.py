"""Decoding one image file the way every ImageFolder path does, a cheap header probe, and the one
way a file name is shown in a message.

High bit depths are scaled, not clipped: an integer image (16-bit grey "I;16", 32-bit "I") maps its
stored type's range onto 0..255, ``round(v * 255 / 65535)`` for 16 bits, as an 8-bit image of the same
picture would hold it. Float images (mode "F") have no range to scale by (0..1? 0..255? metres?) and
are refused when the folder is indexed, with a one-line fix.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hetero.errors import HeteroError

# modes whose pixels are grey once converted to RGB; anything else may hold colour
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# modes refused: no defined range to map onto 8 bits
FLOAT_MODES = frozenset({"F"})


def shown(path: str | bytes | os.PathLike) -> str:
    """``path`` as one printable line: itself when it is, else with bytes that are not UTF-8 as
    ``\\xNN`` and control characters (a newline in a file name) as escapes. Never raises, whatever
    the locale, so a file name can always be named in an error, a report or a progress bar."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _unreadable(path: str | Path, e: BaseException) -> HeteroError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return HeteroError(f"{shown(path)}: cannot read image ({msg}); fix or remove the file")


def _float_image(path: str | Path) -> HeteroError:
    return HeteroError(
        f"{shown(path)}: a floating-point image (mode F) has no fixed range to map onto 8 bits; "
        "convert it to an 8- or 16-bit integer image (e.g. PNG) with the range you mean, or remove it"
    )


def _errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


def probe_mode(path: str | Path) -> str:
    """The image's mode from its header alone (no pixel data is decoded); a one-line HeteroError if
    the file is not an image PIL can open, or is a float image (see the module docstring)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
    except _errors() as e:
        raise _unreadable(path, e) from None
    if mode in FLOAT_MODES:
        raise _float_image(path)
    return mode


def int_range(mode: str, rawmode: str | None) -> tuple[int, int] | None:
    """The (lowest, highest) value an integer image of ``mode`` can store, from its mode and the raw
    mode its file declares (Pillow < 10 opens a 16-bit PNG as "I" with raw mode "I;16B"); None for
    modes PIL converts to 8 bits itself."""
    if mode.startswith("I;16"):
        bits, signed = 16, mode.endswith("S")
    elif mode == "I":
        raw = rawmode or "I;32S"
        bits = 16 if raw.startswith("I;16") else 8 if raw.startswith("I;8") else 32
        signed = raw.endswith("S") or bits == 32 and raw in ("I", "I;32N")
    else:
        return None
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def scale_to_8bit(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Integer pixels in ``lo..hi`` -> uint8, ``round((v - lo) * 255 / (hi - lo))`` exactly (integer
    arithmetic, halves up)."""
    span = hi - lo
    v = np.clip(values.astype(np.int64), lo, hi) - lo
    return ((v * 510 + span) // (2 * span)).astype(np.uint8)


def _rawmode(im) -> str | None:
    """The raw mode of the file's first tile (read before the pixels are loaded), if it says one."""
    tile = getattr(im, "tile", None) or []
    if not tile:
        return None
    args = tile[0][3] if len(tile[0]) > 3 else None
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else None


def _as_8bit(im, path: str | Path):
    """``im`` in a mode PIL converts without losing range: high-bit-depth integer grey scaled to "L"."""
    from PIL import Image

    if im.mode in FLOAT_MODES:
        raise _float_image(path)
    rng = int_range(im.mode, _rawmode(im))
    if rng is None:
        return im
    return Image.fromarray(scale_to_8bit(np.asarray(im), *rng), "L")


def load_one(path: str | Path, size: int, channels: int | None) -> tuple[np.ndarray, bool]:
    """Image as uint8 ``[size, size, 3 or 1]`` plus whether it has colour (R, G, B not all equal).

    ``channels`` 1 converts to luma ("L"); 3 or None to RGB (palette images via RGBA). 16- and 32-bit
    integer images are scaled to 8 bits first (see the module docstring)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = _as_8bit(im, path)
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA")
            im = im.convert("L" if channels == 1 else "RGB")
            im = im.resize((size, size), Image.BILINEAR) if im.size != (size, size) else im
            arr = np.asarray(im, dtype=np.uint8)
    except _errors() as e:
        raise _unreadable(path, e) from None
    if arr.ndim == 2:
        return arr[..., None], False
    return arr, bool((arr[..., 0] != arr[..., 1]).any() or (arr[..., 1] != arr[..., 2]).any())
