"""Labeler: the frozen AI judge. Scores rollout batches (d-RLAIF direct scores, or
debiased pairwise preferences between two samples of the same prompt)."""
from __future__ import annotations

import json
import os
import time

import pyarrow as pa

from rlaif_ray import schemas, scoring
from rlaif_ray.labeling import Judge
from rlaif_ray.metrics import RoleMetrics
from rlaif_ray.models import trim_heap
from rlaif_ray.signal import measure_signal


class Labeler:
    """`reward` is the config's reward section as a dict (scorer, backend, pairwise prompt
    options, openai endpoint). Ray Data can also run it as a pool (`rlaif-ray label`):
    calling it on a batch of PAIRS rows returns LABELS rows."""

    def __init__(self, name: str, reward: dict, model_name: str, dtype: str = "auto",
                 torch_threads: int = 1, device: str = "cpu", vllm: dict | None = None):
        import torch

        from rlaif_ray.config import RewardConfig
        from rlaif_ray.labeling import PairwiseOptions, load_engine

        torch.set_num_threads(torch_threads)
        cfg = RewardConfig.model_validate(reward)
        self.name = name
        self.tag = f"{name}:{os.getpid()}"  # the `labeler` column of `rlaif-ray label` output
        self.min_label_mass = cfg.min_label_mass
        self.options = PairwiseOptions.from_config(cfg.pairwise)
        self.unusable = 0  # labels whose tokens held too little probability (counted)
        engine, tokenizer, model_name = load_engine(cfg, model_name, dtype, device, vllm)
        self.judge = Judge(engine, tokenizer, cfg.scorer, cfg.batch_size, prefix_sharing=cfg.prefix_sharing)
        pw = cfg.pairwise
        self.prompt_config = json.dumps({"backend": cfg.backend, "model": model_name, "task": pw.task,
                                         "preamble": pw.preamble, "shots": pw.shots, "exemplars": pw.exemplars_path,
                                         "cot": pw.cot, "cot_max_tokens": pw.cot_max_tokens,
                                         "self_consistency": pw.self_consistency, "debias": pw.debias})
        self.busy_s = 0.0
        self.metrics = RoleMetrics("labeler", name)

    def _account(self, n_labels: int, unusable: int, t0: float) -> None:
        trim_heap()
        dt = time.perf_counter() - t0
        self.busy_s += dt
        self.metrics.inc("labels", n_labels)
        self.metrics.inc("unusable_labels", unusable)
        self.metrics.set("labels_per_s", n_labels / max(dt, 1e-9))
        self.metrics.observe("batch_s", dt)

    def info(self) -> dict:
        engine = self.judge.engine
        return {"name": self.name, "pid": os.getpid(), "busy_s": self.busy_s,
                "truncated_prompts": self.judge.truncated, "unusable_labels": self.unusable,
                "endpoint_retries": getattr(engine, "retries", 0),
                "labels_outside_top_k": getattr(engine, "labels_outside_top_k", 0)}

    def score(self, rollouts: pa.RecordBatch, mode: str = "direct") -> pa.RecordBatch:
        """Rollouts -> scored rollouts (the SCORED schema)."""
        schemas.check(rollouts, schemas.ROLLOUT, f"{self.name}.score input")
        t0 = time.perf_counter()
        contexts = rollouts.column("context").to_pylist()
        responses = rollouts.column("response_text").to_pylist()
        if mode == "direct":
            rewards, raws, metas = self.judge.score(contexts, responses)
            metas = [json.dumps({**json.loads(m), "labeler": self.name}) for m in metas]
        elif mode == "pairwise":
            rewards, raws, metas = self._pairwise(rollouts, contexts, responses)
        else:
            raise ValueError(f"reward.source: unknown mode {mode!r}")
        ok = [json.loads(m).get("label_mass", 1.0) >= self.min_label_mass for m in metas]
        self.unusable += ok.count(False)
        out = schemas.extend(rollouts, schemas.SCORED, {"reward": rewards, "raw_score": raws, "reward_meta": metas,
                                                        "reward_ok": ok})
        self._account(len(rewards), ok.count(False), t0)
        return out

    def _pairwise(self, rollouts, contexts, responses):
        """Samples (0,1), (2,3), ... of each prompt are compared; both orders, one batch."""
        prompt_ids = rollouts.column("prompt_id").to_pylist()
        samples = rollouts.column("sample_index").to_pylist()
        index = {(p, s): i for i, (p, s) in enumerate(zip(prompt_ids, samples))}
        pairs = []
        for (p, s), i in index.items():
            if s % 2 == 0:
                if (p, s + 1) not in index:
                    raise ValueError(f"pairwise reward: rollout {p}:{s} has no partner sample {s + 1}")
                pairs.append((i, index[(p, s + 1)]))
        p_a, p_ab, p_ba = self.judge.prefer([contexts[i] for i, _ in pairs], [responses[i] for i, _ in pairs],
                                            [responses[j] for _, j in pairs], self.options)
        import torch

        rewards, raws, metas = [0.0] * len(responses), [0.0] * len(responses), [""] * len(responses)
        for (i, j), pa_, ab, ba, mass in zip(pairs, p_a, p_ab, p_ba, self.judge.last_pair_mass):
            r_a, r_b = scoring.pairwise_rewards(torch.tensor(pa_, device="cpu"))
            meta = {"mode": "pairwise", "labeler": self.name, "p_ab": round(ab, 4), "p_ba": round(ba, 4),
                    "label_mass": round(mass, 4)}
            rewards[i], raws[i], metas[i] = float(r_a), pa_, json.dumps({**meta, "vs": j})
            rewards[j], raws[j], metas[j] = float(r_b), 1 - pa_, json.dumps({**meta, "vs": i})
        return rewards, raws, metas

    def score_texts(self, contexts: list[str], responses: list[str]) -> list[float]:
        return self.judge.score(contexts, responses)[0]

    def compare(self, contexts: list[str], a: list[str], b: list[str]) -> dict:
        """Evaluation: debiased P(a preferred over b) per pair (the config's pairwise prompt),
        both orders, and the label tokens' probability mass (low mass: unusable, counted)."""
        t0 = time.perf_counter()
        p_a, p_ab, p_ba = self.judge.prefer(contexts, a, b, self.options)
        mass = list(self.judge.last_pair_mass)
        self._account(len(p_a), sum(1 for m in mass if m < self.min_label_mass), t0)
        return {"p_a": p_a, "p_ab": p_ab, "p_ba": p_ba, "label_mass": mass}

    def judge_alone(self, contexts: list[str], responses: list[str], scorer: str) -> dict:
        """Evaluation: each response judged on its own by a scorer (the harmless rate, or
        eval.judge=scorer): its raw value, the reward mapped to [0, 1], the label mass."""
        t0 = time.perf_counter()
        rewards, raws, metas = self.judge.score(contexts, responses, scorer)
        mass = [json.loads(m)["label_mass"] for m in metas]
        self._account(len(raws), sum(1 for m in mass if m < self.min_label_mass), t0)
        # score01: the reward mapped to [0, 1] (P(Yes) for yes/no scorers, (score - 1) / 9 for 1-10)
        return {"p_yes": raws, "score01": [(r + 1) / 2 for r in rewards], "label_mass": mass}

    def prefer(self, contexts: list[str], a: list[str], b: list[str], options: dict | None = None):
        """Debiased pairwise preferences; `options` override PairwiseOptions fields of the
        config's (task, preamble, cot, ...). Returns (p_a, P_ab, P_ba)."""
        import dataclasses

        return self.judge.prefer(contexts, a, b, dataclasses.replace(self.options, **(options or {})))

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Ray Data: PAIRS rows -> LABELS rows. Rows flagged bad on input, and rows the
        labeler fails on or cannot read a label for, come out with `error` set, never dropped."""
        t0 = time.perf_counter()
        rows = batch.to_pylist()
        out = [{**{k: r.get(k) for k in schemas.PAIRS.names}, "p_a": None, "p_ab": None, "p_ba": None,
                "label_mass": None, "rationale": None, "labeler": self.tag, "prompt_config": self.prompt_config}
               for r in rows]
        todo = [i for i, r in enumerate(out) if not r["error"]]
        try:
            self._label(out, todo)
        except Exception:  # noqa: BLE001 - find the row(s) at fault, label the rest
            for i in todo:
                try:
                    self._label(out, [i])
                except Exception as e:  # noqa: BLE001
                    out[i]["error"] = f"labeler {self.tag}: {type(e).__name__}: {e}"[:2000]
        self._account(len(out), sum(1 for r in out if r["error"]), t0)
        return pa.Table.from_pylist(out, schema=schemas.LABELS)

    def _label(self, out: list[dict], idx: list[int]) -> None:
        if not idx:
            return
        p_a, p_ab, p_ba = self.judge.prefer([out[i]["context"] for i in idx], [out[i]["response_a"] for i in idx],
                                            [out[i]["response_b"] for i in idx], self.options)
        mass = self.judge.last_pair_mass
        rats = self.judge.last_pair_rationales
        for j, i in enumerate(idx):
            row = out[i]
            row.update(p_ab=p_ab[j], p_ba=None if p_ba[j] != p_ba[j] else p_ba[j], label_mass=mass[j])
            if rats:
                row["rationale"] = json.dumps(rats[j])
            if mass[j] < self.min_label_mass or p_a[j] != p_a[j]:
                self.unusable += 1
                row["error"] = (f"unusable label: '1'/'2' held {mass[j]:.3g} of the next-token probability "
                                f"(reward.min_label_mass={self.min_label_mass})")
            else:
                row["p_a"] = p_a[j]

    def last_rationales(self) -> list[list[str]]:
        return self.judge.last_rationales

    def signal(self, rows: list[dict], n: int) -> dict:
        return measure_signal(self.judge, rows, n)
