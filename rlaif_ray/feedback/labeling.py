"""The AI labeler's model-side logic (no Ray): direct scores for single responses
(d-RLAIF scores, yes/no questions, your own rubrics) and debiased pairwise preferences,
batched (docs/method.md §1, §4).

A `Judge` reads labels through a label engine, one of two, with one interface:
- `LocalLabels`: a local model (HF or vLLM engine); prompts are tokenized here (chat prompts
  in the model's chat template) and the log-probabilities of the label tokens read exactly;
- `EndpointLabels`: an OpenAI-compatible endpoint (openai_api.OpenAIEngine, chat or
  completions API): labels from the answer's top log-probabilities, or (labels: text) from
  sampled answers, parsed.
Both offer `yes_no`, `pair` (log P of each label), `integers` (the probability of each
whole-number answer lo..hi), `complete` (CoT rationales) and `counters`.
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
from rlaif_ray.rubrics import SCORERS, Scorer, rubric_text, scorer_of


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
        # "1"/"2" with and without a leading space, where the tokenizer has them as one token;
        # each label's probability is the sum over its spellings (docs/method.md §1.3)
        self.ones = scoring.label_token_ids(tokenizer, scoring.ONE)
        self.twos = scoring.label_token_ids(tokenizer, scoring.TWO)
        # SmolLM2's tokenizer never merges a space into a digit: " 1" is " " then "1". Such
        # spellings are read in the same pass as P(" ") * P("1" | " ") (see `pair`)
        self.label_prefix, self.prefixed = scoring.split_spellings(tokenizer, scoring.ONE[1], scoring.TWO[1])

    def encode(self, prompt, room: int = 0) -> list[int]:
        """A prompt's tokens: text as it is, chat messages in the model's chat template."""
        ids = self.tok(scoring.as_text(prompt, self.tok), add_special_tokens=False)["input_ids"]
        limit = self.max_tokens - room
        if len(ids) > limit:
            self.truncated += 1
            ids = ids[-limit:]  # keep the question and the answer cue
        return ids

    def yes_no(self, texts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """log P(Yes), log P(No) as the next token, each summed over its spellings."""
        logp = self.engine.label_logprobs([self.encode(t) for t in texts], self.yes + self.no)[:, -1]
        return torch.logsumexp(logp[:, :len(self.yes)], dim=-1), torch.logsumexp(logp[:, len(self.yes):], dim=-1)

    def integers(self, texts: list, lo: int, hi: int) -> torch.Tensor:
        """[B, hi - lo + 1]: the probability that the answer is each whole number lo..hi, read
        as the tokenizer writes them (scoring.AnswerTrie: "10" one token or "1" then "0"), in
        one pass per deepest prefix; their sum is the label mass."""
        trie = scoring.AnswerTrie([self.tok(str(k), add_special_tokens=False)["input_ids"] for k in range(lo, hi + 1)])
        seqs = [self.encode(t) for t in texts]
        nexts = {}
        for prefix in trie.deepest:  # each pass reads every ancestor of its prefix by lookback
            lp = self.engine.label_logprobs([s + list(prefix) for s in seqs], trie.tokens, len(prefix) + 1)
            for j in range(len(prefix) + 1):
                nexts[prefix[:j]] = lp[:, j]
        return trie.probabilities(nexts)

    def pair(self, texts: list) -> torch.Tensor:
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

    def complete(self, texts: list, max_tokens: int, temperature: float, top_k: int, seed: int) -> list[str]:
        toks = self.engine.complete([self.encode(t, room=max_tokens) for t in texts], max_tokens, temperature, top_k,
                                    seed=seed)
        return [self.tok.decode(t, skip_special_tokens=True) for t in toks]

    def counters(self) -> dict:
        return {"truncated_prompts": self.truncated}


class EndpointLabels:
    """Labels from an OpenAI-compatible endpoint (openai_api.OpenAIEngine). `mode` logprobs:
    from the answer's top log-probabilities (a label outside them bounded and counted);
    text: `samples` answers sampled at `temperature` and parsed, each label's share of them
    its probability (answers that name no label counted, never guessed; their share is
    missing label mass)."""
    direct_scores, tok = True, None

    def __init__(self, endpoint: OpenAIEngine, mode: str = "logprobs", samples: int = 8, temperature: float = 1.0,
                 max_answer_tokens: int = 8):
        self.engine, self.truncated = endpoint, 0  # the endpoint refuses what it cannot hold
        self.in_flight = endpoint.max_concurrency
        self.mode, self.samples, self.temperature, self.max_answer = mode, samples, temperature, max_answer_tokens
        self.seed = 0

    def _shares(self, texts: list, parse, k: int) -> torch.Tensor:
        """[B, k]: the share of sampled answers that `parse` reads as each of k labels."""
        self.seed += 1
        out = torch.zeros(len(texts), k, device="cpu")
        for b, answers in enumerate(self.engine.sample_answers(texts, self.samples, self.max_answer, self.temperature,
                                                               self.seed)):
            for a in answers:
                label = parse(a)
                if label is None:
                    self.engine.unparsable_answers += 1
                else:
                    out[b, label] += 1 / len(answers)
        return out

    def yes_no(self, texts: list) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "text":
            p = self._shares(texts, scoring.parse_yes_no, 2)
            return p[:, 0].log(), p[:, 1].log()
        logp = self.engine.label_text_logprobs(texts, [scoring.YES, scoring.NO])
        return logp[:, 0], logp[:, 1]

    def pair(self, texts: list) -> torch.Tensor:
        if self.mode == "text":
            return self._shares(texts, scoring.parse_choice, 2).log()
        return self.engine.label_text_logprobs(texts, [scoring.ONE, scoring.TWO])

    def integers(self, texts: list, lo: int, hi: int) -> torch.Tensor:
        if self.mode == "text":
            return self._shares(texts, lambda a: scoring.parse_integer(a, lo, hi), hi - lo + 1)
        positions = len(str(hi))  # a whole number's digits, one token each at most
        out = torch.zeros(len(texts), hi - lo + 1, device="cpu")
        for b, tops in enumerate(self.engine.answer_logprobs(texts, positions)):
            out[b], unread = scoring.integers_from_top(tops, lo, hi)
            self.engine.labels_outside_top_k += unread
        return out

    def complete(self, texts: list, max_tokens: int, temperature: float, top_k: int, seed: int) -> list[str]:
        return self.engine.complete_text(texts, max_tokens, temperature, top_k, seed)

    def counters(self) -> dict:
        return {"truncated_prompts": 0, **self.engine.counters()}


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
    engine (LocalLabels or EndpointLabels). `scorers`: direct scorers beyond the built-in ones
    (the user's yesno/score rubrics, by name); `rubrics`: the user's pairwise rubrics, by name."""

    def __init__(self, labels: LocalLabels | EndpointLabels, scorer: str, batch_size: int = 8,
                 scorers: dict[str, Scorer] | None = None, rubrics: dict[str, prompts.PairwiseRubric] | None = None):
        self.scorers = {**SCORERS, **(scorers or {})}
        if scorer not in self.scorers:
            raise ValueError(f"reward.scorer: unknown scorer {scorer!r}; known: {sorted(self.scorers)}")
        # an endpoint judges at least as many at once as it has requests in flight
        # (reward.openai.max_concurrency); a local engine, reward.batch_size (its padding cost)
        self.labels, self.scorer = labels, self.scorers[scorer]
        self.batch_size = max(batch_size, getattr(labels, "in_flight", 0))
        self.rubrics = rubrics or {}
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

    def score(self, contexts: list[str], responses: list[str], scorer: str | None = None,
              fields: list[dict] | None = None) -> tuple[list[float], list[float], list[str]]:
        """Reward in [-1, 1], the scorer's raw value and JSON metadata for each response;
        `scorer` names another scorer than the configured one; `fields`: each row's reference and
        other columns (a rubric's template may name them)."""
        if scorer is not None and scorer not in self.scorers:
            raise ValueError(f"unknown scorer {scorer!r}; known: {sorted(self.scorers)}")
        sc = self.scorers[scorer] if scorer else self.scorer
        fields = fields or [{}] * len(contexts)
        rewards, raws, metas = [], [], []
        for start in range(0, len(contexts), self.batch_size):
            end = start + self.batch_size
            texts = [scoring.scorer_request(sc, c, r, f) for c, r, f in
                     zip(contexts[start:end], responses[start:end], fields[start:end])]
            reward, raw, extra = self._scores(sc, texts) if sc.scores else self._yes_no(texts)
            rewards += reward.tolist()
            raws += raw.tolist()
            metas += [json.dumps({"scorer": sc.name, **e}) for e in extra]
        return rewards, raws, metas

    def _scores(self, sc: Scorer, texts: list) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """A whole-number score lo..hi: its expectation under the judge's distribution (renormalised
        over the answers), mapped linearly to [-1, 1] (docs/method.md §4)."""
        probs = self.labels.integers(texts, sc.lo, sc.hi)
        mass = probs.sum(dim=1)
        dist = probs / mass.clamp(min=1e-30)[:, None]
        raw = scoring.expected_score(dist) + (sc.lo - 1)  # expected_score counts from 1
        reward = scoring.rescale_score(raw, sc.lo, sc.hi)
        return reward, raw, [{"p": [round(x, 4) for x in d.tolist()], "label_mass": round(float(m), 4)}
                             for d, m in zip(dist, mass)]

    def _yes_no(self, texts: list) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        l_yes, l_no = self.labels.yes_no(texts)
        raw = scoring.two_way_softmax(l_yes, l_no)
        # how much of the next-token mass the label tokens hold: low = unusable answer
        return 2 * raw - 1, raw, [{"label_mass": round(float(m), 4)} for m in (l_yes.exp() + l_no.exp())]

    def pairwise_task(self, pw: PairwiseConfig) -> "str | prompts.PairwiseRubric":
        """The pairwise question: the user's rubric (reward.pairwise.rubric) or the paper's task."""
        if pw.rubric is None:
            return pw.task
        if pw.rubric not in self.rubrics:
            raise ValueError(f"reward.pairwise.rubric: no pairwise rubric {pw.rubric!r} (known: {sorted(self.rubrics)})")
        return self.rubrics[pw.rubric]

    def prefer(self, contexts: list[str], a: list[str], b: list[str], pw: PairwiseConfig | None = None,
               shots: tuple = (), fields: list[dict] | None = None) -> Preferences:
        """Debiased P(a preferred over b): both orders in one batch (docs/method.md §1.3-1.4),
        asked as `pw` says (task or rubric, preamble, CoT, ...) with `shots` (prompts.Exemplar
        items); `fields`: each pair's row columns, for a rubric that names them.

        Pairs are batched by length (shortest first), so a batch pads little; on CPU a padded
        row costs as much as a real one (benchmarks/labeling.py)."""
        pw = pw or PairwiseConfig()
        task, fields = self.pairwise_task(pw), fields or [{}] * len(contexts)
        n_all = len(contexts)
        p_ab, p_ba, mass = [0.0] * n_all, [float("nan")] * n_all, [0.0] * n_all
        ans_ab, ans_ba = [0.0] * n_all, [float("nan")] * n_all
        rationales: list = [None] * n_all
        by_length = sorted(range(n_all), key=lambda i: len(contexts[i]) + len(a[i]) + len(b[i]))
        for start in range(0, n_all, self.batch_size):
            idx = by_length[start:start + self.batch_size]
            pairs = [(contexts[i], a[i], b[i], fields[i]) for i in idx]
            orders = [(c, x, y, f) for c, x, y, f in pairs] + ([(c, y, x, f) for c, x, y, f in pairs] if pw.debias else [])
            answer1, m, rats = self._answer1(orders, pw, task, shots)
            # a harmless prompt asks for the worse response: "1" then means slot 2 is better
            p1 = 1 - answer1 if prompts.harmful_question(task) else answer1
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

    def _answer1(self, orders: list[tuple], pw: PairwiseConfig, task, shots: tuple):
        """P(the labeler answers "1"), the label tokens' probability mass, and the CoT
        rationales (per sample, per order) for each (context, first, second, fields). CoT: decode
        a rationale (greedy, or n samples at temperature T for self-consistency), then read
        "1"/"2" after it; average the n."""
        def read(texts):
            logp = self.labels.pair(texts)
            return scoring.two_way_softmax(logp[:, 0], logp[:, 1]), logp.exp().sum(dim=1)

        build = dict(kind=pw.preamble, exemplars=shots)
        if not pw.cot:
            p, mass = read([prompts.build(task, c, x, y, fields=f, **build) for c, x, y, f in orders])
            return p, mass, []
        step1 = [prompts.build(task, c, x, y, cot=True, fields=f, **build) for c, x, y, f in orders]
        temperature = 0.0 if pw.self_consistency == 1 else pw.sc_temperature
        ps, masses, rats = [], [], []
        for k in range(pw.self_consistency):
            rationales = self.labels.complete(step1, pw.cot_max_tokens, temperature, pw.sc_top_k, seed=k)
            rats.append(rationales)
            p_k, m_k = read([prompts.build(task, c, x, y, cot=True, rationale=r, fields=f, **build)
                             for (c, x, y, f), r in zip(orders, rationales)])
            ps.append(p_k)
            masses.append(m_k)
        return torch.stack(ps).mean(0), torch.stack(masses).min(0).values, rats


def user_rubrics(reward: RewardConfig) -> tuple[dict[str, Scorer], dict[str, prompts.PairwiseRubric]]:
    """The config's rubrics: (direct scorers by name, pairwise rubrics by name)."""
    scorers, pairwise = {}, {}
    for name, r in reward.rubrics.items():
        text = rubric_text(name, r)
        if r.kind == "pairwise":
            pairwise[name] = prompts.PairwiseRubric(text, r.preamble or "", r.ending, r.asks_worse, r.cot_request, r.chat)
        else:
            scorers[name] = scorer_of(name, r, text)
    return scorers, pairwise


def load_judge(reward: RewardConfig, model_name: str, dtype: str = "auto", device: str = "cpu",
               vllm: dict | None = None) -> tuple[Judge, str]:
    """(Judge, labeler model name) for a config's reward section: a transformers model (hf),
    a vLLM engine, or an OpenAI-compatible endpoint."""
    scorers, pairwise = user_rubrics(reward)
    if reward.backend == "openai":
        o = reward.openai
        engine = OpenAIEngine(**{**o.model_dump(), "tokenizer": o.tokenizer or o.model})
        labels = EndpointLabels(engine, o.labels, o.samples, o.temperature, o.max_answer_tokens)
        return Judge(labels, reward.scorer, reward.batch_size, scorers, pairwise), o.model
    engine = load_engine(reward.backend, model_name, device, dtype, reward.prefix_sharing, vllm)
    return Judge(LocalLabels(engine, engine.tok), reward.scorer, reward.batch_size, scorers, pairwise), model_name
