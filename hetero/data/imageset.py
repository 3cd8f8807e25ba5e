"""In-memory labelled image sets and the preprocessing that turns them into model inputs."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from devices.artifact import MAX_IMAGE_SIZE
from devices.images import check_crop, resize_crop
from hetero.data.folder_images import FolderImages
from hetero.errors import HeteroError

# ITU-R BT.601 luma weights, the same PIL uses for RGB -> L.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Preprocess:
    """How uint8 images become model inputs: square size, channel count, per-channel mean/std, and how
    an image is brought to the square: squashed (``crop`` None, hetero's 28-px models) or, with a
    ``crop`` fraction, its shorter side resized to ``size / crop`` and the centre cut out (ImageNet
    evaluation: 0.875, 256 -> 224)."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 1 <= self.size <= MAX_IMAGE_SIZE:
            raise HeteroError(f"preprocess size must be a positive integer up to {MAX_IMAGE_SIZE} px (what the device "
                              f"runners accept), got {self.size!r}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise HeteroError(f"preprocess channels must be 1 or 3, got {self.channels!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise HeteroError(
                f"preprocess mean/std need {self.channels} value(s) each (one per channel), "
                f"got mean={self.mean} std={self.std}"
            )
        if not all(math.isfinite(m) for m in self.mean):
            raise HeteroError(f"preprocess mean must be finite numbers, got {self.mean}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise HeteroError(f"preprocess std must be positive finite numbers, got {self.std}")
        problem = check_crop(self.crop)
        if problem:
            raise HeteroError(f"preprocess {problem}")
        if self.crop is not None:
            object.__setattr__(self, "crop", float(self.crop))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in checkpoints and manifests); ``crop`` only when set, so a
        squashing preprocess reads as it always has."""
        d: dict[str, Any] = {"size": self.size, "channels": self.channels, "mean": list(self.mean), "std": list(self.std)}
        if self.crop is not None:
            d["crop"] = self.crop
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict`; validates keys and values."""
        if not isinstance(d, dict):
            raise HeteroError(f"preprocess must be a mapping with size/channels/mean/std, got {type(d).__name__}")
        keys = {"size", "channels", "mean", "std"}
        if not keys <= set(d) <= keys | {"crop"}:
            raise HeteroError(
                f"preprocess needs exactly the keys {sorted(keys)} (and an optional crop), got {sorted(d)}; "
                "fix the config or manifest"
            )
        try:
            mean = tuple(float(m) for m in d["mean"])
            std = tuple(float(s) for s in d["std"])
        except (TypeError, ValueError):
            raise HeteroError(
                f"preprocess mean/std must be lists of numbers, got {d['mean']!r} / {d['std']!r}"
            ) from None
        size, channels = d["size"], d["channels"]
        if isinstance(size, float) and size.is_integer():
            size = int(size)
        if isinstance(channels, float) and channels.is_integer():
            channels = int(channels)
        return cls(size=size, channels=channels, mean=mean, std=std, crop=d.get("crop"))

    def apply(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, size, size, channels]`` -> float32 ``[N, channels, size, size]``, normalised."""
        if isinstance(images, FolderImages):
            images = np.asarray(images)
        want = (self.size, self.size, self.channels)
        ok = isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
        if not ok or images.shape[1:] != want:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
            raise HeteroError(
                f"preprocess expects uint8 images of shape [N, {self.size}, {self.size}, {self.channels}], "
                f"got {got}; call ImageSet.conform(prep) first"
            )
        # the arithmetic runs in place on the contiguous NHWC copy and only the result is transposed:
        # the same float32 operations per element as on an NCHW view, without strided passes
        x = images.astype(np.float32)
        x /= np.float32(255.0)
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


FASHION_MNIST_PREPROCESS = Preprocess(28, 1, (0.2860,), (0.3530,))


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Labelled images: uint8 ``[N, H, W, C]`` and int64 labels ``[N]``.

    ``images`` is an array in memory, or (an ImageFolder) a :class:`~hetero.data.folder_images.FolderImages`
    that decodes the rows it is indexed with; ``len``, ``subset``, ``conform``, ``digest`` and
    :func:`~hetero.data.iterate_batches` stream it, ``np.asarray(images)`` loads it all (up to a limit).
    """

    images: np.ndarray | FolderImages
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str
    _digest: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        imgs, labels = self.images, self.labels
        if isinstance(imgs, FolderImages):
            pass  # built valid: uint8 [N, size, size, 1 or 3]
        elif not isinstance(imgs, np.ndarray) or imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[3] not in (1, 3):
            got = f"{imgs.dtype} {tuple(imgs.shape)}" if isinstance(imgs, np.ndarray) else type(imgs).__name__
            raise HeteroError(f"{self.name}: images must be uint8 [N, H, W, 1 or 3], got {got}")
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != imgs.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise HeteroError(
                f"{self.name}: labels must be integers of shape [{imgs.shape[0]}], got {labels.dtype} {labels.shape}"
            )
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise HeteroError(
                f"{self.name}: labels span {int(labels.min())}..{int(labels.max())} "
                f"but there are {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def lazy(self) -> bool:
        """True if the images are decoded on demand (an ImageFolder), not held in memory."""
        return isinstance(self.images, FolderImages)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the stored images."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def subset(self, n_or_indices: int | Sequence[int] | np.ndarray) -> ImageSet:
        """The first ``n`` items (int), or the items at the given indices."""
        if isinstance(n_or_indices, (int, np.integer)) and not isinstance(n_or_indices, bool):
            n = int(n_or_indices)
            if n < 0:
                raise HeteroError(f"{self.name}: subset size must be >= 0, got {n}")
            n = min(n, len(self))
            if self.lazy:
                return ImageSet(self.images.take(np.arange(n)), self.labels[:n], self.classes, f"{self.name}[:{n}]")
            return ImageSet(self.images[:n], self.labels[:n], self.classes, f"{self.name}[:{n}]")
        idx = np.asarray(n_or_indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise HeteroError(f"{self.name}: subset takes an int or a 1-D list of indices, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise HeteroError(f"{self.name}: subset index out of range for {len(self)} items")
        tag = hashlib.sha256(idx.tobytes()).hexdigest()[:8]
        images = self.images.take(idx) if self.lazy else self.images[idx]
        return ImageSet(images, self.labels[idx], self.classes, f"{self.name}[{len(idx)}@{tag}]")

    def digest(self) -> str:
        """A cache key for derived data (memoised): sha256 over shape, image bytes and label bytes.

        A lazy set hashes what determines its pixels instead of decoding them: the decode size and
        channels, each file's content sha256 (memoised on disk per file list, see ``_image_cache``) and
        the labels; so it stays the same when the folder is copied, moved or touched."""
        if not self._digest and self.lazy:
            self._digest.append(self.images.digest(self.labels))
        if not self._digest:
            h = hashlib.sha256()
            h.update(repr(tuple(int(s) for s in self.images.shape)).encode())
            h.update(np.ascontiguousarray(self.images).tobytes())
            h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
            self._digest.append(h.hexdigest())
        return self._digest[0]

    def conform(self, prep: Preprocess) -> ImageSet:
        """Resize (bilinear; with ``prep.crop`` a shorter-side resize and a centre crop) and convert
        channels to match ``prep``; ``self`` if already matching.

        A lazy set is not resampled: it decodes its files at ``prep``'s size, crop and channels instead."""
        _, h, w, c = self.images.shape
        if self.lazy:  # decode the originals at the new size, rather than resample decoded images
            imgs = self.images
            if (imgs.size, imgs.channels, imgs.crop) == (prep.size, prep.channels, prep.crop):
                return self
            return ImageSet(imgs.with_params(prep.size, prep.channels, prep.crop), self.labels, self.classes, self.name)
        if (h, w, c) == (prep.size, prep.size, prep.channels):
            return self  # a square image's centre crop at its own size is itself
        imgs = self.images
        if (h, w) != (prep.size, prep.size):
            imgs = _resize(imgs, prep.size, prep.crop)
        if c != prep.channels:
            if prep.channels == 3:
                imgs = np.repeat(imgs, 3, axis=3)
            else:
                luma = imgs.astype(np.float32) @ LUMA
                imgs = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
        return ImageSet(np.ascontiguousarray(imgs), self.labels, self.classes, self.name)


def _resize(images: np.ndarray, size: int, crop: float | None = None) -> np.ndarray:
    """Every image to ``size x size`` with PIL: a bilinear squash, or with ``crop`` the devices'
    shorter-side resize and centre crop (:func:`devices.images.resize_crop`)."""

    n, _, _, c = images.shape
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for i in range(n):
        img = images[i, :, :, 0] if c == 1 else images[i]
        r = np.asarray(resize_crop(Image.fromarray(img), size, crop))
        out[i] = r.reshape(size, size, c)
    return out
