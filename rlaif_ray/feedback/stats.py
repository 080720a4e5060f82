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
    """Mean per-key change (after - before) and its 95% half-width (normal approximation)."""
    diffs = [after[k] - before[k] for k in before if k in after]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    return mean, 1.96 * sd / n ** 0.5


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
