"""AI feedback math and prompts: d-RLAIF 1-10 scores, yes/no probabilities, pairwise
preferences (docs/method.md §1 and §4), and the named scorer variants."""
from __future__ import annotations

import math
import re

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


class AnswerTrie:
    """The token sequences of a set of answers (the whole numbers of a score, each as the
    tokenizer writes it), for reading the probability of each *whole* answer from next-token
    distributions: P(answer) is the product of its tokens' probabilities, less the probability
    of going on to a longer answer ("1" then "0" is 10, not 1): P("1" whole) = P("1") (1 -
    P("0" | "1")), and a tokenizer that writes "10" as one token needs no such correction.

    `deepest`: the prefixes to run (each a sequence prompt + prefix whose last len(prefix) + 1
    positions give the distributions after every shorter prefix too); `tokens`: the token ids
    to read there; `probabilities(nexts)` from {prefix: [B, len(tokens)] log-probs}."""

    def __init__(self, answers: list[list[int]]):
        self.answers = [tuple(a) for a in answers]
        if any(not a for a in self.answers):
            raise ValueError("an answer with no tokens")
        self.prefixes = {a[:j] for a in self.answers for j in range(len(a))}  # strict prefixes, () included
        self.deepest = sorted(p for p in self.prefixes
                              if not any(len(q) > len(p) and q[:len(p)] == p for q in self.prefixes))
        self.tokens = sorted({t for a in self.answers for t in a})
        self._col = {t: i for i, t in enumerate(self.tokens)}
        # a node's continuations toward a longer answer: the tokens that extend it within the trie
        self.children = {p: sorted({a[len(p)] for a in self.answers if len(a) > len(p) and a[:len(p)] == p})
                         for p in self.prefixes}

    def probabilities(self, nexts: dict) -> torch.Tensor:
        """[B, len(answers)] probability of each whole answer."""
        out = []
        for a in self.answers:
            logp = sum(nexts[a[:j]][:, self._col[a[j]]] for j in range(len(a)))
            p = logp.exp()
            going_on = self.children.get(a, [])
            if going_on:
                p = p * (1 - torch.stack([nexts[a][:, self._col[t]].exp() for t in going_on]).sum(0)).clamp(min=0)
            out.append(p)
        return torch.stack(out, dim=1)


def integers_from_top(tops: list[dict[str, float]], lo: int, hi: int) -> tuple[torch.Tensor, int]:
    """The probability of each whole number lo..hi from an endpoint's top log-probs along its
    greedy answer (`tops[j]`: {token: logprob} at position j). A number is read digit token by
    digit token along the greedy path; a number that goes on past a prefix the greedy answer
    did not take is read as that prefix alone (its continuation is not in the answer), and
    counted in the second value."""
    probs = torch.zeros(hi - lo + 1, device="cpu")
    prefix, p_prefix, unread = "", 1.0, 0
    for j, top in enumerate(tops):
        digits = {t.strip(): math.exp(v) for t, v in top.items() if t.strip().isdigit() and (j == 0 or t == t.strip())}
        if prefix and digits:  # the greedy prefix goes on: it is whole only with what is left
            k = int(prefix)
            if lo <= k <= hi:
                probs[k - lo] -= p_prefix * sum(digits.values())
        for d, p in digits.items():
            k = int(prefix + d)
            if lo <= k <= hi:
                probs[k - lo] += p_prefix * p
                if j + 1 == len(tops) or d != max(top, key=top.get).strip():
                    unread += int(any(lo <= int(prefix + d + x) <= hi for x in "0123456789"))
        greedy = max(top, key=top.get)
        if not greedy.strip().isdigit():
            break
        prefix, p_prefix = prefix + greedy.strip(), p_prefix * math.exp(top[greedy])
    return probs.clamp(min=0), unread


_WORD = re.compile(r"[A-Za-z]+|\d+")


def parse_yes_no(text: str) -> int | None:
    """0 for an answer that starts with yes, 1 for no, None otherwise (never guessed)."""
    words = _WORD.findall(text)
    first = words[0].lower() if words else ""
    return 0 if first == "yes" else 1 if first == "no" else None


def parse_choice(text: str) -> int | None:
    """0 for "1", 1 for "2": the first standalone 1 or 2 of the answer; None if there is none."""
    m = re.search(r"(?<!\d)([12])(?!\d)", text)
    return None if m is None else int(m.group(1)) - 1


def parse_integer(text: str, lo: int, hi: int) -> int | None:
    """The index (from lo) of the first whole number of the answer when it is in lo..hi; else None."""
    m = re.search(r"(?<![\d.])-?\d+(?![\d.]*\d)", text)
    if m is None:
        return None
    k = int(m.group(0))
    return k - lo if lo <= k <= hi else None


def pairwise_rewards(p_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards in [-1, 1] for a and b from the debiased preference P(a > b)."""
    return 2 * p_a - 1, 1 - 2 * p_a


# ---------------------------------------------------------------- scorer variants


def _sample_block(context: str, response: str, scorer: Scorer) -> str:
    if scorer.kind == "score10":
        return f"TEXT: {context}\n\nSUMMARY: {response}"
    return f"{context}\n\n{scorer.block}: {response}"


# A judge's prompt: raw text, or chat messages that the label engine renders (a local judge
# with its tokenizer's chat template, an endpoint through its chat API)
Prompt = "str | list[dict]"


def scorer_request(scorer: Scorer, context: str, response: str, fields: dict | None = None):
    """The prompt after which the label (digits, Yes/No) is read: chat messages for a chat
    scorer, else text. `fields`: the row's reference and other columns (a user rubric's template
    may name them; {prompt} is `context`, {response} the response)."""
    def user_text(ctx: str, resp: str) -> str:
        parts = [scorer.preamble] if scorer.preamble else []
        if scorer.template is not None:
            from rlaif_ray.data.tasks import render

            parts.append(render(scorer.template, {**(fields or {}), "prompt": ctx, "response": resp}))
        else:
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
        return messages
    shots = "".join(f"{user_text(_SHOT_POST, s)}\n{scorer.answer_cue} {a}\n\n" for s, a in scorer.shots)
    cue = scorer.answer_cue
    # "SCORE: " keeps its trailing space (the tokenizer then emits the digit alone);
    # "Answer:" is followed by " Yes"/" No", so both spellings are read.
    return f"{shots}{user_text(context, response)}\n\n{cue}" if cue else f"{shots}{user_text(context, response)}"


def as_text(prompt, tokenizer) -> str:
    """A judge prompt as the text a model reads: chat messages in `tokenizer`'s chat template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def scorer_prompt(scorer: Scorer, context: str, response: str, tokenizer, fields: dict | None = None) -> str:
    """The full prompt text after which the label token (digit or Yes/No) is read."""
    return as_text(scorer_request(scorer, context, response, fields), tokenizer)


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

