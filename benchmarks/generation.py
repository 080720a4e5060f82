"""Generation throughput, alternated in one run (A B C A B C ...):
  - `hf` RolloutGenerator actor, the `vllm` RolloutGenerator actor holding its weights in bf16
    (`vllm-bf16`) and in fp32 (`vllm-fp32`, pipeline.generators.vllm.dtype), and
    `model.generate` called directly in this process (no Ray, no Arrow), same model, prompts
    and lengths; which of the two vLLM dtypes rlaif_ray.engines.devices.vllm_dtype picks for this CPU
    (auto) is recorded, and compared with the hf actor;
  - the time one weight update takes to install in each actor.

    python -m benchmarks.generation --rounds 3 --batch 8 --new-tokens 64 [--backends hf,vllm-bf16,vllm-fp32,direct]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from benchmarks.overhead import versions

RESULTS = Path(__file__).parent / "results"
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # the vllm-* variants' suffix -> the engine's vllm.dtype


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--backends", default="hf,vllm-bf16,vllm-fp32,direct")
    ap.add_argument("--out", default=str(RESULTS / "generation.json"))
    args = ap.parse_args()

    import ray
    import torch

    from actors.generator import generator_actor
    from rlaif_ray.config import GenerationConfig, TaskConfig
    from rlaif_ray.data.tasks import build_prompts, load_tldr, prompt_batch
    from rlaif_ray.engines import lm
    from rlaif_ray.engines.devices import cpu_capabilities, vllm_dtype
    from rlaif_ray.engines.models import load_model, load_tokenizer

    torch.set_num_threads(1)  # the same single thread an actor gets
    tok = load_tokenizer(args.model)
    items = build_prompts(load_tldr()[:300], tok, TaskConfig(max_prompt_tokens=320, heldout_size=1)).train[:args.batch]
    batch = prompt_batch(items)
    backends = args.backends.split(",")
    ray.init(num_cpus=2, include_dashboard=False)
    actors, direct = {}, None
    share = 2 / max(1, sum(b != "direct" for b in backends))  # the actors take turns: all of them fit on 2 CPUs
    for b in backends:
        if b not in ("hf", "vllm", "vllm-bf16", "vllm-fp32", "direct"):
            raise SystemExit(f"--backends: unknown {b!r} (hf, vllm, vllm-bf16, vllm-fp32, direct)")
        if b == "direct":
            direct = load_model(args.model)
            continue
        backend, _, dtype = b.partition("-")  # vllm-bf16, vllm-fp32: the engine's vllm.dtype
        gen = GenerationConfig(backend=backend, max_new_tokens=args.new_tokens).model_dump()
        engine = {"dtype": DTYPES[dtype]} if dtype else None
        actors[b] = generator_actor().options(num_cpus=min(1.0, share)).remote(
            f"generator-{b}", args.model, "float32", gen, 1, "cpu", engine)
    for b, a in actors.items():  # warm-up (vLLM's first call is slow)
        ray.get(a.generate.remote(batch, 0, 1, 0))
    samples: dict = {b: [] for b in backends}
    load_before, t_start = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for r in range(args.rounds):
        for b in backends:
            t0 = time.perf_counter()
            if b == "direct":
                toks, _, _ = lm.sample(direct, [it["prompt_token_ids"] for it in items], tok.pad_token_id,
                                       tok.eos_token_id, temperature=0.9, top_p=1.0, top_k=0,
                                       max_new_tokens=args.new_tokens, seed=r)
                n = sum(len(t) for t in toks)
            else:
                out = ray.get(actors[b].generate.remote(batch, r, 1, r))
                n = sum(len(t) for t in out.column("response_token_ids").to_pylist())
            dt = time.perf_counter() - t0
            samples[b].append({"tokens": n, "s": dt, "tokens_per_s": n / dt})
            print(json.dumps({"round": r, "backend": b, **samples[b][-1]}), flush=True)
    # one weight update per actor: the learner's weights (here: the model's own) staged, then installed
    from rlaif_ray.engines import weight_sync

    params = list(load_model(args.model).named_parameters())
    install, dtypes = {}, {b: ray.get(a.info.remote())["weight_dtype"] for b, a in actors.items()}
    for b, a in actors.items():
        # in the dtype the actor holds (the learner casts before sending)
        ref = ray.put(weight_sync.pack(params, dtypes[b]))
        t0 = time.perf_counter()
        ray.get(a.set_weights.remote(ref, 1))
        ray.get(a.digest.remote())
        install[b] = {"install_s": ray.get(a.info.remote())["last_install_s"],
                      "set_weights_and_install_wall_s": time.perf_counter() - t0}
    ray.shutdown()
    med = {b: statistics.median(x["tokens_per_s"] for x in samples[b]) for b in backends}
    auto = next(f"vllm-{k}" for k, v in DTYPES.items() if v == vllm_dtype("auto", "cpu"))  # what a run gets here
    picked = auto if auto in med else "vllm"  # (a plain `vllm` actor: the same rule)
    result = {"what": "generation tokens/s (median of alternated rounds) and weight-install time",
              "model": args.model, "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "tokens_per_s": med, "weight_dtype": dtypes, "auto_variant": auto, "weight_update": install,
              "load_before": load_before,
              "load_after": os.getloadavg(), "cpus": os.cpu_count(),
              "cpu_bf16": {k: bool(cpu_capabilities().get(k)) for k in ("avx512_f", "avx512_bf16", "amx_bf16")},
              "time": t_start, "machine": platform.machine(),
              "versions": versions(), "target": "hf actor / direct model.generate >= 0.9", "samples": samples}
    if picked in med and "hf" in med:
        result["ratio_vllm_over_hf"] = med[picked] / med["hf"]  # vLLM in the dtype a run gets here
    if "vllm-bf16" in med and "vllm-fp32" in med:  # > 1: the rule picks the faster dtype on this CPU
        other = "vllm-fp32" if auto == "vllm-bf16" else "vllm-bf16"
        result["ratio_auto_dtype_over_other"] = med[auto] / med[other]
    if "direct" in med and "hf" in med:
        result["ratio_hf_actor_over_direct"] = med["hf"] / med["direct"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
