"""AI feedback math and prompts: d-RLAIF 1-10 scores, yes/no probabilities, pairwise
preferences (docs/method.md §1 and §4), and the named scorer variants."""
from __future__ import annotations

import torch

from rlaif_ray.rubrics import _SHOT_POST, Scorer

# ---------------------------------------------------------------- pure math


def two_way_softmax(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """P(a) from the log-probs of two label tokens, softmax over just these two."""
    return torch.sigmoid(logp_a - logp_b)


def score_distribution(logp_digits: torch.Tensor, logp_zero_after_one: torch.Tensor) -> torch.Tensor:
    """P(score = 1..10) from next-token log-probs of "1".."9" [n, 9] and log P("0" | "1") [n].

    The tokenizer writes "10" as "1" then "0": P(10) = P("1") P("0"|"1") and
    P(1) = P("1") (1 - P("0"|"1")). The ten outcomes are renormalised over themselves.
    """
    p = logp_digits.exp()
    p_zero = logp_zero_after_one.exp()
    p_ten = p[:, 0] * p_zero
    p_one = p[:, 0] * (1 - p_zero)
    dist = torch.cat([p_one[:, None], p[:, 1:], p_ten[:, None]], dim=1)
    return dist / dist.sum(dim=1, keepdim=True)


def expected_score(dist: torch.Tensor) -> torch.Tensor:
    """s = sum_i i * P(i) over i = 1..10."""
    scores = torch.arange(1, dist.shape[1] + 1, dtype=dist.dtype, device=dist.device)
    return (dist * scores).sum(dim=1)


def rescale_score(s: torch.Tensor, lo: float = 1.0, hi: float = 10.0) -> torch.Tensor:
    """Linear map of [lo, hi] to [-1, 1] (docs/method.md: (s - 5.5) / 4.5 for 1..10)."""
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return (s - mid) / half


def debias(p_first_ab: torch.Tensor, p_first_ba: torch.Tensor) -> torch.Tensor:
    """P(a preferred) from both orders: in order (a, b) slot 1 is a; in (b, a) slot 2 is a.
    P_final(a) = (P_ab(1) + P_ba(2)) / 2. A labeler that always says "1" gets exactly 0.5."""
    return (p_first_ab + (1 - p_first_ba)) / 2


def pairwise_rewards(p_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards in [-1, 1] for a and b from the debiased preference P(a > b)."""
    return 2 * p_a - 1, 1 - 2 * p_a


# ---------------------------------------------------------------- scorer variants


def _sample_block(context: str, response: str, scorer: Scorer) -> str:
    if scorer.kind == "score10":
        return f"TEXT: {context}\n\nSUMMARY: {response}"
    return f"{context}\n\n{scorer.block}: {response}"


def scorer_prompt(scorer: Scorer, context: str, response: str, tokenizer) -> str:
    """The full prompt after which the label token (digit or Yes/No) is read."""
    def user_text(ctx: str, resp: str) -> str:
        parts = [scorer.preamble] if scorer.preamble else []
        parts.append(_sample_block(ctx, resp, scorer))
        if scorer.question:
            parts.append(scorer.question)
        return "\n\n".join(parts)

    if scorer.chat:
        messages = []
        for shot_summary, answer in scorer.shots:
            messages += [{"role": "user", "content": user_text(_SHOT_POST, shot_summary)},
                         {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": user_text(context, response)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    shots = "".join(f"{user_text(_SHOT_POST, s)}\n{scorer.answer_cue} {a}\n\n" for s, a in scorer.shots)
    cue = scorer.answer_cue
    # "SCORE: " keeps its trailing space (the tokenizer then emits the digit alone);
    # "Answer:" is followed by " Yes"/" No", so both spellings are read.
    return f"{shots}{user_text(context, response)}\n\n{cue}" if cue else f"{shots}{user_text(context, response)}"


def label_token_ids(tokenizer, spellings: list[str]) -> list[int]:
    """Single-token ids of the given spellings; a spelling that is not one token is skipped,
    and none at all is an error (the label could not be read)."""
    ids = []
    for s in spellings:
        toks = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(toks) == 1 and toks[0] not in ids:
            ids.append(toks[0])
    if not ids:
        raise ValueError(f"none of the label spellings {spellings} is a single token for this tokenizer")
    return ids


def split_spellings(tokenizer, one: str, two: str) -> tuple[int | None, list[int]]:
    """For label spellings like " 1"/" 2" that the tokenizer splits into a shared first token
    and a digit: (that first token, [digit id of `one`, digit id of `two`]); (None, []) when
    they are single tokens (read directly) or split some other way."""
    a = tokenizer(one, add_special_tokens=False)["input_ids"]
    b = tokenizer(two, add_special_tokens=False)["input_ids"]
    if len(a) == 2 and len(b) == 2 and a[0] == b[0] and a[1] != b[1]:
        return a[0], [a[1], b[1]]
    return None, []


YES = ["Yes", " Yes", "yes", " yes"]
NO = ["No", " No", "no", " no"]
DIGITS = [str(i) for i in range(1, 10)]
ONE = ["1", " 1"]  # the pairwise labels, with and without a leading space
TWO = ["2", " 2"]

