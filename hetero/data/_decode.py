"""Decoding one image file the way every ImageFolder path does, a cheap header probe, and the one
way a file name is shown in a message: :mod:`devices.images` (the decoder the standalone runner
uses too, so a device preprocesses bit-equal), its errors raised as :class:`HeteroError`.

High bit depths are scaled, not clipped, and float images (mode "F") are refused with a one-line
fix; see :mod:`devices.images`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from devices import images
from devices.images import FLOAT_MODES, GREY_MODES, int_range, scale_to_8bit, shown
from hetero.errors import HeteroError

__all__ = ["FLOAT_MODES", "GREY_MODES", "int_range", "load_one", "probe_mode", "scale_to_8bit", "shown"]


def probe_mode(path: str | Path) -> str:
    """The image's mode from its header alone (no pixel data is decoded); a one-line HeteroError if
    the file is not an image Pillow can open, or is a float image."""
    try:
        return images.probe_mode(path)
    except images.ImageError as e:
        raise HeteroError(str(e)) from None


def load_one(path: str | Path, size: int, channels: int | None, crop: float | None = None) -> tuple[np.ndarray, bool]:
    """Image as uint8 ``[size, size, 3 or 1]`` plus whether it has colour (R, G, B not all equal);
    see :func:`devices.images.decode_image` (``crop``: shorter-side resize and centre crop)."""
    try:
        return images.decode_image(path, size, channels, crop)
    except images.ImageError as e:
        raise HeteroError(str(e)) from None
