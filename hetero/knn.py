"""Exact k-nearest-neighbour search by inner product (faiss, chunked over queries), and the input
checks it shares with :mod:`hetero.metrics`.

"k-NN" here is retrieval (which gallery items a query finds), not architecture search (:mod:`hetero.nas`).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from hetero.errors import HeteroError

# Largest finite float32; inner products are bounded by |q| * |g| (Cauchy-Schwarz).
_F32_MAX = float(np.finfo(np.float32).max)


def usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware, so containers are not oversubscribed)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def faiss_threads(n: int | None = None) -> Iterator[Any]:
    """Run faiss with ``n`` OpenMP threads (default: usable CPUs), restoring the old setting; yields
    the faiss module."""
    import faiss  # a required dependency, but 0.2 s of SIMD kernels and OpenMP: loaded when a search runs

    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n or usable_cpus())
    try:
        yield faiss
    finally:
        faiss.omp_set_num_threads(old)


def as_embeddings(x: Any, name: str) -> np.ndarray:
    """Validate a 2-D finite embedding matrix and return it as contiguous float32."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged lists and the like
        raise HeteroError(
            f"{name} embeddings could not be read as an array ({e}); pass an [N, dim] float array"
        ) from None
    if arr.ndim != 2:
        raise HeteroError(f"{name} embeddings must be 2-D [N, dim], got shape {arr.shape}; reshape or stack them")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HeteroError(f"{name} embeddings are empty (shape {arr.shape}); pass at least one row of dim >= 1")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise HeteroError(f"{name} embeddings have dtype {arr.dtype}; pass a real-valued float array")
    with np.errstate(over="ignore"):  # values beyond float32 become Inf and are reported below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr).all(axis=1)))
        raise HeteroError(
            f"{name} embeddings contain NaN or Inf in {bad} row(s) (or values overflowing float32); "
            "fix the model or drop those rows"
        )
    return arr


def check_pair(query: np.ndarray, gallery: np.ndarray, exclude_self: bool) -> None:
    """Check that query and gallery can be compared by inner product."""
    if query.shape[1] != gallery.shape[1]:
        raise HeteroError(
            f"query dim {query.shape[1]} != gallery dim {gallery.shape[1]}; embed both with models of the same space"
        )
    if exclude_self and query.shape[0] != gallery.shape[0]:
        raise HeteroError(
            f"exclude_self=True needs query i to be gallery item i, but there are {query.shape[0]} queries and "
            f"{gallery.shape[0]} gallery items; pass the same set twice or use exclude_self=False"
        )
    qn = float(np.sqrt(np.einsum("ij,ij->i", query, query, dtype=np.float64).max()))
    gn = float(np.sqrt(np.einsum("ij,ij->i", gallery, gallery, dtype=np.float64).max()))
    if qn * gn >= _F32_MAX:
        raise HeteroError(
            f"embedding norms up to {qn:.3g} (query) and {gn:.3g} (gallery) overflow float32 inner products; "
            "L2-normalise the embeddings"
        )


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int, or raise if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise HeteroError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def knn_search(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k gallery items for each query by inner product (faiss, chunked over queries).

    Returns ``(scores, indices)``: float32 and int64 ``[Nq, k]``, best first. With
    ``exclude_self=True`` query i is gallery item i (one set searched against itself) and item i
    is left out of row i. Memory is about ``chunk_size * Ng`` floats at a time.
    """
    q = as_embeddings(query, "query")
    g = as_embeddings(gallery, "gallery")
    check_pair(q, g, exclude_self)
    k = check_positive_int(k, "k")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    available = g.shape[0] - int(exclude_self)
    if k > available:
        raise HeteroError(
            f"k={k} but only {available} gallery items can be returned per query"
            f"{' (self excluded)' if exclude_self else ''}; lower k or enlarge the gallery"
        )
    return knn_inner_product(q, g, k, exclude_self=exclude_self, chunk_size=chunk_size)


def knn_inner_product(
    query: np.ndarray, gallery: np.ndarray, k: int, *, exclude_self: bool, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with faiss, one chunk of queries at a time.

    Inputs are already validated float32. With ``exclude_self`` row i searches k + 1 and drops
    gallery item i (or, if i fell outside the k + 1 by a tie, the last hit).
    """
    nq = query.shape[0]
    kk = k + 1 if exclude_self else k
    scores = np.empty((nq, k), dtype=np.float32)
    indices = np.empty((nq, k), dtype=np.int64)
    with faiss_threads() as faiss:
        for start in range(0, nq, chunk_size):
            stop = min(start + chunk_size, nq)
            d, i = faiss.knn(query[start:stop], gallery, kk, metric=faiss.METRIC_INNER_PRODUCT)
            if exclude_self:
                drop = i == np.arange(start, stop)[:, None]
                drop[~drop.any(axis=1), -1] = True
                keep = ~drop
                d = d[keep].reshape(stop - start, k)
                i = i[keep].reshape(stop - start, k)
            scores[start:stop] = d
            indices[start:stop] = i
    return scores, indices
