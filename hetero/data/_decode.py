"""Decoding one image file the way every ImageFolder path does, and a cheap header probe."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hetero.errors import HeteroError

# modes whose pixels are grey once converted to RGB; anything else may hold colour
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def _unreadable(path: str | Path, e: BaseException) -> HeteroError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return HeteroError(f"{path}: cannot read image ({msg}); fix or remove the file")


def _errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


def probe_mode(path: str | Path) -> str:
    """The image's mode from its header alone (no pixel data is decoded); a one-line HeteroError if
    the file is not an image PIL can open."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode
    except _errors() as e:
        raise _unreadable(path, e) from None


def load_one(path: str | Path, size: int, channels: int | None) -> tuple[np.ndarray, bool]:
    """Image as uint8 ``[size, size, 3 or 1]`` plus whether it has colour (R, G, B not all equal).

    ``channels`` 1 converts to luma ("L"); 3 or None to RGB (palette images via RGBA)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
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
