"""ImageFolder datasets: one sub-folder per class, images of any size and channel count.

A root may instead hold split folders: ``train/`` plus an evaluation split named ``test/``, ``val/``,
``valid/`` or ``validation/`` (any case), each with one sub-folder per class. Split names never
become classes: a root that mixes them with class folders, names one split twice (``val/`` and
``validation/``) or has a training split without an evaluation one (or the reverse) is refused with
one line that says how to lay it out.

File and folder names are taken as the bytes they are: a name that is not UTF-8, or holds a newline,
loads like any other; messages, progress bars, class names and the set's name show it escaped
(:func:`~devices.images.shown`), never raw. Image files are decoded by :mod:`devices.images`, the
decoder the standalone runner uses too.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from devices.images import IMAGE_EXTENSIONS, check_crop, is_image_file, list_images
from hetero._progress import progress_bar
from hetero.data._decode import GREY_MODES, load_one, probe_mode, shown
from hetero.data._decode import load_one as _load_one  # noqa: F401  (its old name)
from hetero.data.folder_images import FolderImages
from hetero.data.imageset import ImageSet
from hetero.errors import HeteroError

DEFAULT_SIZE = 32
_SPLITS = ("train", "test", "val")
# folder names (lower case) of each split role; "test" (queries, evaluation) takes a val folder when
# there is no test folder, and "val" a test folder when there is no val folder
SPLIT_NAMES = {"train": ("train",), "test": ("test",), "val": ("val", "valid", "validation")}
_ROLE = {name: role for role, names in SPLIT_NAMES.items() for name in names}
_PROGRESS_MIN = 1000
_CACHE_ENV = "HETERO_IMAGE_CACHE"


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


_images_in = list_images  # its old name (tests use it)


def _has_images(folder: Path) -> bool:
    return any(is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
               for p in folder.rglob("*"))


def _names(dirs: list[Path]) -> str:
    return ", ".join(f"{shown(d.name)}/" for d in dirs)


_LAYOUT = "lay it out as ROOT/train/<class>/... plus ROOT/test/<class>/... (or val/, valid/, validation/)"


def split_dirs(root: Path) -> dict[str, Path] | None:
    """``{"train": ..., "test": ..., "val": ...}`` if ``root`` holds split folders, None if it holds
    class folders only. The evaluation folder serves both "test" and "val" when only one exists.

    A one-line HeteroError for a root that is neither: a split name twice (``val/`` and
    ``validation/``, ``test/`` and ``Test/``), split folders beside folders of images (classes outside
    the splits, or a class named like a split), a training split alone or an evaluation split alone.
    Folders beside the splits that hold no images (annotations, say) are left alone."""
    subdirs = _subdirs(root)
    found: dict[str, list[Path]] = {}
    for d in subdirs:
        role = _ROLE.get(d.name.lower())
        if role is not None:
            found.setdefault(role, []).append(d)
    if not found:
        return None
    where = shown(root)
    for role in ("train", "test", "val"):
        if len(found.get(role, ())) > 1:
            raise HeteroError(f"{where}: {_names(found[role])} all name the {role} split; keep one of them "
                              "(merge the others into it, or move them out of the folder)")
    others = [d for d in subdirs if d.name.lower() not in _ROLE and _has_images(d)]
    splits = [d for ds in found.values() for d in ds]
    if others:
        raise HeteroError(
            f"{where}: split folders ({_names(splits)}) beside folders of images ({_names(others)}); a folder named "
            f"like a split is taken as one, so rename a class so named, or {_LAYOUT}")
    if "train" not in found:
        raise HeteroError(f"{where}: an evaluation split ({_names(splits)}) but no train/ beside it; add "
                          f"{shown(root / 'train')}/<class>/... with the training images")
    if "test" not in found and "val" not in found:
        raise HeteroError(f"{where}: a train/ split but no evaluation split beside it; add "
                          f"{shown(root / 'test')}/<class>/..., or pass --data {shown(root / found['train'][0].name)} "
                          "to split its files (every 5th per class is test)")
    test = found.get("test", found.get("val"))[0]
    val = found.get("val", found.get("test"))[0]
    return {"train": found["train"][0], "test": test, "val": val}


def is_image_folder(root: str | Path) -> bool:
    """True if ``root`` is a directory with at least one (class or split) sub-folder."""
    root = Path(root)
    return root.is_dir() and bool(_subdirs(root))


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """``{shown class name: files}``; class names are the folder names, escaped where not printable."""
    classes = _subdirs(folder)
    if not classes:
        raise HeteroError(
            f"{shown(folder)}: no class sub-folders; an ImageFolder has one sub-folder per class holding its images"
        )
    out: dict[str, list[Path]] = {}
    for c in classes:
        files = list_images(c)
        if not files:
            raise HeteroError(
                f"{shown(c)}: class folder holds no images ({'/'.join(sorted(IMAGE_EXTENSIONS))}); add images or remove it"
            )
        name = shown(c.name)
        if name in out:  # two names that escape alike: "a\xff" written out, and the byte 0xff
            raise HeteroError(f"{shown(folder)}: two class folders are both shown as {name!r}; rename one of them")
        out[name] = files
    return out


def load_image_folder(
    root: str | Path, split: str, size: int | None = None, channels: int | None = None, *, progress: bool = True,
    lazy: bool = True, cache: bool | None = None, num_workers: int | None = None, crop: float | None = None,
) -> ImageSet:
    """Index one split of an ImageFolder; images are decoded, resized to ``size`` (default 32) square,
    when a batch of them is used: squashed, or with ``crop`` (a fraction, e.g. 0.875) their shorter side
    resized to ``size / crop`` and the centre cut out.

    ``root/train`` + ``root/test`` (or ``val``, ``valid``, ``validation``) are used as splits when
    present (see :func:`split_dirs`); otherwise each class's sorted files are split deterministically:
    every 5th file is "test", the rest "train".
    ``channels`` defaults to 3 if any image has colour, else 1. ``progress`` shows a bar for
    folders of more than ``_PROGRESS_MIN`` images (``--quiet`` turns it off).

    Indexing stats every file and reads its header (an unreadable file fails here); the pixels are
    decoded per batch (``ImageSet.images`` is a :class:`~hetero.data.folder_images.FolderImages`), in
    ``num_workers`` DataLoader processes (default: see ``default_workers``), so memory is bounded by
    the batch, not the folder. ``cache`` (default ``$HETERO_IMAGE_CACHE``) decodes the split once
    into a uint8 file under ``<hetero cache>/images`` that later runs read instead of the images.
    ``lazy=False`` returns the images decoded in memory, as before.
    """

    root = Path(root).expanduser()
    if not root.is_dir():
        raise HeteroError(f"{shown(root)}: no such directory; pass an ImageFolder (one sub-folder per class)")
    if split not in _SPLITS:
        raise HeteroError(f"unknown split {split!r}; use one of {', '.join(_SPLITS)}")
    size = DEFAULT_SIZE if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise HeteroError(f"image size must be a positive integer, got {size!r}")
    if channels not in (None, 1, 3):
        raise HeteroError(f"channels must be 1 or 3, got {channels!r}")
    problem = check_crop(crop)
    if problem:
        raise HeteroError(f"image {problem}")

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
        raise HeteroError(f"{shown(folder)}: split {split!r} has no images; {hint}")

    paths = [p for p, _ in items]
    stats = np.empty((len(paths), 2), dtype=np.int64)
    modes: list[str] = []
    # index: stat for the cache keys, and each header opened (not decoded) so an unreadable file fails now
    for i, path in enumerate(progress_bar(paths, desc=f"loading {shown(folder.name)}/{split}",
                                          disable=not progress or len(items) <= _PROGRESS_MIN, unit="img")):
        try:
            st = path.stat()
        except OSError as e:
            raise HeteroError(f"{shown(path)}: cannot read ({e.strerror or e}); the folder changed while it was "
                              "indexed, load it again") from None
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
                               channels, label=shown(f"{folder}/{split}" if dirs is None else folder),
                               use_cache=use_cache, num_workers=num_workers, progress=progress, crop=crop)
    images = lazy_images if lazy else lazy_images.load()
    return ImageSet(images, labels, tuple(classes), f"folder:{shown(root.resolve())}/{split}")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
