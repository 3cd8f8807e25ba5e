"""Flip metrics (Yan et al. 2021, "Positive-Congruent Training"): how a model swap changes which
individual queries are answered right, not just the average.

A *negative flip* is a query whose top-1 result is right for the reference (the paragon: cloud
query vs cloud gallery) and wrong for the candidate (edge query vs cloud gallery); a *positive
flip* is the reverse. Both are fractions of all queries.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hetero.errors import HeteroError
from hetero.metrics import search


def top1_correct(query_emb: np.ndarray, query_labels: Any, gallery_emb: np.ndarray, gallery_labels: Any,
                 *, exclude_self: bool = False) -> np.ndarray:
    """Boolean per query: does the nearest gallery item (inner product) carry the query's label?"""
    ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
    if len(ql) != len(query_emb) or len(gl) != len(gallery_emb):
        raise HeteroError("labels and embeddings differ in length; pass one label per embedding row")
    _, idx = search(query_emb, gallery_emb, 1, exclude_self=exclude_self)
    return gl[idx[:, 0]] == ql


def flip_rates(reference_correct: np.ndarray, candidate_correct: np.ndarray) -> dict[str, float]:
    """Negative and positive flip rates of a candidate against a reference, per query top-1."""
    ref, cand = np.asarray(reference_correct, bool), np.asarray(candidate_correct, bool)
    if ref.shape != cand.shape or ref.ndim != 1 or not len(ref):
        raise HeteroError(f"flip rates need two equal-length 1-D arrays of per-query results, got {ref.shape} and {cand.shape}")
    return {"negative_flip_rate": float(np.mean(ref & ~cand)), "positive_flip_rate": float(np.mean(~ref & cand))}
