"""Labeler: the reward pool's actor, a thin shell around labeling.Judge and the other reward
sources (feedback/rewards.py). Scores rollout batches (d-RLAIF direct scores, debiased
pairwise preferences between two samples of the same prompt, your Python function or reward
server, or a weighted sum of them) and judges pairs for evaluation."""
from __future__ import annotations

import json
import time

import pyarrow as pa
import torch

from rlaif_ray.config import RewardConfig, judge_sources
from rlaif_ray.data import schemas
from rlaif_ray.engines import lm
from rlaif_ray.engines.hf import HFEngine
from rlaif_ray.feedback import scoring
from rlaif_ray.feedback.labeler_eval import measure_signal
from rlaif_ray.feedback.labeling import LocalLabels, Preferences, load_judge
from rlaif_ray.feedback.pairs import load_exemplars
from rlaif_ray.feedback.rewards import RewardSources, row_fields

from .process import ActorProcess, watch_engine


def with_cost(metas: list[str], cost: dict) -> list[str]:
    """One call's judge tokens shared out over its rows' metadata (a batch's rows add up to
    what the call cost: metrics.jsonl's judge_prompt_tokens and judge_completion_tokens)."""
    if not any(cost.values()) or not metas:
        return metas
    share = {k: v / len(metas) for k, v in cost.items()}
    return [json.dumps({**json.loads(m), **share}) for m in metas]


def local_model(judge):
    """The transformers model a judge reads labels from in this process (None: a vLLM engine
    or an endpoint)."""
    labels = judge.labels
    if isinstance(labels, LocalLabels) and isinstance(labels.engine, HFEngine):
        return labels.engine.model
    return None


class Labeler:
    """`reward` is the config's reward section as a dict (source, scorer and rubrics, backend,
    pairwise prompt options, openai endpoint, python function, http server, parts). The judge
    model (or endpoint) is loaded when a source needs it or `judge` asks for it (the judge of
    the signal check and the win rate); a python or http source needs none."""

    def __init__(self, name: str, reward: dict, model_name: str, dtype: str = "auto",
                 torch_threads: int = 1, device: str = "cpu", vllm: dict | None = None, judge: bool = True):
        self.proc = ActorProcess("labeler", name, torch_threads, device)
        cfg = RewardConfig.model_validate(reward)
        self.name, self.min_label_mass, self.pairwise = name, cfg.min_label_mass, cfg.pairwise
        self.shots = load_exemplars(cfg.pairwise.exemplars_path, cfg.pairwise.shots)
        self.judge, self.model_name = None, model_name
        if judge or judge_sources(cfg):
            self.judge, self.model_name = load_judge(cfg, model_name, dtype, device, vllm)
            if local_model(self.judge) is not None:
                self.proc.tune(local_model(self.judge))
            # vLLM in processes of its own: a dead one ends this actor (Ray restarts it)
            watch_engine(name, getattr(self.judge.labels, "engine", None))
        self.reward = RewardSources(cfg)
        self.unusable = 0  # labels whose tokens held too little probability (counted)

    def info(self) -> dict:
        counters = {"endpoint_retries": 0, "labels_outside_top_k": 0,
                    **(self.judge.labels.counters() if self.judge is not None else {}), **self.reward.counters()}
        return self.proc.info(unusable_labels=self.unusable, **counters)

    def score(self, rollouts: pa.RecordBatch, mode: str = "direct",
              reference_temperature: float | None = None, single: bool = False) -> pa.RecordBatch:
        """Rollouts -> scored rollouts (the SCORED schema), by the reward source `mode` (the
        config's reward.source; `single`: one sample per prompt, as held-out evaluations draw,
        where a pairwise source is read as the direct scorer). `reference_temperature`: also the
        reference policy's log-probs of the responses at that temperature (rl.reference:
        labeler; this labeler holds the initial policy's weights), so the learner skips its
        reference forward."""
        with self.proc.busy():
            schemas.check(rollouts, schemas.ROLLOUT, f"{self.name}.score input")
            t0, used = time.perf_counter(), self._judge_tokens()
            if mode == "sum":
                rewards, raws, metas, parts = self.reward.total(lambda part: self._part(rollouts, part, single))
            else:
                (rewards, raws, metas), parts = self._source(rollouts, mode, single), None
            ok = [json.loads(m).get("label_mass", 1.0) >= self.min_label_mass for m in metas]
            ref = self._reference(rollouts, reference_temperature) if reference_temperature is not None \
                else [None] * rollouts.num_rows
            self.unusable += ok.count(False)  # of the rewards (info); judgements count their own
            self._count(len(rewards), ok.count(False), t0)
            metas = with_cost(metas, {k: v - used[k] for k, v in self._judge_tokens().items()})
            return schemas.extend(rollouts, schemas.SCORED, {"reward": rewards, "raw_score": raws, "reward_meta": metas,
                                                             "reward_ok": ok, "reference_logprobs": ref,
                                                             "reward_parts": parts or [None] * len(rewards)})

    def _source(self, rollouts: pa.RecordBatch, source: str, single: bool):
        """(rewards, raw values, JSON metadata) of one reward source for every rollout."""
        contexts = rollouts.column("context").to_pylist()
        responses = rollouts.column("response_text").to_pylist()
        fields = row_fields(rollouts)
        if source == "pairwise" and not single:
            return self._pairwise(rollouts, contexts, responses, fields)
        if source in ("direct", "pairwise"):
            rewards, raws, metas = self.judge.score(contexts, responses, fields=fields)
            return rewards, raws, [json.dumps({**json.loads(m), "labeler": self.name}) for m in metas]
        rewards = self.reward.call(source, contexts, responses, fields)
        return rewards, rewards, [json.dumps({"source": source, "labeler": self.name})] * len(rewards)

    def _part(self, rollouts: pa.RecordBatch, part, single: bool) -> tuple[list[float], list[str]]:
        """(rewards, metadata) of one part of a sum: a judge source, or a function or server of its own."""
        if part.source in ("direct", "pairwise"):
            rewards, _, metas = self._source(rollouts, part.source, single)
            return rewards, metas
        rewards = self.reward.call(part, rollouts.column("context").to_pylist(),
                                   rollouts.column("response_text").to_pylist(), row_fields(rollouts))
        return rewards, ["{}"] * len(rewards)

    @torch.no_grad()
    def _reference(self, rollouts: pa.RecordBatch, temperature: float) -> list[list[float]]:
        """Per-token log pi_ref(response) at `temperature` (the full softmax, as the learner's
        reference), each prompt once for its samples (lm.grouped_logprobs)."""
        engine = getattr(self.judge.labels, "engine", None)
        if not isinstance(engine, HFEngine):
            raise ValueError("rl.reference=labeler needs reward.backend=hf (the labeler's model in this process)")
        prompts = rollouts.column("prompt_token_ids").to_pylist()
        responses = rollouts.column("response_token_ids").to_pylist()
        logp, _, _ = lm.shared_prompt_logprobs(engine.model, prompts, responses, engine.pad, temperature)
        return [row[:len(r)] for row, r in zip(logp.float().cpu().tolist(), responses)]

    def _pairwise(self, rollouts, contexts, responses, fields):
        """Samples (0,1), (2,3), ... of each prompt are compared; both orders, one batch. Pairs
        are keyed by rollout id, so a prompt that repeats in a batch gives separate pairs."""
        # rollout ids are b{batch}:{prompt key}:{sample}; the prompt key is unique per occurrence
        keys = [rid.rsplit(":", 1)[0] for rid in rollouts.column("rollout_id").to_pylist()]
        samples = rollouts.column("sample_index").to_pylist()
        index = {(key, s): i for i, (key, s) in enumerate(zip(keys, samples))}
        if len(index) < len(keys):
            raise ValueError("pairwise reward: two rollouts share a rollout id")
        pairs = []
        for (key, s), i in index.items():
            if s % 2 == 0:
                if (key, s + 1) not in index:
                    raise ValueError(f"pairwise reward: rollout {key}:{s} has no partner sample {s + 1}")
                pairs.append((i, index[(key, s + 1)]))
        pref = self.judge.prefer([contexts[i] for i, _ in pairs], [responses[i] for i, _ in pairs],
                                 [responses[j] for _, j in pairs], self.pairwise, self.shots,
                                 [fields[i] for i, _ in pairs])
        rewards, raws, metas = [0.0] * len(responses), [0.0] * len(responses), [""] * len(responses)
        for (i, j), pa_, ab, ba, mass in zip(pairs, pref.p_a, pref.p_ab, pref.p_ba, pref.label_mass):
            r_a, r_b = scoring.pairwise_rewards(torch.tensor(pa_, device="cpu"))
            meta = {"mode": "pairwise", "labeler": self.name, "p_ab": round(ab, 4), "p_ba": round(ba, 4),
                    "label_mass": round(mass, 4)}
            rewards[i], raws[i], metas[i] = float(r_a), pa_, json.dumps({**meta, "vs": j})
            rewards[j], raws[j], metas[j] = float(r_b), 1 - pa_, json.dumps({**meta, "vs": i})
        return rewards, raws, metas

    def compare(self, contexts: list[str], a: list[str], b: list[str], pairwise: dict | None = None,
                fields: list[dict] | None = None) -> Preferences:
        """Evaluation: debiased P(a preferred over b) per pair, both orders, with the label
        tokens' probability mass (low mass: unusable, counted) and any CoT rationales.
        `pairwise` overrides fields of the config's reward.pairwise (task, preamble, cot, ...)."""
        with self.proc.busy():
            t0 = time.perf_counter()
            pw = self.pairwise.model_copy(update=pairwise) if pairwise else self.pairwise
            pref = self.judge.prefer(contexts, a, b, pw, self.shots, fields)
            self._count(len(pref.p_a), sum(1 for m in pref.label_mass if m < self.min_label_mass), t0)
            return pref

    def judge_alone(self, contexts: list[str], responses: list[str], scorer: str | None = None,
                    fields: list[dict] | None = None) -> dict:
        """Each response judged on its own by a scorer (the harmless rate, eval.judge=scorer,
        or the configured reward.scorer): reward in [-1, 1], raw value, the reward mapped to
        [0, 1] (P(Yes) for yes/no scorers, (score - 1) / 9 for 1-10), the label mass."""
        with self.proc.busy():
            t0 = time.perf_counter()
            rewards, raws, metas = self.judge.score(contexts, responses, scorer, fields)
            mass = [json.loads(m)["label_mass"] for m in metas]
            self._count(len(raws), sum(1 for m in mass if m < self.min_label_mass), t0)
            return {"reward": rewards, "p_yes": raws, "score01": [(r + 1) / 2 for r in rewards], "label_mass": mass}

    def signal(self, rows: list[dict], n: int) -> dict:
        with self.proc.busy():
            return measure_signal(self.judge, rows, n)

    def _judge_tokens(self) -> dict:
        """What an endpoint judge has cost so far: tokens sent and received (0 for a local one)."""
        c = self.judge.labels.counters() if self.judge is not None else {}
        return {k: c.get(k, 0) for k in ("judge_prompt_tokens", "judge_completion_tokens")}

    def _count(self, n_labels: int, unusable: int, t0: float) -> None:
        """Labels made (and unusable ones) by one call that started at `t0`, for the dashboard."""
        self.proc.metrics.inc("labels", n_labels)
        self.proc.metrics.inc("unusable_labels", unusable)
        self.proc.metrics.set("labels_per_s", n_labels / max(time.perf_counter() - t0, 1e-9))
