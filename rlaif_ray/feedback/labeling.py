"""The AI labeler's model-side logic (no Ray): direct scores for single responses
(d-RLAIF, yes/no) and debiased pairwise preferences, batched (docs/method.md §1, §4).

A `Judge` reads labels through a label engine, one of two:
- `LocalLabels`: a local model (HF or vLLM engine); prompts are tokenized here and the
  log-probabilities of the label tokens read directly. Pairs and direct scores.
- `EndpointLabels`: an OpenAI-compatible completions endpoint (text in, top log-probs out).
  Pairs only: a direct score needs the whole digit distribution, which top-k does not give.
Both offer `pair(texts)` (log P("1"), log P("2")), `complete(...)` (CoT rationales),
`counters()` and `direct_scores`; where that is True (`LocalLabels`) also `yes_no` and
`digits`, which the direct scorers read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from rlaif_ray.config import PairwiseConfig, RewardConfig
from rlaif_ray.engines.backends import load_engine
from rlaif_ray.engines.hf import HFEngine
from rlaif_ray.feedback import prompts, scoring
from rlaif_ray.feedback.openai_api import OpenAIEngine
from rlaif_ray.rubrics import SCORERS


class LocalLabels:
    """Label log-probs from a local engine (HFEngine or VLLMEngine) over token ids. Prompts
    longer than the engine's context are cut from the left (counted in `truncated`), with
    room for the label tokens read after them."""
    direct_scores = True

    def __init__(self, engine, tokenizer, max_tokens: int = 4096):
        self.engine, self.tok = engine, tokenizer
        self.max_tokens = min(max_tokens, engine.context - 2)
        self.truncated = 0
        self.yes = scoring.label_token_ids(tokenizer, scoring.YES)
        self.no = scoring.label_token_ids(tokenizer, scoring.NO)
        self.digit_ids = [scoring.label_token_ids(tokenizer, [d])[0] for d in scoring.DIGITS]
        self.zero = scoring.label_token_ids(tokenizer, ["0"])[0]
        # "1"/"2" with and without a leading space, where the tokenizer has them as one token;
        # each label's probability is the sum over its spellings (docs/method.md §1.3)
        self.ones = scoring.label_token_ids(tokenizer, scoring.ONE)
        self.twos = scoring.label_token_ids(tokenizer, scoring.TWO)
        # SmolLM2's tokenizer never merges a space into a digit: " 1" is " " then "1". Such
        # spellings are read in the same pass as P(" ") * P("1" | " ") (see `pair`)
        self.label_prefix, self.prefixed = scoring.split_spellings(tokenizer, scoring.ONE[1], scoring.TWO[1])

    def encode(self, text: str, room: int = 0) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        limit = self.max_tokens - room
        if len(ids) > limit:
            self.truncated += 1
            ids = ids[-limit:]  # keep the question and the answer cue
        return ids

    def yes_no(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """log P(Yes), log P(No) as the next token, each summed over its spellings."""
        logp = self.engine.label_logprobs([self.encode(t) for t in texts], self.yes + self.no)[:, -1]
        return torch.logsumexp(logp[:, :len(self.yes)], dim=-1), torch.logsumexp(logp[:, len(self.yes):], dim=-1)

    def digits(self, texts: list[str]) -> torch.Tensor:
        """[B, 2, 10] in one pass over prompt + "1": position 0 reads the first digit ("1".."9"),
        position 1 reads P("0" | "1") so that "10" (two tokens) gets its own probability."""
        seqs = [self.encode(t) + [self.digit_ids[0]] for t in texts]
        return self.engine.label_logprobs(seqs, self.digit_ids + [self.zero], 2)

    def pair(self, texts: list[str]) -> torch.Tensor:
        """[B, 2]: log P("1"), log P("2") as the next token, each summed over its spellings."""
        k, seqs = len(self.ones), [self.encode(t) for t in texts]
        if self.label_prefix is None:
            logp = self.engine.label_logprobs(seqs, self.ones + self.twos)[:, -1]
            return torch.stack([torch.logsumexp(logp[:, :k], -1), torch.logsumexp(logp[:, k:], -1)], dim=-1)
        # one pass over prompt + " ": position -2 reads "1", "2" and " " after the ending,
        # position -1 reads the digit after the space
        ids = self.ones + self.twos + [self.label_prefix] + self.prefixed
        logp = self.engine.label_logprobs([s + [self.label_prefix] for s in seqs], ids, 2)
        first, second = logp[:, 0], logp[:, 1]
        n12 = len(self.ones) + len(self.twos)
        space = first[:, n12]
        l1 = torch.cat([first[:, :k], (space + second[:, -2])[:, None]], dim=1)
        l2 = torch.cat([first[:, k:n12], (space + second[:, -1])[:, None]], dim=1)
        return torch.stack([torch.logsumexp(l1, -1), torch.logsumexp(l2, -1)], dim=-1)

    def complete(self, texts: list[str], max_tokens: int, temperature: float, top_k: int, seed: int) -> list[str]:
        toks = self.engine.complete([self.encode(t, room=max_tokens) for t in texts], max_tokens, temperature, top_k,
                                    seed=seed)
        return [self.tok.decode(t, skip_special_tokens=True) for t in toks]

    def counters(self) -> dict:
        return {"truncated_prompts": self.truncated}


class EndpointLabels:
    """Labels from an OpenAI-compatible endpoint (openai_api.OpenAIEngine): pairs only."""
    direct_scores, tok = False, None

    def __init__(self, endpoint: OpenAIEngine):
        self.engine, self.truncated = endpoint, 0  # the endpoint refuses what it cannot hold

    def pair(self, texts: list[str]) -> torch.Tensor:
        return self.engine.label_text_logprobs(texts, [scoring.ONE, scoring.TWO])

    def complete(self, texts: list[str], max_tokens: int, temperature: float, top_k: int, seed: int) -> list[str]:
        return self.engine.complete_text(texts, max_tokens, temperature, top_k, seed)

    def counters(self) -> dict:
        return {"truncated_prompts": 0, "endpoint_retries": self.engine.retries,
                "labels_outside_top_k": self.engine.labels_outside_top_k}


@dataclass
class Preferences:
    """What a pairwise judgement returns, per pair (docs/method.md §1.3-1.4)."""
    p_a: list[float]  # debiased P(a preferred over b); without debiasing p_ab
    p_ab: list[float]  # P(slot 1 is better), a in slot 1 (a harmless prompt's answer already inverted)
    p_ba: list[float]  # the same with b in slot 1; NaN without debiasing
    label_mass: list[float]  # probability the label tokens held (the smaller of the two orders)
    # P(the labeler answered "1") per order, before any inversion: where position bias is read
    answer1_ab: list[float] = field(default_factory=list)
    answer1_ba: list[float] = field(default_factory=list)
    rationales: list | None = None  # CoT: per pair, per sample, [order ab, order ba]; else None


class Judge:
    """The frozen AI labeler's logic: turns prompts into label probabilities through a label
    engine (LocalLabels or EndpointLabels)."""

    def __init__(self, labels: LocalLabels | EndpointLabels, scorer: str, batch_size: int = 8):
        if scorer not in SCORERS:
            raise ValueError(f"reward.scorer: unknown scorer {scorer!r}; known: {sorted(SCORERS)}")
        self.labels, self.scorer, self.batch_size = labels, SCORERS[scorer], batch_size
        self.tok = labels.tok

    @classmethod
    def of_model(cls, model, tokenizer, scorer: str, batch_size: int = 8, max_tokens: int = 4096,
                 prefix_sharing: str = "auto") -> "Judge":
        """A Judge over an in-process transformers model (or its HFEngine)."""
        engine = model if isinstance(model, HFEngine) else HFEngine(model, tokenizer, prefix_sharing=prefix_sharing)
        return cls(LocalLabels(engine, tokenizer, max_tokens), scorer, batch_size)

    @property
    def truncated(self) -> int:
        return self.labels.truncated

    def score(self, contexts: list[str], responses: list[str],
              scorer: str | None = None) -> tuple[list[float], list[float], list[str]]:
        """Reward in [-1, 1], the scorer's raw value and JSON metadata for each response;
        `scorer` names another entry of SCORERS than the configured one."""
        if not self.labels.direct_scores:
            raise ValueError("reward.backend=openai labels pairs only (reward.source=pairwise)")
        if scorer is not None and scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; known: {sorted(SCORERS)}")
        sc = SCORERS[scorer] if scorer else self.scorer
        rewards, raws, metas = [], [], []
        for start in range(0, len(contexts), self.batch_size):
            texts = [scoring.scorer_prompt(sc, c, r, self.tok) for c, r in
                     zip(contexts[start:start + self.batch_size], responses[start:start + self.batch_size])]
            if sc.kind == "score10":
                logp = self.labels.digits(texts)
                dist = scoring.score_distribution(logp[:, 0, :9], logp[:, 1, 9])
                raw = scoring.expected_score(dist)
                reward = scoring.rescale_score(raw)
                mass = logp[:, 0, :9].exp().sum(dim=1)
                extra = [{"p": [round(x, 4) for x in d.tolist()], "label_mass": round(float(m), 4)}
                         for d, m in zip(dist, mass)]
            else:
                l_yes, l_no = self.labels.yes_no(texts)
                raw = scoring.two_way_softmax(l_yes, l_no)
                reward = 2 * raw - 1
                # how much of the next-token mass the label tokens hold: low = unusable answer
                extra = [{"label_mass": round(float(m), 4)} for m in (l_yes.exp() + l_no.exp())]
            rewards += reward.tolist()
            raws += raw.tolist()
            metas += [json.dumps({"scorer": sc.name, **e}) for e in extra]
        return rewards, raws, metas

    def prefer(self, contexts: list[str], a: list[str], b: list[str], pw: PairwiseConfig | None = None,
               shots: tuple = ()) -> Preferences:
        """Debiased P(a preferred over b): both orders in one batch (docs/method.md §1.3-1.4),
        asked as `pw` says (task, preamble, CoT, ...) with `shots` (prompts.Exemplar items).

        Pairs are batched by length (shortest first), so a batch pads little; on CPU a padded
        row costs as much as a real one (benchmarks/labeling.py)."""
        pw = pw or PairwiseConfig()
        n_all = len(contexts)
        p_ab, p_ba, mass = [0.0] * n_all, [float("nan")] * n_all, [0.0] * n_all
        ans_ab, ans_ba = [0.0] * n_all, [float("nan")] * n_all
        rationales: list = [None] * n_all
        by_length = sorted(range(n_all), key=lambda i: len(contexts[i]) + len(a[i]) + len(b[i]))
        for start in range(0, n_all, self.batch_size):
            idx = by_length[start:start + self.batch_size]
            pairs = [(contexts[i], a[i], b[i]) for i in idx]
            orders = [(c, x, y) for c, x, y in pairs] + ([(c, y, x) for c, x, y in pairs] if pw.debias else [])
            answer1, m, rats = self._answer1(orders, pw, shots)
            # a harmless prompt asks for the worse response: "1" then means slot 2 is better
            p1 = 1 - answer1 if prompts.harmful_question(pw.task) else answer1
            n = len(pairs)
            for j, i in enumerate(idx):
                p_ab[i], ans_ab[i] = float(p1[j]), float(answer1[j])
                mass[i] = float(torch.minimum(m[j], m[n + j])) if pw.debias else float(m[j])
                if pw.debias:
                    p_ba[i], ans_ba[i] = float(p1[n + j]), float(answer1[n + j])
                if pw.cot:
                    rationales[i] = [[r[j]] + ([r[n + j]] if pw.debias else []) for r in rats]
        p_a = scoring.debias(torch.tensor(p_ab, device="cpu"), torch.tensor(p_ba, device="cpu")).tolist() \
            if pw.debias else list(p_ab)
        return Preferences(p_a, p_ab, p_ba, mass, ans_ab, ans_ba, rationales if pw.cot else None)

    def _answer1(self, orders: list[tuple[str, str, str]], pw: PairwiseConfig, shots: tuple):
        """P(the labeler answers "1"), the label tokens' probability mass, and the CoT
        rationales (per sample, per order) for each (context, first, second). CoT: decode a
        rationale (greedy, or n samples at temperature T for self-consistency), then read
        "1"/"2" after it; average the n."""
        def read(texts):
            logp = self.labels.pair(texts)
            return scoring.two_way_softmax(logp[:, 0], logp[:, 1]), logp.exp().sum(dim=1)

        build = dict(kind=pw.preamble, exemplars=shots)
        if not pw.cot:
            p, mass = read([prompts.build(pw.task, c, f, s, **build) for c, f, s in orders])
            return p, mass, []
        step1 = [prompts.build(pw.task, c, f, s, cot=True, **build) for c, f, s in orders]
        temperature = 0.0 if pw.self_consistency == 1 else pw.sc_temperature
        ps, masses, rats = [], [], []
        for k in range(pw.self_consistency):
            rationales = self.labels.complete(step1, pw.cot_max_tokens, temperature, pw.sc_top_k, seed=k)
            rats.append(rationales)
            p_k, m_k = read([prompts.build(pw.task, c, f, s, cot=True, rationale=r, **build)
                             for (c, f, s), r in zip(orders, rationales)])
            ps.append(p_k)
            masses.append(m_k)
        return torch.stack(ps).mean(0), torch.stack(masses).min(0).values, rats


def load_judge(reward: RewardConfig, model_name: str, dtype: str = "auto", device: str = "cpu",
               vllm: dict | None = None) -> tuple[Judge, str]:
    """(Judge, labeler model name) for a config's reward section: a transformers model (hf),
    a vLLM engine, or an OpenAI-compatible endpoint."""
    if reward.backend == "openai":
        labels = EndpointLabels(OpenAIEngine(**reward.openai.model_dump()))
        return Judge(labels, reward.scorer, reward.batch_size), reward.openai.model
    engine = load_engine(reward.backend, model_name, device, dtype, reward.prefix_sharing, vllm)
    return Judge(LocalLabels(engine, engine.tok), reward.scorer, reward.batch_size), model_name
