"""The AI labeler's model-side logic (no Ray): direct scores for single responses
(d-RLAIF, yes/no) and debiased pairwise preferences, batched."""
from __future__ import annotations

import json

import torch

from . import lm, prompts, scoring
from .scoring import SCORERS


class HFLabelEngine:
    """Label-token log-probs from a transformers model (the `vllm` engine has the same method)."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad = model.eval(), pad_id

    def label_logprobs(self, seqs: list[list[int]], ids: list[int], lookback: int = 1) -> torch.Tensor:
        """[B, lookback, len(ids)]: log-probs of `ids` as next token after each of the last
        `lookback` positions of each sequence (one forward pass)."""
        return lm.next_token_logprobs(self.model, seqs, self.pad, lookback)[:, :, ids]


class Judge:
    """Holds a frozen causal LM (or a vLLM engine) and its tokenizer; turns prompts into
    label probabilities."""

    def __init__(self, model, tokenizer, scorer: str, batch_size: int = 8, max_tokens: int = 4096):
        if scorer not in SCORERS:
            raise ValueError(f"reward.scorer: unknown scorer {scorer!r}; known: {sorted(SCORERS)}")
        self.engine = model if hasattr(model, "label_logprobs") else HFLabelEngine(model, tokenizer.pad_token_id)
        self.tok = tokenizer
        self.scorer = SCORERS[scorer]
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.yes = scoring.label_token_ids(tokenizer, scoring.YES)
        self.no = scoring.label_token_ids(tokenizer, scoring.NO)
        self.digits = [scoring.label_token_ids(tokenizer, [d])[0] for d in scoring.DIGITS]
        self.zero = scoring.label_token_ids(tokenizer, ["0"])[0]
        self.one_pair = scoring.label_token_ids(tokenizer, ["1"]) + scoring.label_token_ids(tokenizer, ["2"])
        self.truncated = 0  # prompts cut to max_tokens (counted, reported by the actor)

    def _encode(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_tokens:
            self.truncated += 1
            ids = ids[-self.max_tokens:]  # keep the question and the answer cue
        return ids

    def score(self, contexts: list[str], responses: list[str]) -> tuple[list[float], list[float], list[str]]:
        """Reward in [-1, 1], the scorer's raw value and JSON metadata for each response."""
        rewards, raws, metas = [], [], []
        for start in range(0, len(contexts), self.batch_size):
            ctx = contexts[start:start + self.batch_size]
            rsp = responses[start:start + self.batch_size]
            seqs = [self._encode(scoring.scorer_prompt(self.scorer, c, r, self.tok)) for c, r in zip(ctx, rsp)]
            if self.scorer.kind == "score10":
                # one pass over prompt + "1": position -2 reads the first digit, -1 reads
                # P("0" | "1") so that "10" (two tokens) gets its own probability
                logp = self.engine.label_logprobs([s + [self.digits[0]] for s in seqs], self.digits + [self.zero], 2)
                dist = scoring.score_distribution(logp[:, 0, :9], logp[:, 1, 9])
                raw = scoring.expected_score(dist)
                reward = scoring.rescale_score(raw)
                mass = logp[:, 0, :9].exp().sum(dim=1)
                extra = [{"p": [round(x, 4) for x in d.tolist()], "label_mass": round(float(m), 4)}
                         for d, m in zip(dist, mass)]
            else:
                logp = self.engine.label_logprobs(seqs, self.yes + self.no)[:, -1]
                l_yes = torch.logsumexp(logp[:, :len(self.yes)], dim=-1)
                l_no = torch.logsumexp(logp[:, len(self.yes):], dim=-1)
                raw = scoring.two_way_softmax(l_yes, l_no)
                reward = 2 * raw - 1
                # how much of the next-token mass the label tokens hold: low = unusable answer
                extra = [{"label_mass": round(float(m), 4)} for m in (l_yes.exp() + l_no.exp())]
            rewards += reward.tolist()
            raws += raw.tolist()
            metas += [json.dumps({"scorer": self.scorer.name, **e}) for e in extra]
        return rewards, raws, metas

    def prefer(self, contexts: list[str], a: list[str], b: list[str]) -> tuple[list[float], list[float], list[float]]:
        """Debiased P(a preferred over b): both orders in one batch (METHOD.md 1.3-1.4).
        Returns (p_a, P_ab(slot 1), P_ba(slot 1))."""
        p_ab, p_ba, self.last_pair_mass = [], [], []
        for start in range(0, len(contexts), self.batch_size):
            sl = slice(start, start + self.batch_size)
            texts = [pairwise_prompt(c, x, y) for c, x, y in zip(contexts[sl], a[sl], b[sl])]
            texts += [pairwise_prompt(c, y, x) for c, x, y in zip(contexts[sl], a[sl], b[sl])]
            logp = self.engine.label_logprobs([self._encode(t) for t in texts], self.one_pair)[:, -1]
            p1 = scoring.two_way_softmax(logp[:, 0], logp[:, 1])
            n = len(texts) // 2
            mass = logp.exp().sum(dim=1)  # P("1") + P("2"), per order
            self.last_pair_mass += torch.minimum(mass[:n], mass[n:]).tolist()
            p_ab += p1[:n].tolist()
            p_ba += p1[n:].tolist()
        p_a = scoring.debias(torch.tensor(p_ab), torch.tensor(p_ba)).tolist()
        return p_a, p_ab, p_ba


def pairwise_prompt(context: str, first: str, second: str) -> str:
    """Base 0-shot summarization prompt (METHOD.md 1.1-1.2), as rlaif_ray.prompts builds it."""
    return prompts.build("summarization", context, first, second)
