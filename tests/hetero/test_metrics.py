"""hetero.metrics and hetero.knn against a brute-force reference, hand-computed cases and every validation error.

Random cases use integer vectors in [-1000, 1000]^d with d <= 16: every inner product is an
integer below 2^24, so float32 computes it exactly whatever the BLAS summation order, and the
comparison with the float64 reference is exact rather than "up to near-ties". Real ties are
rare there; a separate tie-heavy case checks the documented rule (irrelevant items first).
"""
from __future__ import annotations

import numpy as np
import pytest

from hetero.errors import HeteroError
from hetero.knn import knn_search
from hetero.metrics import retrieval_metrics

# ---------------------------------------------------------------- brute-force reference


def reference_metrics(q, ql, g, gl, *, exclude_self=False, ks=(1, 10)):
    """Direct implementation of MAP@R and Recall@k from the full similarity matrix."""
    sims = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
    ql, gl = np.asarray(ql), np.asarray(gl)
    aps, hits, without = [], {k: 0 for k in ks}, 0
    for i in range(sims.shape[0]):
        cols = np.arange(sims.shape[1])
        if exclude_self:
            cols = cols[cols != i]
        s, rel = sims[i, cols], gl[cols] == ql[i]
        big_r = int(rel.sum())
        if big_r == 0:
            without += 1
            continue
        # Descending score, ties: irrelevant first. Equals np.argsort(-s, kind="stable") without ties.
        ranked = rel[np.lexsort((rel, -s))]
        aps.append(sum(ranked[:j].sum() / j for j in range(1, big_r + 1) if ranked[j - 1]) / big_r)
        for k in ks:
            hits[k] += bool(ranked[:k].any())
    n = len(aps)
    out = {"map_at_r": float(np.mean(aps))}
    out.update({f"recall_at_{k}": hits[k] / n for k in ks})
    out.update(num_queries=sims.shape[0], num_gallery=sims.shape[1], num_queries_without_relevant=without)
    return out


def integer_embeddings(labels, centres, rng, spread=500):
    """Clustered integer-valued vectors (exact float32 inner products, see module docstring)."""
    noise = rng.integers(-spread, spread + 1, (len(labels), centres.shape[1]))
    return np.clip(centres[labels] + noise, -1000, 1000).astype(np.float32)


def make_case(rng, nq, ng, classes, dim=8, gallery_p=None, query_classes=None, same_set=False):
    centres = rng.integers(-500, 501, (classes, dim))
    gl = rng.choice(classes, ng, p=gallery_p)
    g = integer_embeddings(gl, centres, rng)
    if same_set:
        return g, gl, g, gl
    ql = rng.choice(query_classes if query_classes is not None else classes, nq)
    return integer_embeddings(ql, centres, rng), ql, g, gl


def assert_same_metrics(got, want):
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


# ---------------------------------------------------------------- retrieval_metrics vs reference

CASES = {
    "balanced": {"nq": 60, "ng": 150, "classes": 4},
    "many_classes": {"nq": 80, "ng": 200, "classes": 40, "dim": 16},
    "unbalanced_with_singleton": {
        "nq": 70,
        "ng": 120,
        "classes": 5,
        "gallery_p": [0.1, 0.5, 0.25, 0.1, 0.05],
        "ks": (1, 2, 5, 25, 500),
        "singleton": True,
    },
    "query_class_missing_from_gallery": {"nq": 50, "ng": 90, "classes": 4, "gallery_p": [0.5, 0.3, 0.2, 0.0]},
    "exclude_self": {"nq": 0, "ng": 110, "classes": 6, "same_set": True, "exclude_self": True},
    "exclude_self_singleton": {
        "nq": 0, "ng": 60, "classes": 3, "same_set": True, "exclude_self": True, "singleton": True
    },
    "same_set_keep_self": {"nq": 0, "ng": 70, "classes": 3, "same_set": True},
}


@pytest.mark.parametrize("chunk_size", [1024, 7, 1])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name, chunk_size):
    spec = dict(CASES[name])
    ks = spec.pop("ks", (1, 10))
    exclude_self = spec.pop("exclude_self", False)
    singleton = spec.pop("singleton", False)
    rng = np.random.default_rng(sorted(CASES).index(name))
    q, ql, g, gl = make_case(rng, **spec)
    if singleton:  # one class with exactly one gallery item (and unbalanced classes overall)
        gl = gl.copy()
        gl[gl == 0] = 1
        gl[0] = 0
        if spec.get("same_set"):
            ql = gl
        else:
            ql = np.asarray(ql).copy()
            ql[:5] = 0
    want = reference_metrics(q, ql, g, gl, exclude_self=exclude_self, ks=ks)
    got = retrieval_metrics(q, ql, g, gl, exclude_self=exclude_self, ks=ks, chunk_size=chunk_size)
    assert_same_metrics(got, want)
    assert 0.0 < got["map_at_r"] < 1.0


def test_ties_are_ranked_pessimistically_like_the_reference():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, 90)
    x = rng.integers(-1, 2, (90, 3)).astype(np.float32)  # few distinct vectors: ties everywhere
    for exclude_self in (False, True):
        want = reference_metrics(x, labels, x, labels, exclude_self=exclude_self, ks=(1, 3, 10))
        got = retrieval_metrics(x, labels, x, labels, exclude_self=exclude_self, ks=(1, 3, 10), chunk_size=16)
        assert_same_metrics(got, want)


def test_large_classes_and_r_beyond_max_k():
    """R in the hundreds (top-R well past max k), query count not a multiple of the chunk."""
    rng = np.random.default_rng(3)
    q, ql, g, gl = make_case(rng, nq=37, ng=1200, classes=3, dim=16)
    want = reference_metrics(q, ql, g, gl, ks=(1, 4))
    assert_same_metrics(retrieval_metrics(q, ql, g, gl, ks=(1, 4), chunk_size=10), want)


def test_continuous_unit_vectors_close_to_reference():
    """Float data: equal to the float64 reference up to float32 rounding of near-ties."""
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((5, 32))
    gl, ql = rng.integers(0, 5, 400), rng.integers(0, 5, 100)
    g = centres[gl] + 1.5 * rng.standard_normal((400, 32))
    q = centres[ql] + 1.5 * rng.standard_normal((100, 32))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    want = reference_metrics(q, ql, g, gl)
    got = retrieval_metrics(q, ql, g, gl, chunk_size=33)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=0.02), key
    assert 0.1 < got["map_at_r"] < 0.9


def test_output_types_and_input_casting():
    rng = np.random.default_rng(5)
    q, ql, g, gl = make_case(rng, nq=20, ng=50, classes=3)
    base = retrieval_metrics(q, ql, g, gl, ks=(1, 5, 10))
    assert isinstance(base["map_at_r"], float) and isinstance(base["recall_at_5"], float)
    assert isinstance(base["num_queries"], int) and base["num_queries"] == 20 and base["num_gallery"] == 50
    assert base["num_queries_without_relevant"] == 0
    # float64, Fortran order, strided views, int arrays and label lists give the same numbers.
    assert retrieval_metrics(q.astype(np.float64), list(ql), np.asfortranarray(g), gl, ks=(1, 5, 10)) == base
    assert retrieval_metrics(np.repeat(q, 2, axis=0)[::2], ql, g.astype(np.int32), gl, ks=(1, 5, 10)) == base
    # String labels work and mean the same thing.
    names = np.array(["shirt", "shoe", "bag"])
    assert retrieval_metrics(q, names[ql], g, names[gl], ks=(1, 5, 10)) == base


# ---------------------------------------------------------------- hand-computed cases

# Unit vectors in 2-D: a at (1, 0) and (.8, .6); b at (.6, .8) and (-.6, .8).
SMALL = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-0.6, 0.8]], dtype=np.float32)
SMALL_LABELS = np.array(["a", "a", "b", "b"])


def test_hand_case_queries_vs_gallery():
    gallery = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [-1, 0]], dtype=np.float32)
    gl = np.array([0, 1, 0, 1, 1])
    query = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    ql = np.array([0, 1, 1])
    # q0: a b a b b, R=2 -> (1)/2 = 1/2
    # q1: b(1) a(.8) b(.6) {a,b}(0), R=3 -> (1 + 2/3)/3 = 5/9
    # q2: a(1) b(.96) b(.8) a(.6) b, R=3 -> (1/2 + 2/3)/3 = 7/18
    got = retrieval_metrics(query, ql, gallery, gl, ks=(1, 2))
    assert got["map_at_r"] == pytest.approx(13 / 27, abs=1e-12)
    assert got["recall_at_1"] == pytest.approx(2 / 3) and got["recall_at_2"] == 1.0


def test_hand_case_exclude_self():
    # Without self (R=1 each): (1,0)->a first; (.8,.6)->b(.96) before a; (.6,.8)->a, a, then b;
    # (-.6,.8)->b(.28) first. MAP@R = (1 + 0 + 0 + 1)/4.
    got = retrieval_metrics(SMALL, SMALL_LABELS, SMALL, SMALL_LABELS, exclude_self=True, ks=(1, 2, 3))
    assert got["map_at_r"] == pytest.approx(0.5, abs=1e-12)
    assert (got["recall_at_1"], got["recall_at_2"], got["recall_at_3"]) == (0.5, 0.75, 1.0)
    # Keeping self (R=2, self first): 1, 1/2, 1/2, 1 -> 3/4.
    kept = retrieval_metrics(SMALL, SMALL_LABELS, SMALL, SMALL_LABELS, ks=(1,))
    assert kept["map_at_r"] == pytest.approx(0.75, abs=1e-12) and kept["recall_at_1"] == 1.0


def test_hand_case_tie_ranks_irrelevant_first():
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    got = retrieval_metrics(query, ["a"], gallery, ["b", "a", "b"], ks=(1, 2))
    assert got["map_at_r"] == 0.0 and got["recall_at_1"] == 0.0 and got["recall_at_2"] == 1.0


def test_queries_without_relevant_items_are_counted_and_excluded():
    got = retrieval_metrics(SMALL, ["a", "a", "b", "zebra"], SMALL, SMALL_LABELS, ks=(1,))
    assert got["num_queries_without_relevant"] == 1 and got["num_queries"] == 4
    assert got["map_at_r"] == pytest.approx((1 + 0.5 + 0.5) / 3, abs=1e-12)


# ---------------------------------------------------------------- k-NN search vs brute force


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("k,chunk_size", [(1, 1024), (5, 7), (20, 1)])
def test_knn_search_matches_brute_force(k, chunk_size, exclude_self):
    rng = np.random.default_rng(k)
    q, _, g, _ = make_case(rng, nq=40, ng=60, classes=3, dim=16, same_set=exclude_self)
    scores, idx = knn_search(q, g, k, exclude_self=exclude_self, chunk_size=chunk_size)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    assert scores.shape == idx.shape == (q.shape[0], k)

    sims = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(scores, np.take_along_axis(sims, order, axis=1))
    np.testing.assert_array_equal(np.take_along_axis(sims, idx, axis=1), scores)  # indices fit scores
    assert all(len(set(row)) == k for row in idx.tolist())
    if exclude_self:
        assert not (idx == np.arange(q.shape[0])[:, None]).any()
    # Rows without tied scores among the top k + 1 must give exactly the argsort order.
    top = np.take_along_axis(sims, np.argsort(-sims, axis=1, kind="stable")[:, : k + 1], axis=1)
    no_ties = (np.diff(top, axis=1) != 0).all(axis=1)
    assert no_ties.mean() > 0.8
    np.testing.assert_array_equal(idx[no_ties], order[no_ties])


def test_knn_search_exclude_self_drops_last_when_self_is_not_found():
    # Item 0 is not its own best match (item 1 and 2 score higher), so with k=1 it is not among
    # the k + 1 = 2 hits and the last one is dropped instead.
    x = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    scores, idx = knn_search(x, x, 1, exclude_self=True)
    assert idx[:, 0].tolist() == [1, 2, 1]
    assert scores[:, 0].tolist() == [3.0, 6.0, 6.0]


def test_knn_search_continuous_data_and_thread_setting_restored():
    import faiss

    rng = np.random.default_rng(2)
    q, g = rng.standard_normal((30, 24)), rng.standard_normal((300, 24))
    before = faiss.omp_get_max_threads()
    scores, idx = knn_search(q, g, 10, chunk_size=8)
    assert faiss.omp_get_max_threads() == before
    sims = q @ g.T
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :10], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(sims, idx, axis=1), scores, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- validation errors

Q = np.ones((4, 3), np.float32)
L = np.array([0, 1, 0, 1])


def _with(**changes):
    args = {"query_emb": Q, "query_labels": L, "gallery_emb": Q, "gallery_labels": L}
    kwargs = {k: changes.pop(k) for k in ("exclude_self", "ks", "chunk_size") if k in changes}
    args.update(changes)
    return args, kwargs


def _nan_row():
    x = Q.copy()
    x[2, 1] = np.nan
    return x


def _inf_row():
    x = Q.copy()
    x[0, 0] = np.inf
    return x


METRIC_ERRORS = {
    "query_1d": (_with(query_emb=np.ones(3)), "2-D"),
    "gallery_3d": (_with(gallery_emb=np.ones((4, 3, 1))), "2-D"),
    "empty_gallery": (_with(gallery_emb=np.ones((0, 3)), gallery_labels=[]), "empty"),
    "string_embeddings": (_with(query_emb=np.full((4, 3), "x")), "dtype"),
    "dim_mismatch": (_with(gallery_emb=np.ones((4, 5))), "dim"),
    "query_labels_short": (_with(query_labels=L[:3]), "query labels"),
    "gallery_labels_long": (_with(gallery_labels=np.r_[L, 0]), "gallery labels"),
    "labels_2d": (_with(query_labels=L[:, None]), "1-D"),
    "nan_query": (_with(query_emb=_nan_row()), "NaN"),
    "inf_gallery": (_with(gallery_emb=_inf_row()), "NaN or Inf"),
    "float64_overflow": (_with(gallery_emb=np.full((4, 3), 1e300)), "NaN or Inf"),
    "norm_overflow": (_with(query_emb=np.full((4, 3), 1e20), gallery_emb=np.full((4, 3), 1e20)), "overflow"),
    "exclude_self_sizes": (
        _with(gallery_emb=np.ones((5, 3)), gallery_labels=np.r_[L, 0], exclude_self=True),
        "exclude_self",
    ),
    "exclude_self_labels": (_with(gallery_labels=L[::-1], exclude_self=True), "labels differ"),
    "ks_zero": (_with(ks=(1, 0)), "positive integer"),
    "ks_empty": (_with(ks=()), "ks is empty"),
    "ks_float": (_with(ks=(1.5,)), "positive integer"),
    "chunk_size_zero": (_with(chunk_size=0), "chunk_size"),
    "no_relevant_at_all": (_with(query_labels=[7, 7, 8, 8]), "no query"),
    "mixed_label_types": (_with(query_labels=[0, 1, 0, 1], gallery_labels=["a", "b", "a", "b"]), "cannot be compared"),
}


@pytest.mark.parametrize("name", sorted(METRIC_ERRORS))
def test_retrieval_metrics_errors(name):
    (args, kwargs), fragment = METRIC_ERRORS[name]
    with pytest.raises(HeteroError) as info:
        retrieval_metrics(**args, **kwargs)
    message = str(info.value)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize(
    "args,kwargs,fragment",
    [
        ((Q, Q, 0), {}, "k must be a positive integer"),
        ((Q, Q, 5), {}, "k=5"),
        ((Q, Q, 4), {"exclude_self": True}, "self excluded"),
        ((Q, np.ones((4, 2)), 1), {}, "dim"),
        ((Q[:, :, None], Q, 1), {}, "2-D"),
        ((_nan_row(), Q, 1), {}, "NaN"),
        ((Q, Q[:3], 1), {"exclude_self": True}, "exclude_self"),
        ((Q, Q, 1), {"chunk_size": -2}, "chunk_size"),
    ],
)
def test_knn_search_errors(args, kwargs, fragment):
    with pytest.raises(HeteroError) as info:
        knn_search(*args, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)
