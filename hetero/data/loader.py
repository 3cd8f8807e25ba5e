"""One entry point from ``--data`` to an ImageSet, and batching into preprocessed torch tensors."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from hetero.data._decode import shown
from hetero.data.augment import IMAGENET, PAD_CROP, augment_arrays, check_policy
from hetero.data.fashion_mnist import FILES, find_fashion_mnist, has_fashion_mnist, load_fashion_mnist
from hetero.data.image_folder import is_image_folder, load_image_folder
from hetero.data.imageset import ImageSet, Preprocess
from hetero.data.synthetic import synthetic_dataset
from hetero.errors import HeteroError

SYNTHETIC = "synthetic"    # the built-in set, unless a path of that name exists here (then: the path)
SYNTHETIC_SPEC = "synthetic:"  # the built-in set, always: what a run records
_CROP_PAD = 2


def is_synthetic(data: str | os.PathLike | None) -> bool:
    """True if ``--data`` names the built-in synthetic set: ``synthetic:`` always, bare ``synthetic``
    only while no file or folder of that name exists in the working directory (a user's folder called
    ``synthetic`` is a folder). The one way to ask; a ``Path`` is always a path."""
    if not isinstance(data, str):
        return False
    return data == SYNTHETIC_SPEC or (data == SYNTHETIC and not os.path.lexists(data))


def data_source(data: str | os.PathLike | None) -> str | None:
    """``--data`` as a run records it, meaning the same from any directory later: None (Fashion-MNIST,
    found where it is), ``synthetic:``, or the folder's absolute path."""
    if data is None:
        return None
    if is_synthetic(data):
        return SYNTHETIC_SPEC
    return str(Path(data).expanduser().resolve())


def load_dataset(
    data: str | None,
    split: str,
    *,
    download: bool = True,
    size: int | None = None,
    channels: int | None = None,
    progress: bool = True,
    cache: bool | None = None,
    num_workers: int | None = None,
    crop: float | None = None,
) -> ImageSet:
    """Resolve ``--data`` and load ``split`` ("train" or "test").

    ``None``: Fashion-MNIST wherever it is found (or downloaded); ``"synthetic:"`` (or bare
    ``"synthetic"`` where no path of that name exists, see :func:`is_synthetic`): the unit-test set;
    a folder: Fashion-MNIST IDX files or an ImageFolder. ``size``/``channels``/``crop`` only steer how
    ImageFolder images are decoded (use ``ImageSet.conform`` to match a model's preprocessing);
    ``progress=False`` hides the ImageFolder loading bar. An ImageFolder is streamed: ``cache`` and
    ``num_workers`` go to :func:`~hetero.data.image_folder.load_image_folder`.
    """
    if split not in ("train", "test"):
        raise HeteroError(f"unknown split {split!r}; use 'train' or 'test'")
    if data is None:
        return load_fashion_mnist(find_fashion_mnist(None, download=download), split)
    if is_synthetic(data):
        train = split == "train"
        return synthetic_dataset(2000 if train else 500, seed=0 if train else 1, name=f"synthetic/{split}")
    root = Path(data).expanduser()
    # a folder named "synthetic" here shadows the built-in set: say so wherever it does not load
    also = (f" (the path {shown(root)} here is used, not the built-in set: for that, pass --data {SYNTHETIC_SPEC})"
            if isinstance(data, str) and data == SYNTHETIC else "")
    if not root.exists():
        raise HeteroError(
            f"--data {shown(data)}: no such directory; pass a folder with the Fashion-MNIST IDX files "
            f"or an ImageFolder (one sub-folder per class), or {SYNTHETIC_SPEC} for the built-in test set"
        )
    if not root.is_dir():
        raise HeteroError(
            f"--data {shown(data)}: is a file, not a directory; pass a folder with the Fashion-MNIST IDX files "
            f"or an ImageFolder (one sub-folder per class){also}"
        )
    if has_fashion_mnist(root):
        return load_fashion_mnist(root, split)
    if is_image_folder(root):
        return load_image_folder(root, split, size=size, channels=channels, progress=progress, cache=cache,
                                 num_workers=num_workers, crop=crop)
    raise HeteroError(
        f"--data {shown(data)}: neither the four Fashion-MNIST IDX files ({', '.join(FILES)}, raw or .gz) "
        f"nor class sub-folders found; pass one of those layouts{also}"
    )


def iterate_batches(
    ds: ImageSet,
    prep: Preprocess,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool | str = False,
    drop_last: bool = False,
    indices: np.ndarray | None = None,
    num_workers: int | None = None,
    batch_seeds: Sequence[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches ``(x float32 [B,C,H,W], y int64 [B], idx int64 [B])``, preprocessed one at a time.

    ``shuffle`` permutes with ``seed`` (pass a different seed per epoch). ``augment`` True or
    ``"pad-crop"`` adds a random horizontal flip and a random crop after padding 2 px of black (fill 0
    before normalisation, as torchvision does), drawn from a generator seeded with ``seed``;
    ``"imagenet"`` draws each image by RandomResizedCrop, flip and colour jitter
    (:mod:`hetero.data.augment`) from its original file, in the decoding workers, seeded per batch by
    ``batch_seeds`` (default: from ``seed`` and the batch's number). ``indices``: draw exactly these
    rows, in this order (``shuffle`` is then ignored); a resumed or sharded (DDP) training loop
    passes its own order. Arguments are checked at call time, not at the first ``next``.

    A lazy set (an ImageFolder) is decoded batch by batch, in ``num_workers`` DataLoader processes
    (default: the set's own setting, else ``hetero.data.folder_images.default_workers()``); the batches, and
    the augmentation drawn in this process, are the same whatever the number of workers.
    """
    want = (prep.size, prep.size, prep.channels)
    if tuple(ds.images.shape[1:]) != want:
        h, w, c = ds.images.shape[1:]
        raise HeteroError(
            f"{ds.name}: images are {h}x{w}x{c} but the preprocessing expects {want[0]}x{want[1]}x{want[2]}; "
            "call ds.conform(prep) first"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise HeteroError(f"batch size must be a positive integer, got {batch_size!r}")
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= len(ds))):
            raise HeteroError(f"{ds.name}: batch indices must be a 1-D array within 0..{len(ds) - 1}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0):
        raise HeteroError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    policy = check_policy(augment)
    if policy == "auto":
        policy = PAD_CROP
    return _batches(ds, prep, batch_size, shuffle, seed, policy, drop_last, indices, num_workers, batch_seeds)


def _batches(
    ds: ImageSet, prep: Preprocess, batch_size: int, shuffle: bool, seed: int, policy: str | None, drop_last: bool,
    indices: np.ndarray | None = None, num_workers: int | None = None, batch_seeds: Sequence[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    if indices is not None:
        order = indices
    else:
        order = np.random.default_rng(seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
    n = len(order)
    gen = torch.Generator().manual_seed(seed) if policy == PAD_CROP else None
    fill = torch.tensor([-m / s for m, s in zip(prep.mean, prep.std)], dtype=torch.float32)
    stop = n - n % batch_size if drop_last else n
    chunks = [order[start:start + batch_size] for start in range(0, stop, batch_size)]
    if policy == IMAGENET:
        seeds = list(batch_seeds) if batch_seeds is not None else \
            [int(np.random.SeedSequence([seed, k]).generate_state(1)[0]) for k in range(len(chunks))]
        if len(seeds) < len(chunks):
            raise HeteroError(f"{len(chunks)} batches but {len(seeds)} augmentation seeds; pass one seed per batch")
        if ds.lazy:
            pixels = ds.images.augmented_batches(chunks, seeds[:len(chunks)], num_workers)
        else:
            pixels = (augment_arrays(ds.images[idx], s) for idx, s in zip(chunks, seeds))
    elif ds.lazy:
        pixels = ds.images.batches(chunks, num_workers)
    else:
        pixels = (ds.images[idx] for idx in chunks)
    for idx, raw in zip(chunks, pixels):
        x = torch.from_numpy(prep.apply(raw))
        x = _augment(x, fill, gen) if gen is not None else as_nchw(x)
        yield x, torch.from_numpy(ds.labels[idx]), torch.from_numpy(idx.astype(np.int64))


def pixel_stats(ds: ImageSet, batch_size: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the pixels (scaled to 0..1), streamed: a 256-bin histogram per
    channel is exact, so a lazy set is read one batch at a time and never held in memory."""
    c = ds.channels
    counts = np.zeros((c, 256), dtype=np.int64)
    orders = [np.arange(i, min(i + batch_size, len(ds))) for i in range(0, len(ds), batch_size)]
    for raw in (ds.images.batches(orders) if ds.lazy else (ds.images[o] for o in orders)):
        flat = raw.reshape(-1, c)
        for k in range(c):
            counts[k] += np.bincount(flat[:, k], minlength=256)
    v = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum(1)
    mean = (counts * v).sum(1) / n
    var = (counts * (v[None, :] - mean[:, None]) ** 2).sum(1) / n
    return tuple(mean.tolist()), tuple(np.sqrt(var).tolist())


def _augment(x: torch.Tensor, fill: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random horizontal flip, then random crop from a ``_CROP_PAD``-padded copy."""
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    p = _CROP_PAD
    padded = fill.view(1, c, 1, 1).expand(b, c, h + 2 * p, w + 2 * p).clone()
    padded[:, :, p:p + h, p:p + w] = x
    oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    # Index all four dims so the gather writes [B, C, H, W] in row-major order. Indexing only
    # B, H, W gives [B, H, W, C], whose permute has NHWC strides; with C == 1 `.contiguous()` keeps
    # those, torch then runs the whole network channels-last, and oneDNN's AVX2 1x1-conv backward
    # corrupts the heap on such batches (issue 7).
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]   # [B, 1, H, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]   # [B, 1, 1, W]
    return as_nchw(padded[bi, ci, rows, cols])


def as_nchw(x: torch.Tensor) -> torch.Tensor:
    """``x`` with standard row-major (NCHW) strides, copied only if it has other strides.

    ``is_contiguous()`` is not enough: a one-channel batch with NHWC strides ``(HW, 1, W, 1)``
    passes it, yet torch infers channels-last from the strides and runs every layer in that
    format. hetero never trains channels-last: oneDNN's AVX2 kernels crashed on it (issue 7)."""
    if x.stride() == _row_major_strides(x.shape):
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
