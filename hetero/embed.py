"""Batched embedding of an image set with a torch model, and the cached cloud targets."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hetero.data import ImageSet, Preprocess, iterate_batches
from hetero.errors import HeteroError


@torch.no_grad()
def embed_images(model: torch.nn.Module, ds: ImageSet, prep: Preprocess, *, batch_size: int = 512,
                 progress: bool = True, desc: str = "embed") -> np.ndarray:
    """Embed every image of ``ds`` (in order) -> float32 [N, dim]."""
    model.eval()
    out: list[np.ndarray] = []
    bar = tqdm(total=len(ds), desc=desc, unit="img", disable=not progress, leave=False)
    for x, _, _ in iterate_batches(ds.conform(prep), prep, batch_size):
        out.append(model(x).float().numpy())
        bar.update(len(x))
    bar.close()
    emb = np.concatenate(out) if out else np.zeros((0, getattr(model, "dim", 0)), np.float32)
    if not np.isfinite(emb).all():
        raise HeteroError(f"model produced NaN/Inf embeddings on {ds.name}; the checkpoint is broken, re-train it")
    return emb


def cache_dir() -> Path:
    return Path(os.environ.get("HETERO_CACHE", Path.home() / ".cache" / "hetero"))


def cloud_targets(cloud, ds: ImageSet, *, progress: bool = True, directory: Path | None = None) -> np.ndarray:
    """Cloud embeddings of ``ds``, computed once and cached on disk, keyed by space fingerprint and data digest.

    ``cloud`` is a loaded cloud :class:`~hetero.checkpoint.Checkpoint`. Returns a read-only memory map.
    """
    directory = Path(directory) if directory else cache_dir() / "targets"
    path = directory / f"{cloud.space[:16]}-{ds.digest()[:16]}-{len(ds)}.npy"
    if path.is_file():
        try:
            emb = np.load(path, mmap_mode="r", allow_pickle=False)
            if emb.shape == (len(ds), cloud.spec.dim) and emb.dtype == np.float32:
                return emb
        except (OSError, ValueError):
            pass  # unreadable cache entry: recompute and replace it
    emb = embed_images(cloud.model, ds, cloud.preprocess, progress=progress, desc="cloud targets")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, emb, allow_pickle=False)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r", allow_pickle=False)
