"""A learnable synthetic image set, for unit tests only (never for reported numbers)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from hetero.data.imageset import ImageSet
from hetero.errors import HeteroError

_TEMPLATE_SALT = 0x5EED_7E3A  # templates depend on the class only, never on the sample seed
_GRID = 5                     # templates are upsampled from a GRID x GRID random field: smooth
_NOISE_STD = 24.0
_MAX_SHIFT = 2


def _template(c: int, size: int, channels: int) -> np.ndarray:
    """A fixed smooth float32 ``[size, size, channels]`` pattern in about [20, 235] for class ``c``."""

    rng = np.random.default_rng([_TEMPLATE_SALT, c, size, channels])
    grid = rng.uniform(-1.0, 1.0, size=(channels, _GRID, _GRID)).astype(np.float32)
    planes = [
        np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR), dtype=np.float32)
        for g in grid
    ]
    return 128.0 + 105.0 * np.stack(planes, axis=-1)


def synthetic_dataset(
    n: int, num_classes: int = 10, size: int = 28, channels: int = 1, seed: int = 0, name: str = "synthetic"
) -> ImageSet:
    """``n`` images: class template + Gaussian noise + a random shift of up to 2 px; balanced labels.

    Sets made with different ``seed`` share the class templates, so one can train on seed 0 and
    test on seed 1.
    """
    if n < 0 or num_classes < 1 or size < 1 or channels not in (1, 3):
        raise HeteroError(
            f"synthetic_dataset needs n >= 0, num_classes >= 1, size >= 1 and channels 1 or 3; "
            f"got n={n}, num_classes={num_classes}, size={size}, channels={channels}"
        )
    templates = np.stack([_template(c, size, channels) for c in range(num_classes)])
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % num_classes
    x = templates[labels] + rng.normal(0.0, _NOISE_STD, size=(n, size, size, channels)).astype(np.float32)
    shifts = rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, size=(n, 2))
    for dy in range(-_MAX_SHIFT, _MAX_SHIFT + 1):
        for dx in range(-_MAX_SHIFT, _MAX_SHIFT + 1):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if sel.any():
                x[sel] = np.roll(x[sel], (dy, dx), axis=(1, 2))
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    classes = tuple(f"class{c}" for c in range(num_classes))
    return ImageSet(images, labels, classes, name)
