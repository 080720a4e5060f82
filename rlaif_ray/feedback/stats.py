"""General statistics used across evaluation: proportions with Wilson intervals, paired
differences, and the labeler's agreement and position-bias figures (docs/method.md §7)."""
from __future__ import annotations

import math


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (wins may be fractional for ties)."""
    if n == 0:
        return (0.0, 1.0)
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_change(before: dict, after: dict) -> tuple[float, float]:
    """Mean per-key change (after - before) and its 95% half-width from the t distribution
    with n - 1 degrees of freedom (NaN for n < 2)."""
    from scipy import stats

    diffs = [after[k] - before[k] for k in before if k in after]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("nan")
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / n ** 0.5


def paired_t_p(before: dict, after: dict) -> tuple[float, float]:
    """One-sided p-values (rose, fell) of the paired t-test on the per-key change: small
    `rose` means after > before beyond chance. No change at all (or n < 2): (1, 1)."""
    from scipy import stats

    keys = [k for k in before if k in after]
    diffs = [after[k] - before[k] for k in keys]
    if len(diffs) < 2 or all(d == diffs[0] for d in diffs):
        if len(diffs) >= 2 and diffs[0] != 0:  # the same nonzero change everywhere: as sure as it gets
            return (0.0, 1.0) if diffs[0] > 0 else (1.0, 0.0)
        return 1.0, 1.0
    a, b = [after[k] for k in keys], [before[k] for k in keys]
    return (float(stats.ttest_rel(a, b, alternative="greater").pvalue),
            float(stats.ttest_rel(a, b, alternative="less").pvalue))


def mcnemar_p(before: dict, after: dict) -> tuple[float, float]:
    """One-sided exact McNemar p-values (rose, fell) for a paired binary measure (0/1 per
    key): of the keys that changed, how many went 0 -> 1 against 1 -> 0, tested against an
    even split with the exact binomial. 4 of 48 flipping one way, none back: p = 0.0625 each
    side (0.125 two-sided), where a normal interval on the mean change calls it significant."""
    from scipy import stats

    up = sum(1 for k in before if k in after and after[k] > before[k])
    down = sum(1 for k in before if k in after and after[k] < before[k])
    if up + down == 0:
        return 1.0, 1.0
    return (float(stats.binomtest(up, up + down, 0.5, alternative="greater").pvalue),
            float(stats.binomtest(up, up + down, 0.5, alternative="less").pvalue))


def sign_test_p(wins: int, losses: int) -> tuple[float, float]:
    """One-sided exact binomial p-values (above, below one half) of wins against losses,
    ties left out: the win rate's test beside its Wilson interval."""
    from scipy import stats

    if wins + losses == 0:
        return 1.0, 1.0
    return (float(stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue),
            float(stats.binomtest(wins, wins + losses, 0.5, alternative="less").pvalue))


def holm(pvalues: dict, alpha: float = 0.05) -> list:
    """The names whose hypotheses Holm's step-down procedure rejects at family-wise level
    `alpha`: sorted by p, the i-th smallest (from 0) is compared with alpha / (m - i), and
    the first that fails stops the rest."""
    m, out = len(pvalues), []
    for i, (name, p) in enumerate(sorted(pvalues.items(), key=lambda kv: kv[1])):
        if p > alpha / (m - i):
            break
        out.append(name)
    return out


def alignment(p_a: list[float], human: list[str]) -> dict:
    """z_acc = mean 1[argmax P_AI == human]; an exact 0.5 counts half. With a 95% CI."""
    hits = sum(0.5 if p == 0.5 else float((p > 0.5) == (h == "a")) for p, h in zip(p_a, human))
    n = len(human)
    lo, hi = wilson_interval(hits, n)
    return {"n": n, "alignment": hits / n if n else float("nan"), "ci95": [lo, hi]}


def position_bias(p_ab: list[float], p_ba: list[float]) -> dict:
    """Share of pairs where the same slot wins in both orders, and which slot. The inputs are
    P(slot 1 is the answer) as the labeler gave it, before any task inversion."""
    first = sum(1 for x, y in zip(p_ab, p_ba) if x > 0.5 and y > 0.5)
    second = sum(1 for x, y in zip(p_ab, p_ba) if x < 0.5 and y < 0.5)
    n = len(p_ab)
    same = first + second
    return {"same_position_share": same / n if n else float("nan"),
            "of_which_first_slot": first / same if same else float("nan")}
