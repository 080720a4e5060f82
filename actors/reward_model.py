"""RewardModel: a trained reward model (`rlaif-ray train-rm`) scoring rollout batches in the
RL pipeline (reward.source: rm). Same interface as the Labeler's `score`, so the driver
chains generator -> reward model exactly as generator -> labeler."""
from __future__ import annotations

import json
import time

import pyarrow as pa
import torch
from transformers import AutoModelForSequenceClassification

from rlaif_ray.data import schemas
from rlaif_ray.engines.devices import compute_dtype
from rlaif_ray.engines.models import load_tokenizer, quiet_transformers, resolve
from rlaif_ray.rl import supervised

from .process import ActorProcess


class RewardModel:
    def __init__(self, name: str, path: str, dtype: str = "auto", torch_threads: int = 1, device: str = "cpu",
                 batch_size: int = 8, max_tokens: int = 512):
        self.proc = ActorProcess("reward_model", name, torch_threads, device)
        quiet_transformers()
        self.name, self.path, self.device = name, path, device
        self.tok = load_tokenizer(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolve(path), dtype=compute_dtype(dtype, device), use_safetensors=True).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward.rm_path={path}: not a reward model (num_labels={self.model.config.num_labels}, "
                             "expected a scalar head from `rlaif-ray train-rm`)")
        self.pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else self.tok.pad_token_id
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.truncated = 0

    def info(self) -> dict:
        return self.proc.info(truncated_prompts=self.truncated)

    def score_texts(self, contexts: list[str], responses: list[str]) -> list[float]:
        seqs = []
        for c, r in zip(contexts, responses):
            ids, cut = supervised.encode(self.tok, supervised.rm_text(c, r), self.max_tokens)
            self.truncated += cut
            seqs.append(ids)
        out = []
        with torch.no_grad():
            for i in range(0, len(seqs), self.batch_size):
                out += supervised.scores(self.model, seqs[i:i + self.batch_size], self.pad, self.device).tolist()
        return out

    def score(self, rollouts: pa.RecordBatch, mode: str = "rm", reference_temperature: float | None = None,
              single: bool = False) -> pa.RecordBatch:
        """Rollouts -> scored rollouts; the reward is the RM's raw scalar score (docs/method.md §3).
        A reward model is not the reference policy: the learner computes the reference."""
        if reference_temperature is not None:
            raise ValueError("rl.reference=labeler needs an AI labeler holding the policy's model, not a reward model")
        schemas.check(rollouts, schemas.ROLLOUT, f"{self.name}.score input")
        t0 = time.perf_counter()
        with self.proc.busy():
            r = self.score_texts(rollouts.column("context").to_pylist(), rollouts.column("response_text").to_pylist())
        meta = json.dumps({"mode": "rm", "rm": self.path, "labeler": self.name})
        out = schemas.extend(rollouts, schemas.SCORED, {"reward": r, "raw_score": r, "reward_meta": [meta] * len(r),
                                                        "reward_ok": [True] * len(r),
                                                        "reference_logprobs": [None] * len(r),
                                                        "reward_parts": [None] * len(r)})
        self.proc.metrics.inc("labels", len(r))
        self.proc.metrics.set("labels_per_s", len(r) / max(time.perf_counter() - t0, 1e-9))
        return out
