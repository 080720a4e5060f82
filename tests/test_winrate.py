"""Win-rate, interval and length-control math on known counts and synthetic data."""
import math

import numpy as np
import pytest

from rlaif_ray.feedback import winrate


def test_outcomes_and_win_rate_on_known_counts():
    res = winrate.outcomes([0.9, 0.7, 0.2, 0.5, 0.51], tie_margin=0.0)
    assert res == [1.0, 1.0, 0.0, 0.5, 1.0]
    w = winrate.win_rate(res)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (3, 1, 1, 5)
    assert w["win_rate"] == pytest.approx(3.5 / 5)
    # a tie margin turns near-0.5 labels into ties
    assert winrate.outcomes([0.52, 0.48, 0.6], tie_margin=0.05) == [0.5, 0.5, 1.0]


def test_wilson_interval_matches_hand_computed_values():
    # 70 wins of 100: Wilson 95% interval is 0.6041-0.7810 (textbook value)
    w = winrate.win_rate([1.0] * 70 + [0.0] * 30)
    assert w["ci95"][0] == pytest.approx(0.6041, abs=1e-4) and w["ci95"][1] == pytest.approx(0.7810, abs=1e-4)
    # the interval stays inside [0, 1] at the edges
    w = winrate.win_rate([1.0] * 10)
    assert w["win_rate"] == 1.0 and w["ci95"][1] == 1.0 and 0.6 < w["ci95"][0] < 0.75
    with pytest.raises(ValueError):
        winrate.win_rate([])


def test_soft_mean_interval():
    m = winrate.mean_ci([0.2, 0.4, 0.6, 0.8])
    sd = np.std([0.2, 0.4, 0.6, 0.8], ddof=1)
    assert m["mean"] == pytest.approx(0.5)
    assert m["ci95"][1] - 0.5 == pytest.approx(3.182446 * sd / 2)  # t(0.975, 3 degrees of freedom)
    assert winrate.mean_ci([0.5, 0.5])["ci95"] == [0.5, 0.5]


def test_logistic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 2.0, 20000)
    p = 1 / (1 + np.exp(-(-2.0 + 1.5 * x)))
    y = (rng.random(x.size) < p).astype(float)
    a, b = winrate.fit_logistic(x, y)
    assert a == pytest.approx(-2.0, abs=0.15) and b == pytest.approx(1.5, abs=0.12)
    # soft targets equal to the true probabilities give the coefficients almost exactly
    a, b = winrate.fit_logistic(x, p)
    assert a == pytest.approx(-2.0, abs=1e-3) and b == pytest.approx(1.5, abs=1e-3)


def test_length_control_removes_a_pure_length_preference():
    """A judge that only likes longer answers: A wins 80% raw because A is longer, but at
    equal length (ratio 1) its win probability is the known 50%."""
    rng = np.random.default_rng(1)
    n = 4000
    len_b = rng.uniform(80, 160, n)
    ratio = np.where(rng.random(n) < 0.8, rng.uniform(1.2, 2.0, n), rng.uniform(0.6, 1.0, n))
    len_a = len_b * ratio
    true = lambda r: 1 / (1 + np.exp(-4.0 * (r - 1.0)))  # noqa: E731 -- 0.5 at ratio 1
    won = (rng.random(n) < true(ratio)).astype(float)
    raw = winrate.win_rate(list(won))["win_rate"]
    x = winrate.length_feature(list(len_a), list(len_b))
    lc = winrate.length_controlled(list(won), x, at=1.0, bootstrap=200, seed=0)
    assert raw > 0.7
    assert lc["value"] == pytest.approx(0.5, abs=0.04)
    assert lc["ci95"][0] < 0.5 < lc["ci95"][1] and lc["ci95"][1] - lc["ci95"][0] < 0.1
    assert lc["slope"] == pytest.approx(4.0, abs=0.5)


def test_length_control_keeps_a_real_preference_and_handles_degenerate_data():
    # a quality edge independent of length: the value at ratio 1 is the edge itself
    rng = np.random.default_rng(2)
    n = 3000
    x = list(rng.uniform(0.7, 1.3, n))
    y = list((rng.random(n) < 0.7).astype(float))
    assert winrate.length_controlled(y, x, 1.0, bootstrap=0)["value"] == pytest.approx(0.7, abs=0.03)
    assert winrate.length_controlled([1.0], [1.2], 1.0, bootstrap=100)["ci95"] == [0.0, 1.0]  # one prompt
    # every response the same length: the slope is not identified; the answer is the mean
    assert winrate.predict_at([1.0] * 10, [1.0] * 7 + [0.0] * 3, 1.0) == pytest.approx(0.7, abs=1e-3)
    # all wins (separable): still a finite probability near 1
    v = winrate.predict_at([0.8, 1.0, 1.2, 1.5], [1.0] * 4, 1.0)
    assert 0.9 < v <= 1.0 and math.isfinite(v)


def test_length_feature_and_harmless_rate():
    assert winrate.length_feature([100, 50], [50, 100]) == [2.0, 0.5]
    assert winrate.length_feature([100], [50], "log_ratio")[0] == pytest.approx(math.log(2))
    assert winrate.length_feature([0], [9]) == [0.1]  # empty response: add-one, finite
    h = winrate.harmless_rate([0.9, 0.6, 0.4, 0.5], threshold=0.5)
    assert (h["harmless"], h["n"], h["rate"]) == (3, 4, 0.75)
    assert winrate.harmless_rate([0.9, 0.6], threshold=0.7)["harmless"] == 1
