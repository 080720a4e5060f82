"""The AI labeler's model-side logic (no Ray): direct scores for single responses
(d-RLAIF, yes/no) and debiased pairwise preferences, batched."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from . import prompts, scoring
from .engines import HFEngine
from .scoring import SCORERS


class Judge:
    """Holds a frozen causal LM (or a vLLM engine) and its tokenizer; turns prompts into
    label probabilities."""

    def __init__(self, model, tokenizer, scorer: str, batch_size: int = 8, max_tokens: int = 4096,
                 prefix_sharing: str = "auto"):
        if scorer not in SCORERS:
            raise ValueError(f"reward.scorer: unknown scorer {scorer!r}; known: {sorted(SCORERS)}")
        engine = hasattr(model, "label_logprobs") or hasattr(model, "label_text_logprobs")
        self.engine = model if engine else HFEngine(model, tokenizer, prefix_sharing=prefix_sharing)
        self.tok = tokenizer
        self.scorer = SCORERS[scorer]
        # prompts are cut (from the left, counted) to fit the engine's context, with room for
        # the label tokens read after them
        self.batch_size, self.max_tokens = batch_size, min(max_tokens, getattr(self.engine, "context", max_tokens) - 2)
        self.truncated = 0  # prompts cut to max_tokens (counted, reported by the actor)
        self.remote = hasattr(self.engine, "label_text_logprobs")  # openai: text in, text out
        if self.remote:
            return
        self.yes = scoring.label_token_ids(tokenizer, scoring.YES)
        self.no = scoring.label_token_ids(tokenizer, scoring.NO)
        self.digits = [scoring.label_token_ids(tokenizer, [d])[0] for d in scoring.DIGITS]
        self.zero = scoring.label_token_ids(tokenizer, ["0"])[0]
        # "1"/"2" with and without a leading space, where the tokenizer has them as one token;
        # each label's probability is the sum over its spellings (METHOD.md 1.3 leaves it open)
        self.ones = scoring.label_token_ids(tokenizer, scoring.ONE)
        self.twos = scoring.label_token_ids(tokenizer, scoring.TWO)
        # SmolLM2's tokenizer never merges a space into a digit: " 1" is " " then "1". Such
        # spellings are read in the same pass as P(" ") * P("1" | " ") (see _label_logprobs)
        self.label_prefix, self.prefixed = scoring.split_spellings(tokenizer, scoring.ONE[1], scoring.TWO[1])

    def _encode(self, text: str, room: int = 0) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        limit = self.max_tokens - room
        if len(ids) > limit:
            self.truncated += 1
            ids = ids[-limit:]  # keep the question and the answer cue
        return ids

    def score(self, contexts: list[str], responses: list[str],
              scorer: str | None = None) -> tuple[list[float], list[float], list[str]]:
        """Reward in [-1, 1], the scorer's raw value and JSON metadata for each response;
        `scorer` names another entry of SCORERS than the configured one."""
        if self.remote:
            raise ValueError("reward.backend=openai labels pairs only (reward.source=pairwise)")
        if scorer is not None and scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; known: {sorted(SCORERS)}")
        sc = SCORERS[scorer] if scorer else self.scorer
        rewards, raws, metas = [], [], []
        for start in range(0, len(contexts), self.batch_size):
            ctx = contexts[start:start + self.batch_size]
            rsp = responses[start:start + self.batch_size]
            seqs = [self._encode(scoring.scorer_prompt(sc, c, r, self.tok)) for c, r in zip(ctx, rsp)]
            if sc.kind == "score10":
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
            metas += [json.dumps({"scorer": sc.name, **e}) for e in extra]
        return rewards, raws, metas

    def prefer(self, contexts: list[str], a: list[str], b: list[str],
               opts: "PairwiseOptions | None" = None) -> tuple[list[float], list[float], list[float]]:
        """Debiased P(a preferred over b): both orders in one batch (METHOD.md 1.3-1.4).
        Returns (p_a, P_ab(slot 1 better), P_ba(slot 1 better)); without debiasing p_a is
        P_ab and P_ba is NaN. `last_pair_mass` holds the label tokens' probability mass
        (the smaller of the two orders) per pair, `last_pair_rationales` the CoT rationales.

        Pairs are batched by length (shortest first), so a batch pads little; on CPU a padded
        row costs as much as a real one (benchmarks/labeling.py)."""
        opts = opts or PairwiseOptions()
        n_all = len(contexts)
        p_ab, p_ba, mass = [0.0] * n_all, [float("nan")] * n_all, [0.0] * n_all
        rationales: list = [None] * n_all  # CoT: per pair, per sample, [order ab, order ba]
        self.last_rationales = []
        by_length = sorted(range(n_all), key=lambda i: len(contexts[i]) + len(a[i]) + len(b[i]))
        for start in range(0, n_all, self.batch_size):
            idx = by_length[start:start + self.batch_size]
            pairs = [(contexts[i], a[i], b[i]) for i in idx]
            orders = [(c, x, y) for c, x, y in pairs] + ([(c, y, x) for c, x, y in pairs] if opts.debias else [])
            p1, m = self._slot1_better(orders, opts)
            n = len(pairs)
            chunk = self.last_rationales[-opts.self_consistency:] if opts.cot else []
            for j, i in enumerate(idx):
                p_ab[i] = float(p1[j])
                mass[i] = float(torch.minimum(m[j], m[n + j])) if opts.debias else float(m[j])
                if opts.debias:
                    p_ba[i] = float(p1[n + j])
                if opts.cot:
                    rationales[i] = [[r[j]] + ([r[n + j]] if opts.debias else []) for r in chunk]
        self.last_pair_mass, self.last_pair_rationales = mass, rationales if opts.cot else []
        p_a = scoring.debias(torch.tensor(p_ab, device="cpu"), torch.tensor(p_ba, device="cpu")).tolist() if opts.debias else list(p_ab)
        return p_a, p_ab, p_ba

    def _label_logprobs(self, texts: list[str]) -> torch.Tensor:
        """[B, 2]: log P("1"), log P("2") as the next token, each summed over its spellings."""
        if self.remote:
            return self.engine.label_text_logprobs(texts, [scoring.ONE, scoring.TWO])
        k, seqs = len(self.ones), [self._encode(t) for t in texts]
        if self.label_prefix is None:
            logp = self.engine.label_logprobs(seqs, self.ones + self.twos)[:, -1]
            return torch.stack([torch.logsumexp(logp[:, :k], -1), torch.logsumexp(logp[:, k:], -1)], dim=-1)
        # one pass over prompt + " ": position -2 reads "1", "2" and " " after the ending,
        # position -1 reads the digit after the space
        ids = self.ones + self.twos + [self.label_prefix] + self.prefixed
        logp = self.engine.label_logprobs([s + [self.label_prefix] for s in seqs], ids, 2)
        first, second = logp[:, 0], logp[:, 1]
        space = first[:, len(self.ones) + len(self.twos)]
        l1 = torch.cat([first[:, :k], (space + second[:, -2])[:, None]], dim=1)
        l2 = torch.cat([first[:, k:len(self.ones) + len(self.twos)], (space + second[:, -1])[:, None]], dim=1)
        return torch.stack([torch.logsumexp(l1, -1), torch.logsumexp(l2, -1)], dim=-1)

    def _complete(self, texts: list[str], max_tokens: int, temperature: float, top_k: int, seed: int) -> list[str]:
        if self.remote:
            return self.engine.complete_text(texts, max_tokens, temperature, top_k, seed)
        toks = self.engine.complete([self._encode(t, room=max_tokens) for t in texts], max_tokens, temperature, top_k,
                                    seed=seed)
        return [self.tok.decode(t, skip_special_tokens=True) for t in toks]

    def _slot1_better(self, orders: list[tuple[str, str, str]], opts: "PairwiseOptions"):
        """P(the response in slot 1 is the better one) and the label tokens' probability mass,
        for each (context, first, second). CoT: decode a rationale (greedy, or n samples at
        temperature T for self-consistency), then score "1"/"2" after it; average the n."""
        def score(texts):
            logp = self._label_logprobs(texts)
            return scoring.two_way_softmax(logp[:, 0], logp[:, 1]), logp.exp().sum(dim=1)

        build = dict(kind=opts.preamble, exemplars=opts.shots)
        if not opts.cot:
            p, mass = score([prompts.build(opts.task, c, f, s, **build) for c, f, s in orders])
        else:
            step1 = [prompts.build(opts.task, c, f, s, cot=True, **build) for c, f, s in orders]
            temperature = 0.0 if opts.self_consistency == 1 else opts.sc_temperature
            ps, masses = [], []
            for k in range(opts.self_consistency):
                rationales = self._complete(step1, opts.cot_max_tokens, temperature, opts.sc_top_k, seed=k)
                self.last_rationales.append(rationales)
                p_k, m_k = score([prompts.build(opts.task, c, f, s, cot=True, rationale=r, **build)
                                  for (c, f, s), r in zip(orders, rationales)])
                ps.append(p_k)
                masses.append(m_k)
            p, mass = torch.stack(ps).mean(0), torch.stack(masses).min(0).values
        if prompts.harmful_question(opts.task):  # the prompt asked for the worse response
            p = 1 - p
        return p, mass


def load_engine(reward, model_name: str, dtype: str = "auto", device: str = "cpu", vllm: dict | None = None):
    """(engine, tokenizer, model name) for a config's reward section: a transformers model
    (hf), a vLLM engine, or an OpenAI-compatible endpoint (text in, text out: no tokenizer)."""
    from . import engines

    if reward.backend == "openai":
        from .openai_api import OpenAIEngine

        return OpenAIEngine(**reward.openai.model_dump()), None, reward.openai.model
    engine = engines.load_engine(reward.backend, model_name, device, dtype, reward.prefix_sharing, vllm)
    return engine, engine.tok, model_name


@dataclass(frozen=True)
class PairwiseOptions:
    """How the pairwise labeler asks (METHOD.md 1.2-1.6). Defaults: summarization, base
    preamble, 0-shot, no CoT, no self-consistency."""
    task: str = "summarization"
    preamble: str = "base"
    shots: tuple = ()  # prompts.Exemplar items
    cot: bool = False
    cot_max_tokens: int = 512
    self_consistency: int = 1  # > 1: sample that many rationales (paper: off; tried 4 and 16)
    sc_temperature: float = 0.7
    sc_top_k: int = 40
    debias: bool = True  # both orders, averaged after mapping back (METHOD.md 1.4)

    @classmethod
    def from_config(cls, pw, task: str | None = None) -> "PairwiseOptions":
        """From a config's reward.pairwise section (exemplars read from its file)."""
        from .pairs import load_exemplars

        shots = load_exemplars(pw.exemplars_path, pw.shots) if pw.shots else ()
        return cls(task=task or pw.task, preamble=pw.preamble, shots=shots, cot=pw.cot,
                   cot_max_tokens=pw.cot_max_tokens, self_consistency=pw.self_consistency,
                   sc_temperature=pw.sc_temperature, sc_top_k=pw.sc_top_k, debias=pw.debias)


def pairwise_prompt(context: str, first: str, second: str) -> str:
    """Base 0-shot summarization prompt (METHOD.md 1.1-1.2), as rlaif_ray.prompts builds it."""
    return prompts.build("summarization", context, first, second)
