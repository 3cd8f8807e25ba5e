"""Peer cross-check: hetero.metrics against pytorch-metric-learning's AccuracyCalculator (2.x API).

mAP@R, R@1 (PML's ``precision_at_1``) and R@10 (a PML metric added by subclassing, fed by PML's
own k-NN) must agree to 1e-6. What PML does, read from its 2.x source, and how the data respect it:

- Similarity: ``CustomKNN(DotProductSimilarity(normalize_embeddings=False))`` ranks by the raw
  inner product with ``torch.topk``, as hetero does (PML's default FaissKNN uses L2, and
  DotProductSimilarity L2-normalises unless told not to).
- Precision: ``get_accuracy`` casts embeddings to float32 (float64 input does not help), as does
  hetero. Embeddings are small integers whose inner products stay below 2^24, so both libraries
  compute every score exactly whatever their BLAS summation order: no float near-ties.
- k: ``k=None`` makes PML retrieve the whole reference set, so R@10 and the top-R of mAP@R are
  always complete (``k="max_bin_count"``, the largest class's count, would cut R@10 short when
  that is under 10).
- Lone queries: a query whose label has no reference item (or, searching a set against itself,
  no item but itself) is dropped from every mean by ``not_lone_query_mask`` -- hetero's
  ``num_queries_without_relevant``. R is the label's reference count, minus 1 with
  ``ref_includes_query``, where the query's own index is removed from its k-NN row.
- Ties: PML has no tie rule; equal scores come in ``torch.topk``'s order (neither index order nor
  label-aware). hetero ranks items of another label first. Plain random integer data still has
  rare exact cross-label ties (13-22 per 300 x 2000 case, moving mAP@R by 2e-7 to 3e-7, so within
  1e-6 only by luck); ``integer_embeddings`` adds a one-hot label code that rules them out while
  same-label ties, which no order can change, remain. Each case checks that its metric is the
  same with ties broken either way. With cross-label ties (coarse data) hetero equals the
  pessimistic brute force and PML lies between the pessimistic and optimistic ones.
"""
from __future__ import annotations

import numpy as np
import pytest

from hetero.metrics import retrieval_metrics

pml = pytest.importorskip(
    "pytorch_metric_learning", reason="pytorch-metric-learning is not installed (pip install -e '.[dev]')"
)
if int(pml.__version__.split(".")[0]) != 2:
    pytest.skip(
        f"peer check uses the pytorch-metric-learning 2.x AccuracyCalculator API, found {pml.__version__}",
        allow_module_level=True,
    )

import torch  # noqa: E402
from pytorch_metric_learning.distances import DotProductSimilarity  # noqa: E402
from pytorch_metric_learning.utils.accuracy_calculator import (  # noqa: E402
    AccuracyCalculator,
    try_getting_not_lone_labels,
)
from pytorch_metric_learning.utils.inference import CustomKNN  # noqa: E402

TOL = 1e-6
METRICS = ("map_at_r", "recall_at_1", "recall_at_10")


class _Calculator(AccuracyCalculator):
    """AccuracyCalculator plus R@10 and the number of evaluated queries, the documented 2.x way."""

    def calculate_recall_at_10(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        knn_labels, query_labels = try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
        if knn_labels is None:
            return float("nan")
        hit = (knn_labels[:, :10] == query_labels[:, None]).any(dim=1)
        return hit.to(torch.float64).mean().item()

    def calculate_num_evaluated(self, not_lone_query_mask, **kwargs):
        return int(not_lone_query_mask.sum())

    def requires_knn(self):
        return super().requires_knn() + ["recall_at_10", "num_evaluated"]


def pml_metrics(q, ql, g=None, gl=None):
    """PML's numbers under hetero's names; ``g=None`` searches ``q`` against itself."""
    calc = _Calculator(
        include=("mean_average_precision_at_r", "precision_at_1", "recall_at_10", "num_evaluated"),
        k=None,
        device=torch.device("cpu"),
        knn_func=CustomKNN(DotProductSimilarity(normalize_embeddings=False)),
    )
    tensors = [None if x is None else torch.from_numpy(np.asarray(x)) for x in (q, ql, g, gl)]
    out = calc.get_accuracy(*tensors)
    return {
        "map_at_r": out["mean_average_precision_at_r"],
        "recall_at_1": out["precision_at_1"],
        "recall_at_10": out["recall_at_10"],
        "num_evaluated": out["num_evaluated"],
    }


def brute_force(q, ql, g, gl, *, exclude_self=False, pessimistic=True):
    """MAP@R, R@1, R@10 from a full sort; ties put irrelevant (or, optimistic, relevant) items first."""
    sims = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
    ql, gl = np.asarray(ql), np.asarray(gl)
    aps, r1, r10 = [], [], []
    for i in range(sims.shape[0]):
        cols = np.flatnonzero(np.arange(sims.shape[1]) != i) if exclude_self else np.arange(sims.shape[1])
        s, rel = sims[i, cols], gl[cols] == ql[i]
        big_r = int(rel.sum())
        if big_r == 0:
            continue
        ranked = rel[np.lexsort((rel if pessimistic else ~rel, -s))]
        hits = np.cumsum(ranked[:big_r])
        aps.append(float((hits / np.arange(1, big_r + 1) * ranked[:big_r]).sum() / big_r))
        r1.append(ranked[0])
        r10.append(ranked[:10].any())
    n = len(aps)
    return {"map_at_r": np.mean(aps), "recall_at_1": np.mean(r1), "recall_at_10": np.mean(r10), "num_evaluated": n}


def tied_pairs(q, g, *, exclude_self=False, cross_label_of=None):
    """Number of (query, item, item) triples with equal scores (optionally: items of different labels)."""
    sims = np.asarray(q, np.int64) @ np.asarray(g, np.int64).T
    if exclude_self:
        np.fill_diagonal(sims, np.iinfo(np.int64).min)  # self is never ranked; its value cannot tie
    total = 0
    for i, row in enumerate(sims):
        if cross_label_of is None:
            _, counts = np.unique(row, return_counts=True)
            total += int((counts * (counts - 1) // 2).sum())
        else:
            ql, gl = cross_label_of
            rel = gl == ql[i]
            total += int(np.isin(row[rel], row[~rel]).sum())
    return total


def integer_embeddings(labels, centres, rng, spread=400):
    """Clustered vectors, exact in float32 and free of cross-label ties (see module docstring).

    The first 16 coordinates are even integers in [-1000, 1000], so their inner products are even
    and below 16 * 1000^2 + 1 < 2^24; then a one-hot label code. An item of the query's label thus
    scores odd and any other item even: two items of different labels can never tie. (The code
    only nudges scores, spaced 2 apart and ~1e6 in size, by 1.)
    """
    noise = rng.integers(-spread, spread + 1, (len(labels), centres.shape[1]))
    main = 2 * np.clip(centres[labels] + noise, -500, 500)
    return np.concatenate([main, np.eye(len(centres))[labels]], axis=1).astype(np.float32)


def random_centres(rng, classes):
    return rng.integers(-250, 251, (classes, 16))


def unequal_labels(rng, n, classes):
    """Labels with geometric class sizes (largest about 15x the smallest for 12 classes)."""
    p = 0.78 ** np.arange(classes)
    return rng.choice(classes, n, p=p / p.sum())


def assert_agree(hetero, peer, *, nq):
    for key in METRICS:
        assert abs(hetero[key] - peer[key]) <= TOL, (key, hetero[key], peer[key])
    assert nq - hetero["num_queries_without_relevant"] == peer["num_evaluated"]
    assert 0.0 < hetero["map_at_r"] < 1.0  # not a degenerate case that any ranking would pass


def assert_tie_order_invariant(q, ql, g, gl, *, exclude_self=False):
    """The metric is the same with ties broken either way, so PML's tie order cannot matter."""
    pess = brute_force(q, ql, g, gl, exclude_self=exclude_self, pessimistic=True)
    opt = brute_force(q, ql, g, gl, exclude_self=exclude_self, pessimistic=False)
    for key in METRICS:
        assert pess[key] == opt[key], key
    return pess


# ---------------------------------------------------------------- random data, no relevant ties

RANDOM_SHAPES = [(0, 300, 2000, 12), (1, 300, 2000, 12), (2, 120, 700, 12), (3, 64, 400, 30)]


@pytest.mark.parametrize("seed,nq,ng,classes", RANDOM_SHAPES)
def test_separate_query_and_gallery(seed, nq, ng, classes):
    rng = np.random.default_rng(seed)
    centres = random_centres(rng, classes)
    gl, ql = unequal_labels(rng, ng, classes), unequal_labels(rng, nq, classes)
    g, q = integer_embeddings(gl, centres, rng), integer_embeddings(ql, centres, rng)
    sizes = np.bincount(gl)
    assert sizes.max() >= 3 * sizes[sizes > 0].min()  # unequal class sizes
    want = assert_tie_order_invariant(q, ql, g, gl)

    got = retrieval_metrics(q, ql, g, gl, ks=(1, 10))
    assert_agree(got, pml_metrics(q, ql, g, gl), nq=nq)
    for key in METRICS:
        assert abs(got[key] - want[key]) <= 1e-12, key


@pytest.mark.parametrize("seed,n,classes", [(10, 1000, 12), (11, 600, 12), (12, 300, 25)])
def test_set_searched_against_itself(seed, n, classes):
    rng = np.random.default_rng(seed)
    centres = random_centres(rng, classes)
    labels = unequal_labels(rng, n, classes)
    x = integer_embeddings(labels, centres, rng)
    assert_tie_order_invariant(x, labels, x, labels, exclude_self=True)

    got = retrieval_metrics(x, labels, x, labels, exclude_self=True)
    assert_agree(got, pml_metrics(x, labels), nq=n)  # PML: reference=None -> ref_includes_query


# ---------------------------------------------------------------- ties


def _with_duplicates(rng, x, labels, copies):
    """Append ``copies`` exact copies of random rows, each with its row's label."""
    pick = rng.choice(len(x), copies, replace=True)
    return np.concatenate([x, x[pick]]), np.concatenate([labels, labels[pick]])


def test_same_label_ties_separate_sets():
    """Duplicated gallery rows (same label) and queries copied from the gallery: ties everywhere,
    but only between items of one label, so every tie order gives the same metric."""
    rng = np.random.default_rng(20)
    centres = random_centres(rng, 12)
    gl = unequal_labels(rng, 1200, 12)
    g, gl = _with_duplicates(rng, integer_embeddings(gl, centres, rng), gl, 800)
    ql = unequal_labels(rng, 150, 12)
    q = integer_embeddings(ql, centres, rng)
    copied = rng.choice(len(g), 50, replace=False)
    q, ql = np.concatenate([q, g[copied]]), np.concatenate([ql, gl[copied]])

    assert tied_pairs(q, g) > 10_000  # ties really exist ...
    assert tied_pairs(q, g, cross_label_of=(ql, gl)) == 0  # ... and none across labels
    assert_tie_order_invariant(q, ql, g, gl)
    assert_agree(retrieval_metrics(q, ql, g, gl), pml_metrics(q, ql, g, gl), nq=len(q))


def test_same_label_ties_set_against_itself():
    """Each item may have exact twins of its label: its self match ties with them at the top."""
    rng = np.random.default_rng(21)
    centres = random_centres(rng, 12)
    labels = unequal_labels(rng, 500, 12)
    x, labels = _with_duplicates(rng, integer_embeddings(labels, centres, rng), labels, 300)

    assert tied_pairs(x, x, exclude_self=True) > 1_000
    assert tied_pairs(x, x, exclude_self=True, cross_label_of=(labels, labels)) == 0
    assert_tie_order_invariant(x, labels, x, labels, exclude_self=True)
    got = retrieval_metrics(x, labels, x, labels, exclude_self=True)
    assert_agree(got, pml_metrics(x, labels), nq=len(x))


@pytest.mark.parametrize("same_set", [False, True])
def test_cross_label_ties_hetero_is_pessimistic(same_set):
    """Vectors with few distinct values tie across labels. PML's order is topk's (undefined), so
    only its bounds are asserted; hetero must equal the pessimistic brute force exactly."""
    rng = np.random.default_rng(22)
    n_g, n_q, classes = 400, 120, 5
    gl = rng.integers(0, classes, n_g)
    g = (np.clip(np.rint(0.6 * rng.standard_normal((n_g, 4)) + (gl[:, None] % 3 - 1)), -2, 2)).astype(np.float32)
    if same_set:
        q, ql = g, gl
    else:
        ql = rng.integers(0, classes, n_q)
        q = (np.clip(np.rint(0.6 * rng.standard_normal((n_q, 4)) + (ql[:, None] % 3 - 1)), -2, 2)).astype(np.float32)

    assert tied_pairs(q, g, exclude_self=same_set, cross_label_of=(ql, gl)) > 1_000
    pess = brute_force(q, ql, g, gl, exclude_self=same_set, pessimistic=True)
    opt = brute_force(q, ql, g, gl, exclude_self=same_set, pessimistic=False)
    got = retrieval_metrics(q, ql, g, gl, exclude_self=same_set)
    peer = pml_metrics(q, ql) if same_set else pml_metrics(q, ql, g, gl)
    for key in METRICS:
        assert pess[key] < opt[key], key  # the ties change this metric
        assert abs(got[key] - pess[key]) <= 1e-12, key
        assert pess[key] - TOL <= peer[key] <= opt[key] + TOL, key
        assert got[key] <= peer[key] + TOL, key
    assert got["num_queries"] - got["num_queries_without_relevant"] == peer["num_evaluated"] == pess["num_evaluated"]


# ---------------------------------------------------------------- one-member and absent classes


def test_one_member_classes_and_query_class_missing_from_gallery():
    """Gallery classes 0-2 have one item each (R = 1); query class 12 has none (left out by both)."""
    rng = np.random.default_rng(30)
    classes = 13
    centres = random_centres(rng, classes)
    gl = 3 + unequal_labels(rng, 1200, 9)
    gl[:3] = [0, 1, 2]
    ql = np.concatenate([rng.choice([0, 1, 2], 40), np.full(25, 12), rng.integers(3, 12, 200)])
    # Tighter classes than elsewhere, so that a lone gallery item is sometimes, not never, ranked first.
    g, q = integer_embeddings(gl, centres, rng, spread=200), integer_embeddings(ql, centres, rng, spread=200)
    assert set(np.bincount(gl, minlength=classes)[[0, 1, 2, 12]]) == {1, 0}

    assert_tie_order_invariant(q, ql, g, gl)
    got = retrieval_metrics(q, ql, g, gl)
    peer = pml_metrics(q, ql, g, gl)
    assert got["num_queries_without_relevant"] == 25
    assert peer["num_evaluated"] == len(ql) - 25
    assert_agree(got, peer, nq=len(ql))
    # The R = 1 queries alone: AP@1 is 1 or 0, so mAP@R equals R@1 on them.
    one = ql <= 2
    sub = retrieval_metrics(q[one], ql[one], g, gl)
    assert sub["map_at_r"] == sub["recall_at_1"] and 0.0 < sub["recall_at_1"] < 1.0
    assert_agree(sub, pml_metrics(q[one], ql[one], g, gl), nq=int(one.sum()))


def test_one_and_two_member_classes_set_against_itself():
    """Searching a set against itself: a one-member class has R = 0 (no item but itself) and is
    left out; a two-member class has R = 1."""
    rng = np.random.default_rng(31)
    centres = random_centres(rng, 14)
    labels = np.concatenate([[0, 1, 2, 3, 3, 4, 4], 5 + unequal_labels(rng, 600, 9)])
    x = integer_embeddings(labels, centres, rng)
    assert_tie_order_invariant(x, labels, x, labels, exclude_self=True)

    got = retrieval_metrics(x, labels, x, labels, exclude_self=True)
    peer = pml_metrics(x, labels)
    assert got["num_queries_without_relevant"] == 3
    assert peer["num_evaluated"] == len(labels) - 3
    assert_agree(got, peer, nq=len(labels))
