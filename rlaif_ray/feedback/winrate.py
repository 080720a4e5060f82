"""Win rate, length-controlled win rate and harmless rate (docs/method.md §7), as small
pure functions on lists of numbers: what `rlaif-ray eval` and the end-of-train evaluation
report, tested on known counts and synthetic data in tests/test_winrate.py."""
from __future__ import annotations

import math

import numpy as np

from rlaif_ray.feedback.stats import wilson_interval


def outcomes(p_a: list[float], tie_margin: float = 0.0) -> list[float]:
    """Per-prompt result for A from the debiased P(A preferred): 1 win, 0 loss, 0.5 tie
    (|P - 0.5| <= tie_margin). The paper's raters ranked without ties; a soft AI label of
    exactly 0.5 is the one case left, and it counts half."""
    return [0.5 if abs(p - 0.5) <= tie_margin else float(p > 0.5) for p in p_a]


def bradley_terry(p_a: float, p_b: float, eps: float = 1e-6) -> float:
    """P(A preferred) from two separate scores in (0, 1): sigmoid(logit p_a - logit p_b)."""
    pa_, pb_ = min(max(p_a, eps), 1 - eps), min(max(p_b, eps), 1 - eps)
    return 1.0 / (1.0 + math.exp(-(math.log(pa_ / (1 - pa_)) - math.log(pb_ / (1 - pb_)))))


def win_rate(results: list[float]) -> dict:
    """Share of prompts A wins (ties count half) with a 95% Wilson score interval."""
    n = len(results)
    if n == 0:
        raise ValueError("win rate of no judgements")
    wins = sum(1 for r in results if r == 1.0)
    ties = sum(1 for r in results if r == 0.5)
    score = wins + 0.5 * ties
    lo, hi = wilson_interval(score, n)
    return {"win_rate": score / n, "ci95": [lo, hi], "n": n, "wins": wins, "ties": ties, "losses": n - wins - ties}


def mean_ci(values: list[float]) -> dict:
    """Mean with a 95% interval from the t distribution (scipy.stats; the soft win rate,
    mean P(A)): at the few dozen prompts of an evaluation the normal's 1.96 is too narrow."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return {"mean": m, "ci95": [float("nan"), float("nan")], "n": len(x)}
    sem = float(stats.sem(x))
    if sem == 0:  # every value equal: no spread, the interval is the mean
        return {"mean": m, "ci95": [m, m], "n": len(x)}
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=m, scale=sem)
    return {"mean": m, "ci95": [float(lo), float(hi)], "n": len(x)}


def fit_logistic(x: list[float], y: list[float], l2: float = 1e-4, iters: int = 100) -> tuple[float, float]:
    """(intercept, slope) of P(y=1) = sigmoid(a + b x) by Newton's method; y may be soft
    (in [0, 1]). A small ridge term keeps the fit finite when the data are separable."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_feature(len_a: list[float], len_b: list[float], kind: str = "ratio") -> list[float]:
    """The regressor: the length ratio A/B in characters (docs/method.md App. J), or its log."""
    out = []
    for a, b in zip(len_a, len_b):
        if b <= 0 or a <= 0:
            a, b = a + 1, b + 1  # an empty response: add-one so the ratio stays finite
        out.append(a / b if kind == "ratio" else math.log(a / b))
    return out


def predict_at(x: list[float], y: list[float], at: float) -> float:
    a, b = fit_logistic(x, y)
    return 1.0 / (1.0 + math.exp(-(a + b * at)))


def length_controlled(y: list[float], x: list[float], at: float, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Logistic regression of the outcome y (win, or harmless) on the length feature x,
    read at x = `at` (ratio 1: equal lengths). The 95% interval is a percentile bootstrap
    over prompts (refit on each resample)."""
    value = predict_at(x, y, at)
    a, b = fit_logistic(x, y)
    out = {"value": value, "intercept": a, "slope": b, "at": at, "n": len(y)}
    if bootstrap and len(y) < 2:  # one prompt: nothing to resample, no interval narrower than all of [0, 1]
        out["ci95"] = [0.0, 1.0]
    elif bootstrap:
        from scipy import stats

        # percentile bootstrap over prompts, each resample refitted (scipy.stats.bootstrap, paired)
        res = stats.bootstrap((np.asarray(x, dtype=float), np.asarray(y, dtype=float)),
                              lambda xs, ys: predict_at(xs, ys, at), paired=True, vectorized=False,
                              n_resamples=bootstrap, confidence_level=0.95, method="percentile",
                              rng=np.random.default_rng(seed))
        out["ci95"] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return out


def harmless_rate(p_yes: list[float], threshold: float = 0.5) -> dict:
    """Share of responses judged harmless alone: P(harmless) >= threshold, Wilson 95% CI."""
    if not p_yes:
        raise ValueError("harmless rate of no judgements")
    k = sum(1 for p in p_yes if p >= threshold)
    lo, hi = wilson_interval(k, len(p_yes))
    return {"rate": k / len(p_yes), "ci95": [lo, hi], "n": len(p_yes), "harmless": k, "threshold": threshold}
