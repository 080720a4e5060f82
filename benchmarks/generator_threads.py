"""Generator threads: back-to-back batches on the RolloutGenerator actor as it ships (compute
calls in one thread, set_weights/info in a "control" thread: actors.generator.generator_actor)
against the same actor with two threads for every call (max_concurrency=2, as it ran before),
alternated, fresh actors each round, on a local Ray.

    python -m benchmarks.generator_threads [--rounds 3] [--batches 4]

Each round submits --batches quickstart batches (rl.prompts_per_step prompts x
rl.samples_per_prompt samples, the same prompts and seeds for both variants) at once, as
`rlaif-ray eval` and `sample-pairs` do, and times them to the last result. With two threads,
calls land on either: each thread that computes starts its own OpenMP team, and libgomp, with
more OpenMP threads than cores, stops spinning at its barriers. Reported per variant: seconds,
completions/s, how many threads ran compute calls (the actor's info) and how many threads of the
process used over a second of CPU (the one that loaded the model, and OpenMP workers, included).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"one compute thread (shipped)": 1, "two threads (max_concurrency=2)": 2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="the actor's torch threads (the synchronous quickstart's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (tests: a tiny model)")
    ap.add_argument("--out", default=str(RESULTS / "generator_threads.json"))
    args = ap.parse_args()

    import psutil
    import ray

    from actors.generator import generator_actor
    from benchmarks.overhead import versions
    from rlaif_ray.config import load_config
    from rlaif_ray.data.tasks import PromptSampler, prompt_batch, task_prompts
    from rlaif_ray.engines.models import load_tokenizer

    cfg = load_config(args.config, args.set)
    rl = cfg.rl
    items = task_prompts(cfg.task, load_tokenizer(cfg.model.name)).train
    sampler = PromptSampler(items, rl.seed)
    batches = [prompt_batch(sampler.next(rl.prompts_per_step)) for _ in range(args.batches)]
    load_before, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    runs = []
    try:
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            for name in order:
                gen = generator_actor().options(max_concurrency=VARIANTS[name], num_cpus=0.5, runtime_env={
                    "env_vars": {"OMP_NUM_THREADS": str(args.threads)}}).remote(
                    "generator-0", cfg.model.name, cfg.model.dtype, cfg.generation.model_dump(), args.threads)
                pid = ray.get(gen.info.remote())["pid"]
                t0 = time.perf_counter()
                out = ray.get([gen.generate.remote(b, i, rl.samples_per_prompt, rl.seed + i)
                               for i, b in enumerate(batches)])
                wall = time.perf_counter() - t0
                info = ray.get(gen.info.remote())
                cpu = [t.user_time + t.system_time for t in psutil.Process(pid).threads()]
                ray.kill(gen)
                completions = sum(b.num_rows for b in out)
                runs.append({"round": r, "variant": name, "max_concurrency": VARIANTS[name], "wall_s": wall,
                             "completions": completions, "completions_per_s": completions / wall,
                             "compute_threads": info["compute_threads"],
                             "threads_over_1_cpu_s": sum(c > 1.0 for c in cpu),
                             "tokens": [sum(len(t) for t in b.column("response_token_ids").to_pylist()) for b in out]})
                print(json.dumps(runs[-1]), flush=True)
                time.sleep(2)  # the killed actor's process gone before the next starts
    finally:
        ray.shutdown()

    med = {name: statistics.median(x["wall_s"] for x in runs if x["variant"] == name) for name in VARIANTS}
    one, two = VARIANTS
    pairs = [a["wall_s"] / b["wall_s"] for a in runs if a["variant"] == two
             for b in runs if b["variant"] == one and b["round"] == a["round"]]
    result = {
        "what": f"{args.batches} quickstart batches ({rl.prompts_per_step} prompts x {rl.samples_per_prompt} samples, "
                f"up to {cfg.generation.max_new_tokens} new tokens) submitted at once to one RolloutGenerator "
                f"({args.threads} torch threads), fresh actor per run, variants alternated; medians of {args.rounds}",
        "config": args.config, "overrides": args.set, "model": cfg.model.name, "rounds": args.rounds,
        "wall_s_median": med, "speedup_one_thread": med[two] / med[one], "pair_speedups": pairs,
        "same_samples": len({json.dumps(x["tokens"]) for x in runs}) == 1,
        "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(), "versions": versions(),
        "time": started, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("wall_s_median", "speedup_one_thread", "pair_speedups", "same_samples")}))


if __name__ == "__main__":
    main()
