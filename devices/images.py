"""The one image decoder: hetero's ImageFolder loader and the standalone runner both read image files
here, so an image embeds on a device exactly as it did in training. Standard library, numpy and
Pillow (imported only when an image is read); free of torch and hetero, like the rest of the core.

High bit depths are scaled, not clipped: an integer image (16-bit grey "I;16", 32-bit "I") maps its
stored type's range onto 0..255, ``round(v * 255 / 65535)`` for 16 bits, as an 8-bit image of the same
picture would hold it. Float images (mode "F") have no range to scale by (0..1? 0..255? metres?) and
are refused with a one-line fix.

Every failure is an :class:`ImageError` with one line that names the file (:func:`shown`); callers
re-raise it as their own error type with the same text.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
# modes whose pixels are grey once converted to RGB; anything else may hold colour
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# modes refused: no defined range to map onto 8 bits
FLOAT_MODES = frozenset({"F"})
PILLOW_MISSING = "reading images needs Pillow, which is not installed: pip install pillow"


class ImageError(Exception):
    """An image file that cannot be used (unreadable, a float image) or Pillow missing: one line."""


def shown(path: str | bytes | os.PathLike) -> str:
    """``path`` as one printable line: itself when it is, else with bytes that are not UTF-8 as
    ``\\xNN`` and control characters (a newline in a file name) as escapes. Never raises, whatever
    the locale, so a file name can always be named in an error, a report or a progress bar."""
    name = os.fspath(path)
    if isinstance(name, str):
        try:
            name = os.fsencode(name)
        except UnicodeEncodeError:  # a lone surrogate that surrogateescape did not make
            name = name.encode("utf-8", "surrogatepass")
    text = name.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a file with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by relative path, hidden ones skipped: the
    row order of hetero's ImageFolder classes and of the runner's embeddings alike."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*")
             if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def pil():
    """Pillow's ``Image`` module, or an :class:`ImageError` naming the pip command."""
    try:
        from PIL import Image  # optional: only reading image files needs it
    except ImportError:
        raise ImageError(PILLOW_MISSING) from None
    return Image


def _unreadable(path: str | os.PathLike, e: BaseException) -> ImageError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ImageError(f"{shown(path)}: cannot read image ({msg}); fix or remove the file")


def _float_image(path: str | os.PathLike) -> ImageError:
    return ImageError(
        f"{shown(path)}: a floating-point image (mode F) has no fixed range to map onto 8 bits; "
        "convert it to an 8- or 16-bit integer image (e.g. PNG) with the range you mean, or remove it"
    )


def _errors(Image) -> tuple[type[BaseException], ...]:
    return OSError, ValueError, SyntaxError, getattr(Image, "DecompressionBombError", OSError)


def probe_mode(path: str | Path) -> str:
    """The image's mode from its header alone (no pixel data is decoded); an :class:`ImageError` if
    the file is not an image Pillow can open, or is a float image."""
    Image = pil()
    try:
        with Image.open(path) as im:
            mode = im.mode
    except _errors(Image) as e:
        raise _unreadable(path, e) from None
    if mode in FLOAT_MODES:
        raise _float_image(path)
    return mode


def int_range(mode: str, rawmode: str | None) -> tuple[int, int] | None:
    """The (lowest, highest) value an integer image of ``mode`` can store, from its mode and the raw
    mode its file declares (Pillow < 10 opens a 16-bit PNG as "I" with raw mode "I;16B"); None for
    modes Pillow converts to 8 bits itself."""
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


def _as_8bit(im, path: str | os.PathLike):
    """``im`` in a mode Pillow converts without losing range: high-bit-depth integer grey scaled to
    "L"; an :class:`ImageError` for a float image."""
    if im.mode in FLOAT_MODES:
        raise _float_image(path)
    rng = int_range(im.mode, _rawmode(im))
    if rng is None:
        return im
    return pil().fromarray(scale_to_8bit(np.asarray(im), *rng), "L")


def resize_crop(im, size: int, crop: float | None):
    """A PIL image as ``size x size``: squashed (bilinear) when ``crop`` is None; else its shorter side
    resized to ``round(size / crop)`` (aspect kept, bilinear, antialiased when shrinking, as Pillow
    does) and the centre ``size x size`` cut out, as ImageNet evaluation does (``crop`` 0.875: 256 -> 224).
    An image smaller than the crop is resized up, never refused."""
    Image = pil()
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    if crop is None:
        return im.resize((size, size), bilinear) if im.size != (size, size) else im
    w, h = im.size
    short = max(size, int(round(size / crop)))
    nw, nh = (short, max(short, int(round(h * short / w)))) if w <= h else (max(short, int(round(w * short / h))), short)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), bilinear)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def check_crop(crop: object) -> str | None:
    """What is wrong with a centre-crop fraction, if anything: None or a number in (0, 1]."""
    if crop is None:
        return None
    if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
        return f"crop {crop!r} is not a fraction in (0, 1] (e.g. 0.875: resize to size/0.875, cut the centre)"
    return None


def open_image(path: str | Path, channels: int | None):
    """The image as a loaded PIL image at its own size: "L" for ``channels`` 1, else "RGB" (palette
    images via RGBA); 16- and 32-bit integer images scaled to 8 bits (see the module docstring)."""
    Image = pil()
    try:
        with Image.open(path) as im:
            im = _as_8bit(im, path)
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA")
            out = im.convert("L" if channels == 1 else "RGB")
            out.load()
            return out
    except ImageError:
        raise
    except _errors(Image) as e:
        raise _unreadable(path, e) from None


def as_array(im) -> tuple[np.ndarray, bool]:
    """A PIL "L" or "RGB" image as uint8 ``[H, W, 1 or 3]`` plus whether it has colour."""
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        return arr[..., None], False
    return arr, bool((arr[..., 0] != arr[..., 1]).any() or (arr[..., 1] != arr[..., 2]).any())


def decode_image(path: str | Path, size: int, channels: int | None,
                 crop: float | None = None) -> tuple[np.ndarray, bool]:
    """Image as uint8 ``[size, size, 3 or 1]`` plus whether it has colour (R, G, B not all equal).

    ``channels`` 1 converts to luma ("L"); 3 or None to RGB (:func:`open_image`), then
    :func:`resize_crop` (a squash resize, or with ``crop`` a shorter-side resize and a centre crop)."""
    im = open_image(path, channels)
    try:
        return as_array(resize_crop(im, size, crop))
    except _errors(pil()) as e:
        raise _unreadable(path, e) from None
