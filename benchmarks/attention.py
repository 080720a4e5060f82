"""Attention on CPU: transformers' "sdpa" (KV heads copied to every query head under a mask)
against rlaif_ray.cpu.attention's grouped-query SDPA (no copies), on the quickstart's work,
alternated on one loaded model in one process (no Ray).

    python -m benchmarks.attention [--rounds 3] [--batches 3]

Per round and implementation: the generator's batches (rl.prompts_per_step prompts x
rl.samples_per_prompt samples, lm.sample as HFEngine.generate runs it, the same seeds), then the
learner's forward and backward over those samples (lm.shared_prompt_logprobs with gradient
checkpointing, as rl.shared_prompts runs it). Checked: the same tokens and behaviour log-probs
from both, and the learner's log-probs to the bit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the synchronous quickstart's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (tests: a tiny model)")
    ap.add_argument("--out", default=str(RESULTS / "attention.json"))
    args = ap.parse_args()

    import torch

    from benchmarks.overhead import versions
    from rlaif_ray.config import load_config
    from rlaif_ray.cpu import attention
    from rlaif_ray.data.tasks import PromptSampler, task_prompts
    from rlaif_ray.engines import lm
    from rlaif_ray.engines.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    rl, g = cfg.rl, cfg.generation
    tok = load_tokenizer(cfg.model.name)
    model = load_model(cfg.model.name, "float32")
    mc = model.config
    sampler = PromptSampler(task_prompts(cfg.task, tok).train, rl.seed)
    batches = [[it["prompt_token_ids"] for it in sampler.next(rl.prompts_per_step) for _ in range(rl.samples_per_prompt)]
               for _ in range(args.batches)]
    impls = {"sdpa (transformers: KV heads copied)": "sdpa", "grouped-query SDPA (shipped on CPU)": attention.NAME}
    load_before, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs, samples, learner_logp = [], {}, {}
    for r in range(args.rounds):
        for name in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
            model.set_attn_implementation(impls[name])
            model.eval()
            t0 = time.perf_counter()
            out = [lm.sample(model, b, tok.pad_token_id, tok.eos_token_id, temperature=g.temperature, top_p=g.top_p,
                             top_k=g.top_k, max_new_tokens=g.max_new_tokens, seed=rl.seed + i)
                   for i, b in enumerate(batches)]
            gen_s = time.perf_counter() - t0
            samples.setdefault(name, [(toks, logps) for toks, logps, _ in out])
            model.train()
            model.gradient_checkpointing_enable()
            t0 = time.perf_counter()
            sums = []
            for b, (toks, _, _) in zip(batches, out):
                model.zero_grad(set_to_none=True)
                logp, _, _ = lm.shared_prompt_logprobs(model, b, toks, tok.pad_token_id, g.temperature)
                logp.sum().backward()
                sums.append(float(logp.detach().sum()))
            learn_s = time.perf_counter() - t0
            model.gradient_checkpointing_disable()
            learner_logp.setdefault(name, sums)
            n = sum(len(b) for b in batches)
            runs.append({"round": r, "variant": name, "generate_s": gen_s, "learner_s": learn_s,
                         "completions": n, "tokens": sum(len(t) for toks, _, _ in out for t in toks)})
            print(json.dumps(runs[-1]), flush=True)
    med = {name: {k: statistics.median(x[k] for x in runs if x["variant"] == name) for k in ("generate_s", "learner_s")}
           for name in impls}
    before, after = impls
    (a, b) = (samples[before], samples[after])
    result = {
        "what": f"{args.batches} quickstart batches ({rl.prompts_per_step} prompts x {rl.samples_per_prompt} samples, "
                f"up to {g.max_new_tokens} new tokens) sampled, then the learner's shared-prompt forward and backward "
                f"over them (gradient checkpointing), one process, {args.threads} torch threads; implementations "
                f"alternated on one model; medians of {args.rounds}",
        "config": args.config, "overrides": args.set, "model": cfg.model.name,
        "heads": {"query": mc.num_attention_heads, "kv": mc.num_key_value_heads}, "rounds": args.rounds,
        "medians": med, "speedup": {k: med[before][k] / med[after][k] for k in ("generate_s", "learner_s")},
        "same_samples": [x[0] for x in a] == [x[0] for x in b] and [x[1] for x in a] == [x[1] for x in b],
        "same_learner_logprobs": learner_logp[before] == learner_logp[after],
        "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(), "versions": versions(),
        "time": started, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("medians", "speedup", "same_samples", "same_learner_logprobs")}))


if __name__ == "__main__":
    main()
