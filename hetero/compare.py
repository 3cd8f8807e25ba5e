"""The one comparator: how far a candidate's embeddings (an exported artifact, another model) are from
a reference's, and how much their search results agree.

Export fidelity (artifact vs torch), verify's drift and top-10 overlap and the flip rates all come
from here, so a number means the same thing wherever it is reported. numpy only: it judges arrays
that runners and searches produced and imports no backend (no runtime, no faiss).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hetero.errors import HeteroError

# Floor of a cosine's denominator: a zero row gives cosine 0, not NaN. Far below any real pair of
# norms, so it never changes the cosine of a nonzero row.
EPS = 1e-12

__all__ = ["EPS", "cosine_summary", "fidelity", "flip_rates", "max_abs_diff", "paired_cosine", "topk_overlap"]


def _pair(reference: Any, candidate: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise HeteroError(f"paired embeddings must be two [N, dim] arrays of the same shape, got {a.shape} and {b.shape}; "
                          "embed the same inputs with both")
    return a, b


def paired_cosine(reference: Any, candidate: Any) -> np.ndarray:
    """Cosine of each row of ``candidate`` with the same row of ``reference`` (float64 [N])."""
    a, b = _pair(reference, candidate)
    num = np.einsum("ij,ij->i", a, b)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, EPS)


def cosine_summary(cos: np.ndarray) -> dict[str, float]:
    """Min, 1st percentile and mean of per-row cosines."""
    cos = np.asarray(cos, np.float64)
    return {"min": float(cos.min()), "p01": float(np.percentile(cos, 1)), "mean": float(cos.mean())}


def max_abs_diff(reference: Any, candidate: Any) -> float:
    """Largest absolute difference of any element of the two embedding sets."""
    a, b = _pair(reference, candidate)
    return float(np.abs(a - b).max())


def fidelity(reference: Any, candidate: Any) -> dict[str, float]:
    """What an export records of an artifact against torch: row-wise cosine (min and mean) and the max
    absolute difference."""
    s = cosine_summary(paired_cosine(reference, candidate))
    return {"min_cosine": s["min"], "mean_cosine": s["mean"], "max_abs_diff": max_abs_diff(reference, candidate)}


def topk_overlap(ids_a: np.ndarray, ids_b: np.ndarray) -> float:
    """Mean over queries of |top-k(a) ∩ top-k(b)| / k, for two [N, k] arrays of gallery ids (row i:
    query i's results, by two models or two searches): the top-k agreement. Each id of a row of
    ``ids_a`` found in the same row of ``ids_b`` counts once, so it is the set overlap, and symmetric,
    when a row's ids are distinct (exact search; an approximate index may pad a row with -1).
    NaN for no queries."""
    a, b = np.asarray(ids_a), np.asarray(ids_b)
    if a.shape != b.shape or a.ndim != 2:
        raise HeteroError(f"top-k id arrays differ in shape: {a.shape} vs {b.shape}")
    k = a.shape[1]
    total = 0
    for s in range(0, len(a), 4096):  # [n, k, k] comparisons, a block at a time
        total += int((a[s:s + 4096, :, None] == b[s:s + 4096, None, :]).any(axis=2).sum())
    return total / (len(a) * k) if len(a) and k else float("nan")


def flip_rates(reference_correct: Any, candidate_correct: Any) -> dict[str, float]:
    """Negative and positive flip rates (Yan et al. 2021) of a candidate against a reference, from each
    query's top-1 result being right or not: right then wrong, and wrong then right, as fractions of
    all queries."""
    ref, cand = np.asarray(reference_correct, bool), np.asarray(candidate_correct, bool)
    if ref.shape != cand.shape or ref.ndim != 1 or not len(ref):
        raise HeteroError(f"flip rates need two equal-length 1-D arrays of per-query results, got {ref.shape} and {cand.shape}")
    return {"negative_flip_rate": float(np.mean(ref & ~cand)), "positive_flip_rate": float(np.mean(~ref & cand))}
