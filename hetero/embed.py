"""Batched embedding of an image set with a torch model, and the cached cloud targets."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from hetero import distributed
from hetero._atomic import discard_damaged, remove_stale_temps, write_atomic
from hetero._progress import progress_bar
from hetero.data import ImageSet, Preprocess, iterate_batches
from hetero.errors import HeteroError
from hetero.locations import cache_dir

# an input batch of at most this many bytes (float32): 512 images up to ~180 px grey / ~100 px RGB
_MAX_BATCH_BYTES = 64 << 20


@torch.no_grad()
def embed_images(model: torch.nn.Module, ds: ImageSet, prep: Preprocess, *, batch_size: int = 512,
                 progress: bool = True, desc: str = "embed", num_workers: int | None = None) -> np.ndarray:
    """Embed every image of ``ds`` (in order) -> float32 [N, dim].

    Large images are embedded in smaller batches (at most ``_MAX_BATCH_BYTES`` of input), so memory
    does not grow with the image size; a lazy set (an ImageFolder) is decoded a batch at a time, in
    ``num_workers`` processes (see :func:`~hetero.data.iterate_batches`). The model runs where its
    weights are (a GPU model gets its batches moved there); the embeddings come back on the CPU."""
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    out: list[np.ndarray] = []
    per_image = 4 * prep.channels * prep.size * prep.size
    batch_size = max(1, min(batch_size, _MAX_BATCH_BYTES // per_image))
    bar = progress_bar(total=len(ds), desc=desc, unit="img", disable=not progress, leave=False)
    for x, _, _ in iterate_batches(ds.conform(prep), prep, batch_size, num_workers=num_workers):
        out.append(model(x.to(dev)).float().cpu().numpy())
        bar.update(len(x))
    bar.close()
    emb = np.concatenate(out) if out else np.zeros((0, getattr(model, "dim", 0)), np.float32)
    if not np.isfinite(emb).all():
        raise HeteroError(f"model produced NaN/Inf embeddings on {ds.name}; the checkpoint is broken, re-train it")
    return emb


def targets_dir() -> Path:
    """Where cached embeddings live: ``targets/`` in hetero's cache."""
    return cache_dir() / "targets"


def cloud_targets(cloud, ds: ImageSet, *, progress: bool = True, directory: Path | None = None) -> np.ndarray:
    """Cloud embeddings of ``ds``, computed once and cached on disk, keyed by space fingerprint and data digest.

    ``cloud`` is a loaded cloud :class:`~hetero.checkpoint.Checkpoint`. Returns a read-only memory map.
    """
    return cached_embeddings(cloud, ds, progress=progress, directory=directory, key=cloud.space, desc="cloud targets",
                             training_device=True)


def cached_embeddings(ckpt, ds: ImageSet, *, progress: bool = True, directory: Path | None = None,
                      key: str | None = None, desc: str = "embed", training_device: bool = False) -> np.ndarray:
    """Embeddings of ``ds`` by the checkpoint's model, cached like :func:`cloud_targets`, keyed by the
    model's own weights fingerprint (a cloud's equals its space) and the data digest. Verify uses it
    for the torch edge model's queries and gallery, so a re-run only embeds through the runtimes; those
    stay on the CPU. ``training_device``: embed on the device training runs on (cloud targets)."""
    path = embeddings_cache_path(ckpt, ds, key=key, directory=directory)
    emb = read_cached(path, len(ds), ckpt.spec.dim)
    if emb is not None:
        return emb
    embed = embed_on_training_device if training_device else embed_images
    return write_cached(path, embed(ckpt.model, ds, ckpt.preprocess, progress=progress, desc=desc))


def embed_on_training_device(model: torch.nn.Module, ds: ImageSet, prep: Preprocess, **kw) -> np.ndarray:
    """:func:`embed_images` on the device training runs on (:func:`hetero.distributed.device`: a GPU
    with ``HETERO_TRAIN_DEVICE=cuda`` or under torchrun), so a GPU run does not embed its cloud targets on
    the CPU. A CPU model is moved there for the pass and back afterwards."""
    dev = distributed.device()
    here = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type == "cpu" or here != torch.device("cpu"):
        return embed_images(model, ds, prep, **kw)
    model.to(dev)
    try:
        return embed_images(model, ds, prep, **kw)
    finally:
        model.cpu()


def embeddings_cache_path(ckpt, ds: ImageSet, *, key: str | None = None, directory: Path | None = None) -> Path:
    """Where :func:`cached_embeddings` keeps the embeddings of ``ds`` by ``ckpt`` (or by ``key``)."""
    directory = Path(directory) if directory else targets_dir()
    key = key or ckpt.fingerprint
    return directory / f"{key[:16]}-{ds.digest()[:16]}-{len(ds)}.npy"


def read_cached(path: Path, n: int, dim: int) -> np.ndarray | None:
    """The cached [n, dim] float32 embeddings at ``path`` (memory-mapped), or None if absent or
    unreadable. A damaged entry (zero bytes, cut short by a crash or a full disk, another shape) is
    deleted with a one-line warning: the caller computes the embeddings again and caches them anew."""
    try:
        seen = os.lstat(path)
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError):  # numpy's words for a file that is no complete .npy
        why = "zero bytes" if seen.st_size == 0 else f"{seen.st_size:,} bytes, not a complete .npy file"
        discard_damaged(path, seen, "cached embedding file", why)
        return None
    except OSError:  # absent, or not ours to read: computed again (and replaced if the directory allows)
        return None
    if emb.shape == (n, dim) and emb.dtype == np.float32:
        return emb
    held = f"{emb.dtype} {list(emb.shape)}"
    del emb
    discard_damaged(path, seen, "cached embedding file", f"it holds {held}, not float32 [{n}, {dim}]")
    return None


def write_cached(path: Path, emb: np.ndarray) -> np.ndarray:
    """Write ``emb`` to ``path`` (:func:`hetero._atomic.write_atomic`: a unique temp file, fsynced,
    renamed, removed again on any error, a full disk included); returns it memory-mapped. Temp files
    of writers killed more than an hour ago are cleared on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, lambda name: _ENTRY.match(name) is not None)
    arr = np.ascontiguousarray(emb, dtype=np.float32)
    write_atomic(path, lambda f: np.save(f, arr, allow_pickle=False))
    return np.load(path, mmap_mode="r", allow_pickle=False)


_ENTRY = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})-(\d+)\.npy$")


def cache_entries(space: str | None = None, directory: Path | None = None) -> list[dict]:
    """The cached cloud-target files (newest first), of spaces whose fingerprint starts with ``space``
    if given: path, space and data-digest prefixes, images, bytes, mtime.

    Only files named as :func:`cloud_targets` names them are listed; anything else is left alone."""
    if space is not None and not re.fullmatch(r"[0-9a-f]{1,64}", space):
        raise HeteroError(f"--fingerprint must be a hex fingerprint prefix (see `hetero cache`), got {space!r}")
    directory = Path(directory) if directory else targets_dir()
    if not directory.is_dir():
        return []
    rows = []
    for p in directory.iterdir():
        m = _ENTRY.match(p.name)
        if m and p.is_file() and (space is None or m[1].startswith(space[:16])):  # file names keep 16 hex digits
            st = p.stat()
            rows.append({"path": p, "space": m[1], "data": m[2], "images": int(m[3]), "bytes": st.st_size,
                         "mtime": st.st_mtime})
    return sorted(rows, key=lambda r: r["mtime"], reverse=True)


def clear_cache(space: str | None = None, directory: Path | None = None) -> list[dict]:
    """Delete the cached cloud targets :func:`cache_entries` lists; returns what went.

    Targets are recomputed on the next ``train-edge`` that needs them. Without ``space``, temp files
    of killed writers go too, once an hour old (a younger one may be another run's, still writing)."""
    gone = cache_entries(space, directory)
    for r in gone:
        r["path"].unlink(missing_ok=True)
    if space is None:
        remove_stale_temps(Path(directory) if directory else targets_dir(),
                           lambda name: _ENTRY.match(name) is not None)
    return gone


@torch.no_grad()
def embed_rows(model: torch.nn.Module, ds, prep, *, progress: bool = True, desc: str = "embed") -> np.ndarray:
    """Embeddings of every image of ``ds`` (in order): each rank embeds its contiguous chunk, then all
    ranks gather them. One process: :func:`embed_images` unchanged."""
    if not distributed.active():
        return embed_images(model, ds, prep, progress=progress, desc=desc)
    rows = distributed.chunk(len(ds))
    local = embed_images(model, ds.subset(rows), prep, progress=progress and distributed.is_main(), desc=desc)
    return distributed.gather_rows(local, len(ds))


def cached_embeddings_across_ranks(ckpt, ds, *, progress: bool = True, key: str | None = None, desc: str = "embed") -> np.ndarray:
    """:func:`cached_embeddings`, with the embedding split over the ranks under torchrun.

    Rank 0 decides whether the cache holds a usable file, and every rank follows that one decision
    (ranks checking on their own could disagree if the file appeared between their checks, and the
    ones that embed would wait forever for the others). On a hit every rank reads the file; on a miss
    all ranks embed their chunk, the rows are gathered, and rank 0 writes them to the cache."""
    if not distributed.init():
        return cached_embeddings(ckpt, ds, progress=progress, key=key, desc=desc)
    path = embeddings_cache_path(ckpt, ds, key=key)
    hit = distributed.all_gather_object(read_cached(path, len(ds), ckpt.spec.dim) is not None
                                        if distributed.is_main() else None)[0]
    if hit:
        return np.asarray(cached_embeddings(ckpt, ds, progress=False, key=key, desc=desc))
    emb = embed_rows(ckpt.model, ds.conform(ckpt.preprocess), ckpt.preprocess, progress=progress, desc=desc)
    if not np.isfinite(emb).all():
        raise HeteroError(f"model produced NaN/Inf embeddings on {ds.name}; the checkpoint is broken, re-train it")
    if distributed.is_main():
        write_cached(path, emb)
    distributed.barrier()
    return emb
