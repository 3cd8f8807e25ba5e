import numpy as np
import pytest

from hetero.errors import HeteroError
from hetero.flips import flip_rates, top1_correct


def brute_top1(q, ql, g, gl):
    return gl[np.argmax(q @ g.T, axis=1)] == ql


def test_top1_and_flips_match_brute_force():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((300, 8)).astype(np.float32)
    gl = rng.integers(0, 5, 300)
    ql = rng.integers(0, 5, 120)
    ref_q = g[rng.integers(0, 300, 120)] + 0.3 * rng.standard_normal((120, 8)).astype(np.float32)
    new_q = ref_q + 0.8 * rng.standard_normal((120, 8)).astype(np.float32)
    ref, new = top1_correct(ref_q, ql, g, gl), top1_correct(new_q, ql, g, gl)
    np.testing.assert_array_equal(ref, brute_top1(ref_q, ql, g, gl))
    np.testing.assert_array_equal(new, brute_top1(new_q, ql, g, gl))
    f = flip_rates(ref, new)
    assert f["negative_flip_rate"] == pytest.approx(sum(r and not n for r, n in zip(ref, new)) / 120)
    assert f["positive_flip_rate"] == pytest.approx(sum(n and not r for r, n in zip(ref, new)) / 120)
    assert 0 < f["negative_flip_rate"] < 1


def test_flip_rates_by_hand():
    ref = np.array([True, True, False, False, True])
    new = np.array([True, False, True, False, False])
    assert flip_rates(ref, new) == {"negative_flip_rate": 0.4, "positive_flip_rate": 0.2}
    assert flip_rates(ref, ref) == {"negative_flip_rate": 0.0, "positive_flip_rate": 0.0}


def test_exclude_self_and_errors():
    g = np.array([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.3, 0.9]], dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    labels = np.array([0, 1, 1, 1])
    assert top1_correct(g, labels, g, labels).all()  # each finds itself
    # without self: 0 -> 1 (wrong), 1 -> 0 (wrong), 2 -> 3 (right), 3 -> 2 (right)
    assert top1_correct(g, labels, g, labels, exclude_self=True).tolist() == [False, False, True, True]
    with pytest.raises(HeteroError, match="equal-length"):
        flip_rates(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(HeteroError, match="one label per"):
        top1_correct(g, labels[:3], g, labels)
