"""Labeler: the frozen AI judge. Scores rollout batches (d-RLAIF direct scores, or
debiased pairwise preferences between two samples of the same prompt)."""
from __future__ import annotations

import json
import os
import time

import pyarrow as pa

from rlaif_ray import schemas, scoring
from rlaif_ray.labeling import Judge
from rlaif_ray.signal import measure_signal


class Labeler:
    def __init__(self, name: str, model_name: str, dtype: str, scorer: str, batch_size: int,
                 torch_threads: int, device: str = "cpu", backend: str = "hf", min_label_mass: float = 0.0):
        import torch

        from rlaif_ray.models import load_model, load_tokenizer

        torch.set_num_threads(torch_threads)
        self.name, self.min_label_mass = name, min_label_mass
        self.unusable = 0  # labels whose tokens held too little probability (counted)
        if backend == "vllm":
            from actors.vllm_engine import VLLMEngine

            engine = VLLMEngine(model_name, "bfloat16" if dtype == "float32" else dtype, device)
        else:
            engine = load_model(model_name, dtype).to(device)
        self.judge = Judge(engine, load_tokenizer(model_name), scorer, batch_size)
        self.busy_s = 0.0

    def info(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "busy_s": self.busy_s,
                "truncated_prompts": self.judge.truncated, "unusable_labels": self.unusable}

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
        self.busy_s += time.perf_counter() - t0
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
                                            [responses[j] for _, j in pairs])
        import torch

        rewards, raws, metas = [0.0] * len(responses), [0.0] * len(responses), [""] * len(responses)
        for (i, j), pa_, ab, ba, mass in zip(pairs, p_a, p_ab, p_ba, self.judge.last_pair_mass):
            r_a, r_b = scoring.pairwise_rewards(torch.tensor(pa_))
            meta = {"mode": "pairwise", "labeler": self.name, "p_ab": round(ab, 4), "p_ba": round(ba, 4),
                    "label_mass": round(mass, 4)}
            rewards[i], raws[i], metas[i] = float(r_a), pa_, json.dumps({**meta, "vs": j})
            rewards[j], raws[j], metas[j] = float(r_b), 1 - pa_, json.dumps({**meta, "vs": i})
        return rewards, raws, metas

    def score_texts(self, contexts: list[str], responses: list[str]) -> list[float]:
        return self.judge.score(contexts, responses)[0]

    def prefer(self, contexts: list[str], a: list[str], b: list[str], options: dict | None = None):
        """Debiased pairwise preferences; `options` are PairwiseOptions fields (task,
        preamble, cot, ...). Returns (p_a, P_ab, P_ba)."""
        from rlaif_ray.labeling import PairwiseOptions

        return self.judge.prefer(contexts, a, b, PairwiseOptions(**(options or {})))

    def last_rationales(self) -> list[list[str]]:
        return self.judge.last_rationales

    def signal(self, rows: list[dict], n: int) -> dict:
        return measure_signal(self.judge, rows, n)
