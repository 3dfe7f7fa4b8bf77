"""Validators against hand-computed values, and selection from them (adapt/validators.py, adapt/selection.py)."""

import math

import numpy as np
import pytest

from adapt import selection as S
from adapt import validators as V


def H(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_entropy_and_information_maximisation_by_hand():
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert V.neg_entropy(p) == pytest.approx(-(H([0.9, 0.1]) + H([0.2, 0.8])) / 2)
    assert V.information_maximisation(p) == pytest.approx(H([0.55, 0.45]) - (H([0.9, 0.1]) + H([0.2, 0.8])) / 2)
    # confident and diverse beats confident and collapsed
    assert V.information_maximisation(np.eye(2)) == pytest.approx(math.log(2))
    assert V.information_maximisation(np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.0, abs=1e-9)


def test_soft_neighbourhood_density_by_hand():
    # three points: two identical, one orthogonal; similarities after L2 normalisation are 1 and 0
    p = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = V.SND_TEMPERATURE
    a = np.exp(1 / t) / (np.exp(1 / t) + 1.0)  # row 0: neighbour 1 (sim 1), neighbour 2 (sim 0)
    row01 = H([a, 1 - a])
    row2 = H([0.5, 0.5])  # row 2: both neighbours at similarity 0
    assert V.soft_neighbourhood_density(p) == pytest.approx((2 * row01 + row2) / 3)


def test_deep_embedded_validation_by_hand(monkeypatch):
    """With the domain classifier's probabilities fixed, DEV is eqs. 6-8 of You et al. on the given numbers."""
    import sklearn.linear_model as lm

    class Fixed:
        def __init__(self, **kw):
            pass

        def fit(self, x, d):
            return self

        def predict_proba(self, x):
            return np.array([[0.5, 0.5], [0.8, 0.2], [0.25, 0.75]])

    monkeypatch.setattr(lm, "LogisticRegression", Fixed)
    f_train, f_target = np.zeros((4, 2)), np.ones((2, 2))
    p_val = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    y_val = np.array([0, 0, 0])
    w = np.array([1.0, 0.25, 3.0]) * (4 / 2)
    loss = -np.log([0.5, 0.9, 0.2])
    L = w * loss
    eta = -np.cov(L, w, ddof=1)[0, 1] / w.var(ddof=1)
    want = -(L.mean() + eta * w.mean() - eta)
    assert V.deep_embedded_validation(f_train, f_target, np.zeros((3, 2)), p_val, y_val) == pytest.approx(want)


def test_scores_without_and_with_source_validation():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), 20)
    assert set(V.scores(p)) == {"entropy", "im", "snd"}
    val = (rng.dirichlet(np.ones(4), 10), np.arange(10) % 4, rng.standard_normal((10, 3)))
    s = V.scores(p, val, rng.standard_normal((30, 3)), rng.standard_normal((20, 3)))
    assert set(s) == {"entropy", "im", "snd", "source_val", "dev"}
    assert s["source_val"] == pytest.approx(V.accuracy(val[0], val[1]))


def test_spearman_by_hand():
    assert S.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert S.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3)
    want = np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    assert S.spearman([1, 2, 2, 3], [5, 6, 7, 8]) == pytest.approx(want)
    assert S.spearman([1, 2], [3, 4]) is None and S.spearman([1, 1, 1], [1, 2, 3]) is None


def run(tag, seed, val, acc, top1):
    return {"method": "dann", "source": "K1", "target": "K2", "tag": tag, "seed": seed, "eval_steps": [10, 20, 30],
            "target_top1_per_eval": acc, "target_top1": top1, "validators_per_eval": {"im": val}}


def test_selection_picks_checkpoint_then_grid_point_and_compares_with_the_oracle():
    rows = [run("a", 0, [0.1, 0.5, 0.2], [40.0, 60.0, 50.0], 50.0),
            run("a", 1, [0.3, 0.2, 0.1], [70.0, 30.0, 30.0], 45.0),
            run("b", 0, [0.2, 0.3, 0.9], [20.0, 80.0, 35.0], 55.0),
            run("b", 1, [0.1, 0.1, 0.2], [10.0, 10.0, 90.0], 52.0)]
    (sel,) = S.select(rows, ["im"])
    # a: checkpoints 20 and 10 (values 0.5, 0.3: mean 0.4); b: 30 and 30 (0.9, 0.2: mean 0.55) -> b
    assert sel.tag == "b" and sel.steps == [30, 30] and sel.selected == pytest.approx((35.0 + 90.0) / 2)
    # the oracle: a's best checkpoints 60 and 70 (65), b's 80 and 90 (85) -> 85
    assert sel.oracle == pytest.approx(85.0) and sel.gap == pytest.approx(85.0 - 62.5)
    assert sel.last9 == pytest.approx((55.0 + 52.0) / 2)  # the best grid point by MM-SADA's last-9 figure
    xs = [0.1, 0.5, 0.2, 0.3, 0.2, 0.1, 0.2, 0.3, 0.9, 0.1, 0.1, 0.2]
    ys = [40, 60, 50, 70, 30, 30, 20, 80, 35, 10, 10, 90]
    assert sel.rho == pytest.approx(S.spearman(xs, ys))
    assert S.available(rows) == ["im"]


def test_held_out_source_clips_are_never_drawn_for_training():
    from adapt.data import EpochSampler
    rows = np.array([1, 3, 4, 8, 9])
    s = EpochSampler(10, np.random.default_rng(0), rows)
    drawn = np.concatenate([s.draw(2) for _ in range(10)])
    assert set(drawn.tolist()) == set(rows.tolist())
    assert len(set(drawn[:4].tolist())) == 4  # an epoch draws without replacement
    # without rows the sampler is the plain one, draw for draw
    a, b = EpochSampler(7, np.random.default_rng(3)), EpochSampler(7, np.random.default_rng(3), None)
    assert all(np.array_equal(a.draw(3), b.draw(3)) for _ in range(5))
