"""Retrieval metrics: mAP@R and Recall@k of exact inner-product search over a labelled gallery
(the top-k search itself is :func:`hetero.knn.knn_search`).

Used by the verification report to score cloud-gallery x edge-query search. Everything is exact
(no approximate index) and chunked over queries so a 10k x 60k evaluation fits in a few hundred MB.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from hetero.errors import HeteroError
from hetero.knn import as_embeddings, check_pair, check_positive_int, usable_cpus

__all__ = ["retrieval_metrics"]

# Rows per ranking task: keeps each task's temporaries small (~rows * 2R * 12 bytes).
_PIECE_ROWS = 128


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: Any,
    gallery_emb: np.ndarray,
    gallery_labels: Any,
    *,
    exclude_self: bool = False,
    ks: Sequence[int] = (1, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """mAP@R and Recall@k of inner-product search of queries against a labelled gallery.

    - ``map_at_r``: MAP@R of Musgrave et al. 2020, "A Metric Learning Reality Check". For a query
      with R gallery items of its label, MAP@R = (1/R) * sum_{i<=R} P(i) * rel(i), P(i) being the
      precision of the top-i. Computed exactly from the true top-R (R may be thousands).
    - ``recall_at_{k}``: the metric-learning convention, i.e. the fraction of queries whose top-k
      holds at least one item of their label (not the IR "fraction of relevant items found").
    - ``num_queries``, ``num_gallery``; ``num_queries_without_relevant``: queries whose label has
      no gallery item (R = 0). They are left out of every mean, since no result can be right.

    ``exclude_self=True`` means query i is gallery item i: it is removed from its own ranking and
    from its R. Tied scores are ranked pessimistically (items of another label first), so ties
    never flatter a model. Memory is about ``chunk_size * Ng`` floats at a time.
    """
    q = as_embeddings(query_emb, "query")
    g = as_embeddings(gallery_emb, "gallery")
    check_pair(q, g, exclude_self)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    ks = _check_ks(ks)
    q_codes, g_codes = _encode_labels(query_labels, gallery_labels, q.shape[0], g.shape[0], exclude_self)

    ap_sum, hits, num_evaluated = _exact_map_at_r(q, q_codes, g, g_codes, ks, exclude_self, chunk_size)
    if num_evaluated == 0:
        raise HeteroError(
            "no query has a gallery item with its label; check that query and gallery labels use the same classes"
        )
    out: dict[str, float] = {"map_at_r": ap_sum / num_evaluated}
    for k, h in zip(ks, hits):
        out[f"recall_at_{k}"] = h / num_evaluated
    out["num_queries"] = int(q.shape[0])
    out["num_gallery"] = int(g.shape[0])
    out["num_queries_without_relevant"] = int(q.shape[0] - num_evaluated)
    return out


def _check_ks(ks: Any) -> tuple[int, ...]:
    """Validate the cut-offs for Recall@k; duplicates are dropped, order kept."""
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    try:
        values = tuple(ks)
    except TypeError:
        raise HeteroError(f"ks must be a sequence of positive integers such as (1, 10), got {ks!r}") from None
    if not values:
        raise HeteroError("ks is empty; pass at least one cut-off, e.g. ks=(1, 10)")
    return tuple(dict.fromkeys(check_positive_int(k, "each k in ks") for k in values))


def _encode_labels(
    query_labels: Any, gallery_labels: Any, nq: int, ng: int, exclude_self: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Map query and gallery labels to shared integer codes, checking shapes."""
    ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
    for name, labels, n in (("query", ql, nq), ("gallery", gl, ng)):
        if labels.ndim != 1 or labels.shape[0] != n:
            raise HeteroError(
                f"{name} labels have shape {labels.shape} but {name} embeddings have {n} rows; "
                f"pass one label per row as a 1-D array of length {n}"
            )
    mismatch = HeteroError(
        f"query labels ({ql.dtype}) and gallery labels ({gl.dtype}) cannot be compared; use one label type"
    )
    if (ql.dtype.kind in "US") != (gl.dtype.kind in "US"):  # numpy would silently turn 1 into "1"
        raise mismatch
    try:
        _, codes = np.unique(np.concatenate([ql, gl]), return_inverse=True)
    except TypeError:
        raise mismatch from None
    codes = codes.reshape(-1).astype(np.int64)
    q_codes, g_codes = codes[:nq], codes[nq:]
    if exclude_self and not np.array_equal(q_codes, g_codes):
        raise HeteroError(
            "exclude_self=True means query i is gallery item i, but their labels differ; "
            "pass the same labels for both or use exclude_self=False"
        )
    return q_codes, g_codes


def _exact_map_at_r(
    q: np.ndarray,
    q_codes: np.ndarray,
    g: np.ndarray,
    g_codes: np.ndarray,
    ks: tuple[int, ...],
    exclude_self: bool,
    chunk_size: int,
) -> tuple[float, list[int], int]:
    """Sum of AP@R, Recall@k hit counts and number of queries with R > 0.

    The gallery is grouped by label and the queries sorted by label, so within a chunk the
    queries of one label form a run of rows whose relevant items are one block of columns.
    BLAS computes the chunk's similarities; the ranking work is split into row pieces run on a
    thread pool (numpy releases the GIL in sort/partition).
    """
    ng = g.shape[0]
    kmax = max(ks)
    k_arr = np.asarray(ks)

    g_order = np.argsort(g_codes, kind="stable")
    g_sorted = np.ascontiguousarray(g[g_order])
    counts = np.bincount(g_codes, minlength=int(max(q_codes.max(), g_codes.max())) + 1)
    block_start = np.concatenate([[0], np.cumsum(counts)])
    g_pos = np.empty(ng, dtype=np.int64)  # where gallery item j sits in g_sorted
    g_pos[g_order] = np.arange(ng)

    q_order = np.argsort(q_codes, kind="stable")
    buf = np.empty((min(chunk_size, q.shape[0]), ng), dtype=np.float32)
    workers = usable_cpus()
    ap_sum = 0.0
    hits = np.zeros(len(ks), dtype=np.int64)
    num_evaluated = 0

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, q.shape[0], chunk_size):
            rows = q_order[start : start + chunk_size]
            sims = buf[: rows.shape[0]]
            np.matmul(q[rows], g_sorted.T, out=sims)
            codes = q_codes[rows]
            edges = np.flatnonzero(np.diff(codes)) + 1
            piece = max(1, min(_PIECE_ROWS, -(-rows.shape[0] // workers)))
            futures = []
            for a, b in zip(np.r_[0, edges], np.r_[edges, rows.shape[0]]):
                c = int(codes[a])
                lo, hi = int(block_start[c]), int(block_start[c + 1])
                r = (hi - lo) - int(exclude_self)
                if r <= 0:
                    continue
                num_evaluated += int(b - a)
                for p in range(a, b, piece):
                    p_end = min(p + piece, b)
                    self_cols = g_pos[rows[p:p_end]] - lo if exclude_self else None
                    futures.append(pool.submit(_rank_relevant, sims[p:p_end], lo, hi, r, kmax, self_cols))
            for f in futures:  # all done before the next matmul overwrites buf
                ap, first_rank = f.result()
                ap_sum += float(ap.sum())
                hits += (first_rank[:, None] <= k_arr[None, :]).sum(axis=0)
    return ap_sum, hits.tolist(), num_evaluated


def _rank_relevant(
    sims: np.ndarray, lo: int, hi: int, r: int, kmax: int, self_cols: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """AP@R and rank of the best relevant item for queries sharing one label.

    ``sims`` [n, Ng] (overwritten) has the relevant items in columns lo:hi; ``self_cols`` are
    the columns (relative to lo) to ignore when exclude_self is on.

    Sorting whole rows, or asking faiss for k = R, is slow for R in the thousands. The global
    top-T (T = max(R, max k)) lies within the relevant items plus the T best irrelevant ones, so
    only those are ranked: one value partition of the row, then one sort of ~2T integer keys
    that carry the relevance flag in their lowest bit.
    """
    n, ng = sims.shape
    n_rel = hi - lo
    m = min(max(r, kmax), ng - n_rel)
    cand = np.empty((n, n_rel + m), dtype=np.float32)
    cand[:, :n_rel] = sims[:, lo:hi]
    if self_cols is not None:
        cand[np.arange(n), self_cols] = -np.inf
    if m > 0:
        sims[:, lo:hi] = -np.inf
        sims.partition(ng - m, axis=1)
        cand[:, n_rel:] = sims[:, ng - m :]

    keys = _ordered_bits(cand).astype(np.int64) << 1
    keys[:, n_rel:] |= 1  # on equal scores the irrelevant item ranks first (pessimistic ties)
    t = min(max(r, kmax), keys.shape[1])
    if t < keys.shape[1]:
        keys.partition(keys.shape[1] - t, axis=1)
    top = np.sort(keys[:, -t:], axis=1)[:, ::-1]  # best first
    relevant = (top & 1) == 0

    # MAP@R = (1/R) sum_{i<=R} P(i) rel(i), with P(i) = (#relevant in top i) / i.
    rel_r = relevant[:, :r]
    precision = np.cumsum(rel_r, axis=1) / np.arange(1, r + 1)
    ap = (precision * rel_r).sum(axis=1) / r
    # No relevant item in the top t means rank > t >= max k (t < max k only if t spans all items).
    first_rank = np.where(relevant.any(axis=1), relevant.argmax(axis=1) + 1, t + 1)
    return ap, first_rank


def _ordered_bits(x: np.ndarray) -> np.ndarray:
    """int32 with the same order as the float32 ``x`` (IEEE bits, negatives' magnitude flipped).

    Exact, unlike adding float offsets; -0.0 is first turned into +0.0 so the two tie.
    """
    bits = (x + np.float32(0.0)).view(np.int32)
    bits ^= (bits >> 31) & np.int32(0x7FFFFFFF)
    return bits
