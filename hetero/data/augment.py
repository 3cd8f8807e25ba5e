"""Training augmentation at real resolution: torchvision.transforms.v2's RandomResizedCrop, horizontal
flip and colour jitter, drawn per image from a seed, so a batch is the same whichever process decodes
it (the streaming ImageFolder loader runs it in its DataLoader workers, on the original file, before
any resize) and a resumed run sees the same pixels.

The 28-px models keep their own augmentation (a 2-px padded crop and a flip on the batch tensor,
:func:`hetero.data.loader._augment`): ``pad-crop``. ``imagenet`` is this module's.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from devices.images import as_array
from hetero.errors import HeteroError, require

PAD_CROP = "pad-crop"
IMAGENET = "imagenet"
POLICIES = (PAD_CROP, IMAGENET)
# RandomResizedCrop's area range: torchvision's (0.08, 1) is for 90-epoch ImageNet runs; a short
# fine-tune of a compatible edge keeps more of each image
SCALE = (0.25, 1.0)
JITTER = 0.3


def check_policy(augment: Any) -> str | None:
    """The augmentation ``augment`` names (False/None: none; True: ``auto``, chosen per preprocess by
    :func:`resolve`), or a one-line HeteroError."""
    if augment is None or augment is False:
        return None
    if augment is True or augment == "auto":
        return "auto"
    if augment not in POLICIES:
        raise HeteroError(f"--augment {augment!r} is not an augmentation; use {', '.join(POLICIES)} "
                          "(or --augment alone: imagenet for centre-cropped real-resolution inputs, else pad-crop)")
    return augment


def resolve(augment: Any, crop: float | None) -> str | None:
    """The policy a run uses: ``auto`` is ``imagenet`` where the preprocess centre-crops (real
    resolution, a ``tv:``/``timm:`` model), ``pad-crop`` for the squashed small images."""
    policy = check_policy(augment)
    if policy == "auto":
        return IMAGENET if crop is not None else PAD_CROP
    return policy


def image_seeds(batch_seed: int, n: int) -> list[int]:
    """One seed per image of a batch: a pure function of the batch's seed and the position."""
    return [int(s) for s in np.random.SeedSequence([int(batch_seed) & 0xFFFFFFFF]).generate_state(n)]


def _transform(size: int, channels: int) -> Any:
    require("torchvision", "byo")  # a one-line error naming the extra when torchvision is absent
    from torchvision.transforms import v2  # optional: torchvision (the byo extra), only for this augmentation
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER if channels == 3 else 0),
    ])


class ImagenetAugment:
    """PIL image -> augmented uint8 ``[size, size, C]``, one seed per image; small and picklable."""

    def __init__(self, size: int, channels: int):
        self.size, self.channels = int(size), int(channels)
        self._t: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"size": self.size, "channels": self.channels, "_t": None}

    def __call__(self, im: Any, seed: int) -> np.ndarray:
        if self._t is None:
            self._t = _transform(self.size, self.channels)
        with torch.random.fork_rng(devices=[]):  # the training process's own generator stays where it was
            torch.manual_seed(seed)
            out = self._t(im)
        return as_array(out)[0][..., :self.channels]


def augment_arrays(images: np.ndarray, batch_seed: int) -> np.ndarray:
    """``imagenet`` augmentation of in-memory uint8 ``[N, H, W, C]`` images (a set that is not an
    ImageFolder), at their own size."""
    n, h, _, c = images.shape
    aug = ImagenetAugment(h, c)
    out = np.empty_like(images)
    for i, s in enumerate(image_seeds(batch_seed, n)):
        img = images[i, :, :, 0] if c == 1 else images[i]
        out[i] = aug(Image.fromarray(img), s).reshape(h, h, c)
    return out
