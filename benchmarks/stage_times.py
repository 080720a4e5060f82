"""Stage times of one quickstart batch, with and without shared prompts, in one process (no
Ray): generation (prefill once per prompt or per row), the d-RLAIF scorer, and a learner step
(one packed sequence per prompt or one sequence per sample; with the reference forward, or
with reference log-probs carried in the batch as a labeler computes them). Same weights, same
seeds, same rows for both variants.

    python -m benchmarks.stage_times [--threads 1,2]   (prints one JSON line per thread count)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from rlaif_ray.config import load_config
from rlaif_ray.data.tasks import task_prompts
from rlaif_ray.engines import lm, load_engine
from rlaif_ray.engines.models import load_tokenizer
from rlaif_ray.feedback.labeling import load_judge
from rlaif_ray.rl.learner import PolicyLearner, loss_normalisers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    cfg = load_config(args.config)
    tok = load_tokenizer(cfg.model.name)
    items = task_prompts(cfg.task, tok).train[:cfg.rl.prompts_per_step]
    k = cfg.rl.samples_per_prompt
    prompts = [it["prompt_token_ids"] for it in items for _ in range(k)]
    contexts = [it["context"] for it in items for _ in range(k)]
    engine = load_engine("hf", cfg.model.name, "cpu", "auto")
    judge, _ = load_judge(cfg.reward, cfg.model.name, "auto", "cpu")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        res: dict = {"threads": threads, "load_before": os.getloadavg()}
        for share in (False, True):
            t0 = time.perf_counter()
            toks, lps, _ = lm.sample(engine.model, prompts, engine.pad, engine.eos, temperature=cfg.generation.temperature,
                                     top_p=1.0, top_k=0, max_new_tokens=cfg.generation.max_new_tokens, seed=1,
                                     share_prompts=share)
            res[f"generate_s shared={share}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        judge.score(contexts, [tok.decode(t, skip_special_tokens=True) for t in toks])
        res["score_s"] = time.perf_counter() - t0
        rows = [{"prompt_id": str(i // k), "prompt_token_ids": p, "response_token_ids": r, "behaviour_logprobs": lp,
                 "reward": 0.1 * i, "reward_ok": True, "rollout_id": str(i), "batch_index": 0}
                for i, (p, r, lp) in enumerate(zip(prompts, toks, lps))]
        norm = loss_normalisers(toks, [True] * len(toks))
        for shared in (False, True):
            learner = PolicyLearner(cfg.model.name, cfg.rl.model_copy(update={"shared_prompts": shared}),
                                    cfg.generation.temperature)
            learner.step(rows, *norm)  # warm-up
            t0 = time.perf_counter()
            learner.step(rows, *norm)
            res[f"learner_step_s shared={shared}"] = time.perf_counter() - t0
            ref = learner.logprobs(prompts, toks, reference=True)
            t0 = time.perf_counter()
            learner.step([dict(r, reference_logprobs=x) for r, x in zip(rows, ref)], *norm)
            res[f"learner_step_s shared={shared}, reference from the batch"] = time.perf_counter() - t0
            del learner
        res["load_after"] = os.getloadavg()
        res["prompt_tokens"] = [len(p) for p in prompts[::k]]
        res["response_tokens"] = [len(t) for t in toks]
        print(json.dumps({key: (round(v, 2) if isinstance(v, float) else v) for key, v in res.items()}), flush=True)


if __name__ == "__main__":
    main()
