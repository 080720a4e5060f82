"""How much can the AI feedback be trusted? Score each post's human reference summary and
another post's summary with the same scorer; a useful judge ranks the reference higher."""
from __future__ import annotations

import math

from .data import post_block


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (wins may be fractional for ties)."""
    if n == 0:
        return (0.0, 1.0)
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mismatched_pairs(rows: list[dict], n: int) -> list[tuple[str, str, str]]:
    """(post, its reference summary, the next post's summary) for the first n usable rows."""
    rows = [r for r in rows if r.get("summary")][: n + 1]
    if len(rows) < 2:
        raise ValueError("the signal check needs at least 2 rows with a 'summary' field")
    k = min(n, len(rows) - 1)
    return [(post_block(rows[i]), rows[i]["summary"], rows[i + 1]["summary"]) for i in range(k)]


def signal_from_scores(ref: list[float], other: list[float]) -> dict:
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ref, other))
    n = len(ref)
    lo, hi = wilson_interval(wins, n)
    return {"n": n, "reference_wins": wins / n, "ci95": [lo, hi],
            "mean_reward_reference": sum(ref) / n, "mean_reward_mismatched": sum(other) / n}


def measure_signal(judge, rows: list[dict], n: int) -> dict:
    pairs = mismatched_pairs(rows, n)
    contexts = [p for p, _, _ in pairs]
    ref, _, _ = judge.score(contexts, [r for _, r, _ in pairs])
    other, _, _ = judge.score(contexts, [o for _, _, o in pairs])
    return {"scorer": judge.scorer.name, **signal_from_scores(ref, other)}


def measure_scorers(cfg, names: list[str] | None, n: int):
    """Signal of several scorers on the last rows of the task data (in-process, no Ray)."""
    import torch

    from .data import load_tldr
    from .labeling import Judge
    from .models import load_model, load_tokenizer
    from .scoring import SCORERS

    name = cfg.reward.model or cfg.model.name
    model, tok = load_model(name, cfg.model.dtype), load_tokenizer(name)
    rows = load_tldr(cfg.task.data_path)[-(n + 1):]
    with torch.no_grad():
        for scorer in names or list(SCORERS):
            yield measure_signal(Judge(model, tok, scorer, cfg.reward.batch_size), rows, n)
