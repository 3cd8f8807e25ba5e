"""Flip metrics (Yan et al. 2021, "Positive-Congruent Training"): how a model swap changes which
individual queries are answered right, not just the average.

A *negative flip* is a query whose top-1 result is right for the reference (the paragon: cloud
query vs cloud gallery) and wrong for the candidate (edge query vs cloud gallery); a *positive
flip* is the reverse. Both are fractions of all queries. The rates are the comparator's
(:func:`hetero.compare.flip_rates`); this module adds the search that finds each query's top-1.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hetero.compare import flip_rates
from hetero.errors import HeteroError
from hetero.knn import knn_search

__all__ = ["flip_rates", "top1_correct"]


def top1_correct(query_emb: np.ndarray, query_labels: Any, gallery_emb: np.ndarray, gallery_labels: Any,
                 *, exclude_self: bool = False) -> np.ndarray:
    """Boolean per query: does the nearest gallery item (inner product) carry the query's label?"""
    ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
    if len(ql) != len(query_emb) or len(gl) != len(gallery_emb):
        raise HeteroError("labels and embeddings differ in length; pass one label per embedding row")
    _, idx = knn_search(query_emb, gallery_emb, 1, exclude_self=exclude_self)
    return gl[idx[:, 0]] == ql
