"""How far can the AI labeler be trusted? Its agreement with human labels and its position
bias on bundled pair sets or the user's own file of labelled pairs (`eval-labeler`,
docs/method.md §7), and the signal check: does a scorer rank a prompt's own reference above
another prompt's (`train`, `signal`; any task whose data has a reference)."""
from __future__ import annotations

from rlaif_ray.config import ConfigError, PairwiseConfig
from rlaif_ray.data.files import DataError
from rlaif_ray.feedback.labeling import Judge
from rlaif_ray.feedback.pairs import PairFile, exemplar_pairs, file_exemplars, file_pairs, load_pairs
from rlaif_ray.feedback.stats import alignment, position_bias, wilson_interval

# base/detailed x CoT off/on x 0/1/2-shot
GRID = [f"{p}{'+cot' if cot else ''}:{k}" for p in ("base", "detailed") for cot in (False, True) for k in (0, 1, 2)]


def parse_variant(text: str) -> tuple[str, bool, int]:
    """'base', 'detailed:2', 'base+cot', 'detailed+cot:1' -> (preamble, cot, shots)."""
    head, _, k = text.partition(":")
    preamble, _, cot = head.partition("+")
    if preamble not in ("base", "detailed") or cot not in ("", "cot") or (k and not k.isdigit()):
        raise ConfigError(f"eval-labeler --prompts: unknown prompt variant {text!r}: expected PREAMBLE[+cot][:K] with "
                          "PREAMBLE base or detailed and K shots, e.g. base, detailed+cot, base:2, or 'grid'")
    return preamble, cot == "cot", int(k or 0)


def evaluate_labeler(judge: Judge, name: str, variant: str, n: int, seed: int, cot_max_tokens: int,
                     source: PairFile | None = None, task: str | None = None) -> dict:
    """Alignment with the human label (debiased, and from the first order alone) and the
    position-bias figures (read on the labeler's raw answer) for one pair set and variant:
    a bundled set `name` (its own labeler task), or `source`, a user's pair file shown as
    `name` and asked as `task`. Either way k-shot exemplars are the set's last k usable rows,
    which are not evaluated."""
    preamble, cot, k = parse_variant(variant)
    if source is None:
        rows, task = load_pairs(name, n, seed, skip_last=k)
        shots = exemplar_pairs(name, k)
    else:
        if task is None:
            raise ValueError("evaluate_labeler: a pair file needs its labeler task")
        if len(source.rows) <= k:
            raise DataError(f"{source.path}: prompt variant {variant!r} takes {k} exemplars from the last usable "
                            f"rows and needs at least one more to evaluate; the file has {len(source.rows)}")
        rows, shots = file_pairs(source, n, seed, skip_last=k), file_exemplars(source, task, k)
    pw = PairwiseConfig(task=task, preamble=preamble, cot=cot, cot_max_tokens=cot_max_tokens)
    pref = judge.prefer([r["context"] for r in rows], [r["response_a"] for r in rows],
                        [r["response_b"] for r in rows], pw, shots)
    human = [r["human"] for r in rows]
    return {"data": name, "variant": variant, "task": task, **alignment(pref.p_a, human),
            "single_order_alignment": alignment(pref.p_ab, human)["alignment"],
            **position_bias(pref.answer1_ab, pref.answer1_ba)}


def mismatched_pairs(items: list[dict], n: int) -> list[tuple[str, str, str]]:
    """(a prompt's context, its own reference, the next prompt's reference) for the first n
    prompts that have a reference (PromptSet items: any task with a reference column); the
    last one's mismatch is the first one's reference when there are no more."""
    items = [it for it in items if it.get("reference")]
    if len(items) < 2:
        raise ValueError("the signal check needs at least 2 prompts with a reference (a 'reference' column; "
                         "TL;DR: 'summary')")
    k = min(n, len(items))
    nxt = items[:k + 1] if len(items) > k else items[:k] + items[:1]
    return [(nxt[i]["context"], nxt[i]["reference"], nxt[i + 1]["reference"]) for i in range(k)]


def signal_from_scores(ref: list[float], other: list[float]) -> dict:
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ref, other))
    n = len(ref)
    lo, hi = wilson_interval(wins, n)
    return {"n": n, "reference_wins": wins / n, "ci95": [lo, hi],
            "mean_reward_reference": sum(ref) / n, "mean_reward_mismatched": sum(other) / n}


def measure_signal(judge: Judge, items: list[dict], n: int) -> dict:
    """Does the judge's scorer rank a prompt's own reference above another prompt's? (50%:
    no signal.) `items`: prompts with `context` and `reference`."""
    pairs = mismatched_pairs(items, n)
    contexts = [p for p, _, _ in pairs]
    ref, _, _ = judge.score(contexts, [r for _, r, _ in pairs])
    other, _, _ = judge.score(contexts, [o for _, _, o in pairs])
    return {"scorer": judge.scorer.name, **signal_from_scores(ref, other)}
