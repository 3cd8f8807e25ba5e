"""ImageFolder datasets: one sub-folder per class, images of any size and channel count."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hetero.data._decode import GREY_MODES, load_one, probe_mode
from hetero.data._decode import load_one as _load_one  # noqa: F401  (its old name)
from hetero.data.imageset import ImageSet
from hetero.data.lazy import FolderImages
from hetero.errors import HeteroError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})
DEFAULT_SIZE = 32
_SPLITS = ("train", "test", "val")
_PROGRESS_MIN = 1000
_CACHE_ENV = "HETERO_IMAGE_CACHE"


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by relative path, hidden ones skipped."""
    files = [
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def split_dirs(root: Path) -> dict[str, Path] | None:
    """``{"train": ..., "test": ..., "val": ...}`` if ``root`` has train plus test/val sub-folders, else None."""
    if not (root / "train").is_dir():
        return None
    test, val = root / "test", root / "val"
    if not (test.is_dir() or val.is_dir()):
        return None
    return {"train": root / "train", "test": test if test.is_dir() else val, "val": val if val.is_dir() else test}


def is_image_folder(root: str | Path) -> bool:
    """True if ``root`` is a directory with at least one (class or split) sub-folder."""
    root = Path(root)
    return root.is_dir() and bool(_subdirs(root))


def _class_files(folder: Path) -> dict[str, list[Path]]:
    classes = _subdirs(folder)
    if not classes:
        raise HeteroError(
            f"{folder}: no class sub-folders; an ImageFolder has one sub-folder per class holding its images"
        )
    out: dict[str, list[Path]] = {}
    for c in classes:
        files = _images_in(c)
        if not files:
            raise HeteroError(
                f"{c}: class folder holds no images ({'/'.join(sorted(IMAGE_EXTENSIONS))}); add images or remove it"
            )
        out[c.name] = files
    return out


def load_image_folder(
    root: str | Path, split: str, size: int | None = None, channels: int | None = None, *, progress: bool = True,
    lazy: bool = True, cache: bool | None = None, num_workers: int | None = None,
) -> ImageSet:
    """Index one split of an ImageFolder; images are decoded, resized to ``size`` (default 32) square,
    when a batch of them is used.

    ``root/train`` + ``root/test`` (or ``val``) are used as splits when present; otherwise each
    class's sorted files are split deterministically: every 5th file is "test", the rest "train".
    ``channels`` defaults to 3 if any image has colour, else 1. ``progress`` shows a bar for
    folders of more than ``_PROGRESS_MIN`` images (``--quiet`` turns it off).

    Indexing stats every file and reads its header (an unreadable file fails here); the pixels are
    decoded per batch (``ImageSet.images`` is a :class:`~hetero.data.lazy.FolderImages`), in
    ``num_workers`` DataLoader processes (default: see ``default_workers``), so memory is bounded by
    the batch, not the folder. ``cache`` (default ``$HETERO_IMAGE_CACHE``) decodes the split once
    into a uint8 file under ``<hetero cache>/images`` that later runs read instead of the images.
    ``lazy=False`` returns the images decoded in memory, as before.
    """
    from hetero._progress import progress_bar

    root = Path(root).expanduser()
    if not root.is_dir():
        raise HeteroError(f"{root}: no such directory; pass an ImageFolder (one sub-folder per class)")
    if split not in _SPLITS:
        raise HeteroError(f"unknown split {split!r}; use one of {', '.join(_SPLITS)}")
    size = DEFAULT_SIZE if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise HeteroError(f"image size must be a positive integer, got {size!r}")
    if channels not in (None, 1, 3):
        raise HeteroError(f"channels must be 1 or 3, got {channels!r}")

    dirs = split_dirs(root)
    if dirs is not None:
        # classes are the union over all split folders, so labels agree between splits
        per_dir = {d: _class_files(d) for d in set(dirs.values())}
        classes = sorted(set().union(*per_dir.values()))
        folder = dirs[split]
        files = per_dir[folder]
        hint = "add images to it"
    else:
        all_files = _class_files(root)
        classes = sorted(all_files)
        want_test = split != "train"
        files = {c: [f for i, f in enumerate(fs) if (i % 5 == 4) == want_test] for c, fs in all_files.items()}
        folder = root
        hint = "every 5th file per class goes to 'test': add images, or use train/ and test/ sub-folders"
    index = {c: i for i, c in enumerate(classes)}
    items = [(f, index[c]) for c in sorted(files) for f in files[c]]
    if not items:
        raise HeteroError(f"{folder}: split {split!r} has no images; {hint}")

    paths = [p for p, _ in items]
    stats = np.empty((len(paths), 2), dtype=np.int64)
    modes: list[str] = []
    # index: stat for the cache keys, and each header opened (not decoded) so an unreadable file fails now
    for i, path in enumerate(progress_bar(paths, desc=f"loading {folder.name}/{split}",
                                          disable=not progress or len(items) <= _PROGRESS_MIN, unit="img")):
        st = path.stat()
        stats[i] = st.st_size, st.st_mtime_ns
        modes.append(probe_mode(path))
    if channels is None:
        # colour if any image has colour once decoded at this size; a grey mode cannot, so only files
        # of other modes are decoded, in order, until the first colourful one
        color = any(m not in GREY_MODES and load_one(p, size, None)[1] for p, m in zip(paths, modes))
        out_channels = 3 if color else 1
    else:
        out_channels = channels
    labels = np.array([y for _, y in items], dtype=np.int64)
    use_cache = _env_flag(_CACHE_ENV) if cache is None else bool(cache)
    lazy_images = FolderImages(np.array([os.fsencode(os.path.abspath(p)) for p in paths]), stats, size, out_channels,
                               channels, label=f"{folder}/{split}" if dirs is None else str(folder),
                               use_cache=use_cache, num_workers=num_workers, progress=progress)
    images = lazy_images if lazy else lazy_images.load()
    return ImageSet(images, labels, tuple(classes), f"folder:{root.resolve()}/{split}")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
