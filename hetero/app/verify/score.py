"""The one scoring path of `hetero evaluate`, `hetero demo` and `hetero verify`: query embeddings
scored against one labelled cloud gallery.

The paragon (cloud queries) and, optionally, a reference edge model (the torch edge) are scored
once; every other query embedding then gets mAP@R, R@1 and R@10 (exact, :mod:`hetero.metrics`),
top-10 overlap with the paragon and the reference, flips against both, and embedding drift
against the reference (these three by the one comparator, :mod:`hetero.compare`, as export's
fidelity). Works on embeddings only, so the scale benchmark drives it with synthetic vectors.
Memory stays bounded: the exact metrics are chunked over queries so that one chunk of
similarities is at most ``_CHUNK_BYTES``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hetero.compare import cosine_summary, flip_rates, paired_cosine, topk_overlap
from hetero.errors import HeteroError
from hetero.knn import faiss_threads, knn_search
from hetero.metrics import retrieval_metrics

_CHUNK_BYTES = 256 << 20
INDEXES = ("exact", "ivf", "hnsw")


def chunk_rows(num_gallery: int) -> int:
    """Query rows per chunk so that a chunk's similarity block stays within ``_CHUNK_BYTES``."""
    return int(max(16, min(1024, _CHUNK_BYTES // (4 * max(1, num_gallery)))))


class _Index:
    """Top-k search of the cloud gallery: exact faiss by default, or an approximate faiss index."""

    def __init__(self, gallery: np.ndarray, kind: str, params: dict[str, Any] | None = None, seed: int = 0):
        if kind not in INDEXES:
            raise HeteroError(f"unknown index {kind!r}; choose one of {', '.join(INDEXES)}")
        self.kind, self.gallery, self.params = kind, gallery, dict(params or {})
        self.index = None
        if kind == "exact":
            return
        g = np.ascontiguousarray(gallery, dtype=np.float32)
        d = g.shape[1]
        with faiss_threads() as faiss:
            if kind == "hnsw":
                m = int(self.params.setdefault("M", 32))
                self.index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
                self.index.hnsw.efConstruction = int(self.params.setdefault("efConstruction", 80))
                self.index.hnsw.efSearch = int(self.params.setdefault("efSearch", 128))
                self.index.add(g)
            else:
                nlist = int(self.params.setdefault("nlist", max(1, min(len(g) // 39, int(4 * np.sqrt(len(g)))))))
                quantizer = faiss.IndexFlatIP(d)
                self.index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
                rng = np.random.default_rng(seed)
                sample = g[np.sort(rng.choice(len(g), size=min(len(g), 256 * nlist), replace=False))]
                self.index.train(sample)
                self.index.add(g)
                self.index.nprobe = int(self.params.setdefault("nprobe", min(nlist, 16)))
            self._quantizer = self.index if kind == "hnsw" else quantizer  # keep the quantizer alive

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        if self.index is None:
            return knn_search(q, self.gallery, k, chunk_size=4096)[1]  # faiss blocks its own memory

        with faiss_threads():
            return self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)[1]


class Scorer:
    """Scores query embeddings against a cloud gallery; see the module docstring."""

    def __init__(self, gallery: np.ndarray, gallery_labels: Any, query_labels: Any, paragon: np.ndarray, *,
                 k: int = 10, index: str = "exact", index_params: dict[str, Any] | None = None,
                 recall_sample: int = 2000):
        self.gallery = gallery
        self.gl, self.ql = np.asarray(gallery_labels), np.asarray(query_labels)
        if len(self.gl) != len(gallery):
            raise HeteroError(f"{len(self.gl)} gallery labels for {len(gallery)} gallery embeddings")
        self.k = min(k, len(gallery))
        self._index = _Index(gallery, index, index_params)
        self.search_info: dict[str, Any] = {"index": index, "label": "exact" if index == "exact" else "approximate",
                                            "recall_at_10_vs_exact": None, "params": self._index.params}
        self.paragon_metrics = self._metrics(paragon)
        self.paragon_ids = self._index.search(paragon, self.k)
        self.paragon_ok = self._correct(self.paragon_ids)
        if index != "exact":  # recall of the approximate index against exact search, on the paragon queries
            n = min(len(paragon), recall_sample)
            exact = knn_search(paragon[:n], gallery, self.k, chunk_size=4096)[1]
            self.search_info["recall_at_10_vs_exact"] = topk_overlap(self.paragon_ids[:n], exact)
            self.search_info["recall_queries"] = n
        self.reference: np.ndarray | None = None

    def _metrics(self, q: np.ndarray, gallery: np.ndarray | None = None) -> dict[str, float]:
        g = self.gallery if gallery is None else gallery
        m = retrieval_metrics(q, self.ql, g, self.gl, chunk_size=chunk_rows(len(g)))
        return {k: m[k] for k in ("map_at_r", "recall_at_1", "recall_at_10", "num_queries", "num_gallery")}

    def _correct(self, ids: np.ndarray) -> np.ndarray:
        return self.gl[ids[:, 0]] == self.ql

    def set_reference(self, q: np.ndarray, gallery: np.ndarray | None = None) -> dict[str, Any]:
        """The reference edge model (torch): its queries against the cloud gallery, and against its own
        ``gallery`` (edge->edge, for the compatibility criterion) when given."""
        self.reference = np.asarray(q)
        self.reference_ids = self._index.search(q, self.k)
        self.reference_ok = self._correct(self.reference_ids)
        self.edge_to_edge = self._metrics(q, gallery) if gallery is not None else None
        return self.score(q)

    def score_own_gallery(self, q: np.ndarray, gallery: np.ndarray) -> dict[str, Any]:
        """Metrics of queries against a model's own gallery (X->X, homogeneous), with top-1 flips vs the paragon."""
        m: dict[str, Any] = self._metrics(q, gallery)
        ids = knn_search(q, gallery, 1, chunk_size=4096)[1]
        m["flips_vs_paragon"] = _flips(self.paragon_ok, self._correct(ids))
        return m

    def score(self, q: np.ndarray, *, keep: bool = False) -> dict[str, Any]:
        """Metrics of edge queries ``q`` against the cloud gallery (see the module docstring).
        ``keep`` adds the private ``_ids``, ``_ok`` and ``_drift`` arrays for examples and plots."""
        if len(q) != len(self.ql):
            raise HeteroError(f"{len(q)} query embeddings for {len(self.ql)} queries")
        m: dict[str, Any] = self._metrics(q)
        ids = self.reference_ids if q is self.reference else self._index.search(q, self.k)
        ok = self._correct(ids)
        m["gap_to_paragon"] = self.paragon_metrics["map_at_r"] - m["map_at_r"]
        e2e = getattr(self, "edge_to_edge", None)
        m["criterion_met"] = bool(m["map_at_r"] > e2e["map_at_r"]) if e2e else None
        m["top10_overlap_paragon"] = topk_overlap(ids, self.paragon_ids)
        m["flips_vs_paragon"] = _flips(self.paragon_ok, ok)
        if self.reference is not None:
            cos = paired_cosine(self.reference, q)
            m["top10_overlap_torch"] = topk_overlap(ids, self.reference_ids)
            m["flips_vs_torch"] = _flips(self.reference_ok, ok)
            m["drift"] = cosine_summary(cos)
            if keep:
                m["_drift"] = cos
        if keep:
            m["_ids"], m["_ok"] = ids, ok
        return m


def _flips(ref_ok: np.ndarray, ok: np.ndarray) -> dict[str, float]:
    f = flip_rates(ref_ok, ok)
    return {"negative": f["negative_flip_rate"], "positive": f["positive_flip_rate"]}
