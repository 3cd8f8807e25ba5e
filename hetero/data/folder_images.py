"""Images decoded on demand: the ``ImageSet.images`` of an ImageFolder, read per batch.

:class:`FolderImages` looks like a uint8 ``[N, H, W, C]`` array (``shape``, ``dtype``, ``len``,
indexing, ``np.asarray``) but holds only the file list; indexing decodes just the rows asked for, from
the files or from an on-disk cache of decoded images. :meth:`FolderImages.batches` decodes a sequence
of batches in torch DataLoader workers, which receive the file list (paths as one bytes array, so
forked workers share it without copying) and send back one uint8 batch at a time.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from devices.images import ImageError, open_image
from hetero._progress import progress_bar
from hetero.data import _image_cache as icache
from hetero.data._decode import load_one
from hetero.data.augment import ImagenetAugment, image_seeds
from hetero.errors import HeteroError

_EAGER_GB_ENV = "HETERO_MAX_EAGER_GB"
_WORKERS_ENV = "HETERO_NUM_WORKERS"


def default_workers() -> int:
    """Decoding processes for streamed batches: ``$HETERO_NUM_WORKERS``, else one per core beyond the
    first (which runs the model), at most 4; 0 decodes in the calling process."""
    env = os.environ.get(_WORKERS_ENV)
    if env is not None:
        try:
            n = int(env)
        except ValueError:
            n = -1
        if n < 0:
            raise HeteroError(f"{_WORKERS_ENV} must be a non-negative integer, got {env!r}")
        return n
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def eager_limit_bytes() -> int:
    env = os.environ.get(_EAGER_GB_ENV, "2")
    try:
        gb = float(env)
    except ValueError:
        raise HeteroError(f"{_EAGER_GB_ENV} must be a number of GB, got {env!r}") from None
    return int(gb * 1e9)


class _Decoder:
    """Turns global row numbers into a uint8 batch; small and picklable (what a worker gets)."""

    def __init__(self, paths: np.ndarray, size: int, channels: int, convert: int | None,
                 cache: tuple[Path, int] | None, crop: float | None = None):
        self.paths, self.size, self.channels, self.convert, self.cache = paths, size, channels, convert, cache
        self.crop = crop

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        shape = (len(self.paths), self.size, self.size, self.channels)
        if self.cache is not None:
            return icache.read_rows(self.cache[0], self.cache[1], shape, rows)
        out = np.empty((len(rows), self.size, self.size, self.channels), dtype=np.uint8)
        for i, r in enumerate(rows):
            arr, _ = load_one(os.fsdecode(self.paths[r]), self.size, self.convert, self.crop)
            out[i] = arr[..., :self.channels]  # an auto-grey set decodes RGB and keeps R, as the eager loader did
        return out


class _AugmentingDecoder:
    """``(rows, batch seed)`` -> a uint8 batch augmented from the original files (``imagenet``:
    :class:`~hetero.data.augment.ImagenetAugment`), one seed per image; what a worker gets."""

    def __init__(self, paths: np.ndarray, size: int, channels: int, convert: int | None):
        self.paths, self.convert = paths, convert
        self.augment = ImagenetAugment(size, channels)
        self.shape = (size, size, channels)

    def __call__(self, item: tuple[np.ndarray, int]) -> np.ndarray:
        rows, seed = item
        out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        for i, (r, s) in enumerate(zip(rows, image_seeds(seed, len(rows)))):
            path = os.fsdecode(self.paths[r])
            try:
                out[i] = self.augment(open_image(path, self.convert), s)
            except ImageError as e:
                raise HeteroError(str(e)) from None
        return out


class _BatchDataset:
    """Map-style dataset whose items are whole batches; errors travel back as one-line strings,
    because DataLoader re-raises a worker's exception with the worker's traceback in the message."""

    def __init__(self, decode: _Decoder):
        self.decode = decode

    def __getitem__(self, rows: Any) -> Any:
        try:
            return torch.from_numpy(self.decode(rows))
        except HeteroError as e:
            return str(e)


def _identity(x: Any) -> Any:
    return x


def stream(decode: Any, orders: Sequence[Any], num_workers: int) -> Iterator[np.ndarray]:
    """``decode(order)`` for each order, in order; in ``num_workers`` processes when that helps."""
    if num_workers <= 0 or len(orders) <= 1:
        for rows in orders:
            yield decode(rows)
        return

    loader = DataLoader(_BatchDataset(decode), batch_size=None, sampler=list(orders), collate_fn=_identity,
                        num_workers=min(num_workers, len(orders)), prefetch_factor=2,
                        # its own generator: starting workers must not draw from the training process's (dropout
                        # and stochastic depth would then depend on the number of workers); decoding seeds itself
                        generator=torch.Generator().manual_seed(0))
    for item in loader:
        if isinstance(item, str):
            raise HeteroError(item)
        yield item.numpy()


class FolderImages:
    """uint8 ``[N, size, size, channels]`` images of an ImageFolder split, decoded when indexed."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: np.ndarray, stats: np.ndarray, size: int, channels: int, convert: int | None, *,
                 label: str, rows: np.ndarray | None = None, use_cache: bool = False,
                 num_workers: int | None = None, progress: bool = True, _shared: dict | None = None,
                 crop: float | None = None):
        self._paths, self._stats = paths, stats
        self.size, self.channels, self.convert = int(size), int(channels), convert
        self.crop = None if crop is None else float(crop)  # None: squashed; else shorter side to size/crop, centre cut
        self.label, self._rows = label, rows
        self.use_cache, self.num_workers, self.progress = use_cache, num_workers, progress
        # per file list, shared by subsets and conformed copies: its key and per-file sha256s
        self._shared = _shared if _shared is not None else {"key": icache.files_key(paths, stats)}
        self._cache: tuple[Path, int] | None = None
        if use_cache:
            self._cache = self._open_or_build_cache()

    # ------------------------------------------------------------------ array-like surface
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.size, self.size, self.channels)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self._paths) if self._rows is None else len(self._rows)

    def __repr__(self) -> str:
        where = f", cache {self._cache[0]}" if self._cache else ""
        return f"FolderImages({self.label}, shape={self.shape}{where})"

    @property
    def cache_path(self) -> Path | None:
        """The decoded-image cache file in use, if any."""
        return self._cache[0] if self._cache else None

    @property
    def files(self) -> list[str]:
        """The image files, in row order."""
        return [os.fsdecode(p) for p in self._paths[self._global(np.arange(len(self)))]]

    def _global(self, rows: np.ndarray) -> np.ndarray:
        return rows if self._rows is None else self._rows[rows]

    def _decoder(self) -> _Decoder:
        return _Decoder(self._paths, self.size, self.channels, self.convert, self._cache, self.crop)

    def _index(self, key: Any) -> np.ndarray:
        idx = np.arange(len(self))[key]
        return np.atleast_1d(idx)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The images at ``rows`` (positions in this set), decoded in this process."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._decoder()(self._global(rows))

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            if not key or key[0] is Ellipsis:
                return np.asarray(self)[key]
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"index {key} is out of bounds for {n} images")
            out = self.read(np.array([int(key) % n]))[0]
        else:
            out = self.read(self._index(key))
            rest = (slice(None), *rest) if rest else rest
        return out[rest] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.nbytes > eager_limit_bytes():
            n, h, w, c = self.shape
            raise HeteroError(
                f"{self.label}: {n} images of {h}x{w}x{c} ({self.nbytes / 1e9:.1f} GB) are streamed from disk, too many "
                f"to load into memory at once; use fewer (a subset or --limit) or raise {_EAGER_GB_ENV} "
                f"(now {eager_limit_bytes() / 1e9:g})"
            )
        out = self.load()
        return out if dtype is None else out.astype(dtype, copy=False)

    def load(self) -> np.ndarray:
        """All the images in memory, whatever their size."""
        out = np.empty(self.shape, dtype=np.uint8)
        step = 256
        for i, b in zip(range(0, len(self), step),
                        self.batches([np.arange(i, min(i + step, len(self))) for i in range(0, len(self), step)])):
            out[i:i + len(b)] = b
        return out

    def reshape(self, *shape: Any) -> np.ndarray:
        """The images in memory, reshaped (loads them all; see ``__array__``'s limit)."""
        return np.asarray(self).reshape(*shape)

    def astype(self, dtype: Any, **kw: Any) -> np.ndarray:
        return np.asarray(self).astype(dtype, **kw)

    # ------------------------------------------------------------------ derived sets
    def _derive(self, *, rows: np.ndarray | None, size: int, channels: int, convert: int | None,
                crop: float | None) -> FolderImages:
        return FolderImages(self._paths, self._stats, size, channels, convert, label=self.label, rows=rows,
                            use_cache=self.use_cache, num_workers=self.num_workers, progress=self.progress,
                            _shared=self._shared, crop=crop)

    def take(self, idx: np.ndarray) -> FolderImages:
        """The images at ``idx`` (positions in this set), still lazy."""
        idx = np.asarray(idx, dtype=np.int64)
        return self._derive(rows=self._global(idx % max(len(self), 1)), size=self.size, channels=self.channels,
                            convert=self.convert, crop=self.crop)

    def with_params(self, size: int, channels: int, crop: float | None = None) -> FolderImages:
        """The same files decoded at another size / channel count / centre crop (from the originals,
        not resampled)."""
        return self._derive(rows=self._rows, size=size, channels=channels, convert=channels, crop=crop)

    # ------------------------------------------------------------------ batches, cache, digest
    def batches(self, orders: Sequence[np.ndarray], num_workers: int | None = None) -> Iterator[np.ndarray]:
        """uint8 batches of the rows in each of ``orders``; decoded in worker processes unless the
        images come from the cache (a read is cheaper than a worker's hand-off) or there is one batch."""
        if num_workers is None:
            num_workers = self.num_workers if self.num_workers is not None else default_workers()
        if self._cache is not None:
            num_workers = 0
        return stream(self._decoder(), [self._global(np.asarray(o, dtype=np.int64)) for o in orders], num_workers)

    def augmented_batches(self, orders: Sequence[np.ndarray], seeds: Sequence[int],
                          num_workers: int | None = None) -> Iterator[np.ndarray]:
        """uint8 batches of the rows in each of ``orders``, each image drawn by the ``imagenet``
        augmentation from its original file (never the cache: a random crop needs the full picture)
        with a seed from the batch's seed in ``seeds``; the same whatever the number of workers."""
        if num_workers is None:
            num_workers = self.num_workers if self.num_workers is not None else default_workers()
        decode = _AugmentingDecoder(self._paths, self.size, self.channels, self.convert)
        items = [(self._global(np.asarray(o, dtype=np.int64)), int(s)) for o, s in zip(orders, seeds, strict=True)]
        return stream(decode, items, num_workers)

    def _open_or_build_cache(self) -> tuple[Path, int]:
        full = (len(self._paths), self.size, self.size, self.channels)
        path = icache.image_cache_path(self._shared["key"], full, self.convert, self.crop)
        offset = icache.open_image_cache(path, full)
        if offset is None:
            n, step = full[0], 256
            orders = [np.arange(i, min(i + step, n)) for i in range(0, n, step)]
            workers = self.num_workers if self.num_workers is not None else os.cpu_count() or 1
            decode = _Decoder(self._paths, self.size, self.channels, self.convert, None, self.crop)
            bar = progress_bar(total=n, desc=f"caching {self.label}", unit="img", leave=False,
                               disable=not self.progress or n <= 1000)

            def counted() -> Iterator[np.ndarray]:
                for b in stream(decode, orders, workers):
                    bar.update(len(b))
                    yield b

            try:
                offset = icache.write_image_cache(path, full, counted())
            finally:
                bar.close()
        return path, offset

    def file_hashes(self) -> np.ndarray:
        """sha256 of each file's bytes (in row order), uint8 ``[N, 32]``."""
        if "sha" not in self._shared:
            self._shared["sha"] = icache.file_hashes(self._paths, self._shared["key"],
                                                     progress=self.progress and len(self._paths) > 1000)
        return self._shared["sha"][self._global(np.arange(len(self)))]

    def digest(self, labels: np.ndarray) -> str:
        """sha256 over the decode parameters, each file's content hash (row order) and the labels."""
        h = hashlib.sha256(b"hetero-folder-images-v1")
        h.update(repr((self.shape, self.convert) if self.crop is None else (self.shape, self.convert, self.crop)).encode())
        h.update(self.file_hashes().tobytes())
        h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
        return h.hexdigest()
