"""hetero.compare, the one comparator, against brute-force references written with Python loops on
small synthetic arrays, plus its edge cases and errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hetero.compare import EPS, cosine_summary, fidelity, flip_rates, max_abs_diff, paired_cosine, topk_overlap
from hetero.errors import HeteroError


def brute_cosines(a, b):
    out = []
    for x, y in zip(a.tolist(), b.tolist()):
        dot = sum(p * q for p, q in zip(x, y))
        den = math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y))
        out.append(dot / max(den, EPS))
    return out


def brute_p01(values):
    """numpy's default (linear) percentile: the 1% point between sorted neighbours."""
    s = sorted(values)
    pos = 0.01 * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def brute_topk(queries, gallery, k):
    rows = []
    for q in queries.tolist():
        scores = [sum(a * b for a, b in zip(q, g)) for g in gallery.tolist()]
        rows.append(sorted(range(len(scores)), key=lambda j: -scores[j])[:k])
    return np.array(rows)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((57, 12)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    cand = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)
    return ref, cand


def test_cosines_and_summaries_match_brute_force(pair):
    ref, cand = pair
    want = brute_cosines(ref.astype(np.float64), cand.astype(np.float64))
    cos = paired_cosine(ref, cand)
    assert cos.dtype == np.float64 and cos.shape == (57,)
    np.testing.assert_allclose(cos, want, rtol=0, atol=1e-14)
    s = cosine_summary(cos)
    assert s["min"] == pytest.approx(min(want), abs=1e-14)
    assert s["mean"] == pytest.approx(sum(want) / len(want), abs=1e-14)
    assert s["p01"] == pytest.approx(brute_p01(want), abs=1e-14)
    assert s["min"] <= s["p01"] <= s["mean"] <= 1.0
    diff = max(abs(float(x) - float(y)) for r, c in zip(ref, cand) for x, y in zip(r, c))
    assert max_abs_diff(ref, cand) == pytest.approx(diff, abs=1e-15)
    f = fidelity(ref, cand)
    assert list(f) == ["min_cosine", "mean_cosine", "max_abs_diff"]  # the manifest's keys, in its order
    assert f == {"min_cosine": s["min"], "mean_cosine": s["mean"], "max_abs_diff": max_abs_diff(ref, cand)}


def test_cosine_is_scale_free_symmetric_and_safe_on_zero_rows():
    a = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[6.0, 8.0], [-2.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    np.testing.assert_array_equal(paired_cosine(a, b), [1.0, -1.0, 0.0, 0.0])  # a zero row: 0, not NaN
    np.testing.assert_array_equal(paired_cosine(a, b), paired_cosine(b, a))
    assert fidelity(a, a) == {"min_cosine": 0.0, "mean_cosine": 0.75, "max_abs_diff": 0.0}


def test_topk_overlap_matches_brute_force_set_intersection(pair):
    ref, cand = pair
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((80, 12)).astype(np.float64)
    for k in (1, 5, 10):
        a, b = brute_topk(ref.astype(np.float64), gallery, k), brute_topk(cand.astype(np.float64), gallery, k)
        want = sum(len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist())) / (len(a) * k)
        assert topk_overlap(a, b) == pytest.approx(want, abs=1e-15)
        assert topk_overlap(b, a) == pytest.approx(want, abs=1e-15)  # symmetric for distinct ids
        assert topk_overlap(a, a) == 1.0
    # a query's 10 best and 10 worst of 80 items are disjoint: no agreement at all
    assert topk_overlap(brute_topk(ref, gallery, 10), brute_topk(-ref, gallery, 10)) == 0.0


def test_topk_overlap_blocks_and_errors():
    rng = np.random.default_rng(2)
    a = np.stack([rng.permutation(50)[:7] for _ in range(9000)])  # more rows than one comparison block
    b = np.stack([rng.permutation(50)[:7] for _ in range(9000)])
    want = sum(len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist())) / (9000 * 7)
    assert topk_overlap(a, b) == pytest.approx(want, abs=1e-15)
    assert math.isnan(topk_overlap(np.zeros((0, 3), int), np.zeros((0, 3), int)))
    with pytest.raises(HeteroError, match="differ in shape"):
        topk_overlap(a[:, :3], a[:, :4])


def test_flip_rates_match_brute_force():
    rng = np.random.default_rng(3)
    ref, cand = rng.random(301) < 0.7, rng.random(301) < 0.6
    neg = sum(1 for r, c in zip(ref.tolist(), cand.tolist()) if r and not c) / 301
    pos = sum(1 for r, c in zip(ref.tolist(), cand.tolist()) if c and not r) / 301
    assert flip_rates(ref, cand) == {"negative_flip_rate": pytest.approx(neg, abs=1e-15),
                                     "positive_flip_rate": pytest.approx(pos, abs=1e-15)}
    with pytest.raises(HeteroError, match="equal-length"):
        flip_rates(ref, cand[:-1])


@pytest.mark.parametrize("a,b", [(np.ones((3, 4)), np.ones((3, 5))), (np.ones((3, 4)), np.ones((2, 4))),
                                 (np.ones(4), np.ones(4))])
def test_paired_embeddings_must_have_one_shape(a, b):
    with pytest.raises(HeteroError, match="same shape") as e:
        paired_cosine(a, b)
    assert "\n" not in str(e.value)
    with pytest.raises(HeteroError, match="same shape"):
        fidelity(a, b)
