"""The learner's memory allocator (rl.release_memory): step time and peak memory of one
learner process under glibc's default malloc, glibc with the fixed mmap threshold (the old
setting), and the jemalloc Ray ships (the current one), alternated in one run.

    python -m benchmarks.learner_malloc [--rounds 2] [--steps 3]

Each variant is a fresh process (an allocator is chosen at process start) running
PolicyLearner.step on the TRL comparison's batch (configs/quickstart.yaml with
benchmarks.trl_compare's settings: 4 real prompts of up to 400 tokens x 2 responses of 48
tokens, gradient checkpointing, the reference log-probs in the batch as the labeler computes
them), one warm-up step and then `--steps` timed ones; peak RSS is the process's high-water
mark (getrusage), RSS after is after the last step's release_heap. Writes
results/learner_malloc.json; BENCHMARKS.md shows it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.overhead import env_without_allocator, versions

RESULTS = Path(__file__).parent / "results"


def variants() -> dict[str, dict[str, str]]:
    from actors.ray_session import GLIBC_LEARNER
    from rlaif_ray.cpu.allocator import bundled_jemalloc

    out = {"glibc default": {}, "glibc, fixed mmap threshold 64 KiB (before)": dict(GLIBC_LEARNER)}
    if bundled_jemalloc():
        out["jemalloc (Ray's, now)"] = {"LD_PRELOAD": bundled_jemalloc()}
    return out


def child(steps: int, threads: int, overrides: list[str]) -> None:
    import resource

    import psutil
    import torch

    from benchmarks.trl_compare import SHARED
    from rlaif_ray.config import load_config
    from rlaif_ray.cpu.allocator import allocator
    from rlaif_ray.data.tasks import task_prompts
    from rlaif_ray.engines.models import load_tokenizer
    from rlaif_ray.rl.learner import PolicyLearner, loss_normalisers

    torch.set_num_threads(threads)
    cfg = load_config("configs/quickstart.yaml", SHARED + overrides)
    tok = load_tokenizer(cfg.model.name)
    k, n = cfg.rl.samples_per_prompt, cfg.generation.max_new_tokens
    items = task_prompts(cfg.task, tok).train[:cfg.rl.prompts_per_step]
    prompts = [it["prompt_token_ids"] for it in items for _ in range(k)]
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(100, tok.vocab_size - 100, (n,), generator=g).tolist() for _ in prompts]
    rows = [{"prompt_id": str(i // k), "prompt_token_ids": p, "response_token_ids": r, "behaviour_logprobs": [-1.0] * n,
             "reference_logprobs": [-1.1] * n, "reward": 0.1 * i, "reward_ok": True, "rollout_id": str(i),
             "batch_index": 0} for i, (p, r) in enumerate(zip(prompts, responses))]
    norm = loss_normalisers(responses, [True] * len(rows))
    learner = PolicyLearner(cfg.model.name, cfg.rl, cfg.generation.temperature, reference=False)
    learner.step(rows, *norm)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        learner.step(rows, *norm)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"allocator": allocator(), "step_s": times,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "rss_after_gib": psutil.Process().memory_info().rss / 2**30,
                      "prompt_tokens": [len(p) for p in prompts[::k]]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "learner_malloc.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.steps, args.threads, args.overrides)
    runs, t_start, load_before = [], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()
    base = env_without_allocator()
    for i in range(args.rounds):
        for name, env in variants().items():
            argv = [sys.executable, "-m", "benchmarks.learner_malloc", "--child", "--steps", str(args.steps),
                    "--threads", str(args.threads), *[x for o in args.overrides for x in ("--set", o)]]
            out = subprocess.run(argv, env={**base, "HF_HUB_OFFLINE": "1", **env}, cwd=Path(__file__).parents[1],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{name}: {out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            # the library's place inside the ray package, not this machine's path
            shown = {k: (v.split("site-packages/")[-1] if k == "LD_PRELOAD" else v) for k, v in env.items()}
            runs.append({"variant": name, "round": i, "env": shown, **r, "step_s_median": statistics.median(r["step_s"])})
            print(json.dumps({k: runs[-1][k] for k in ("variant", "allocator", "step_s_median", "peak_rss_gib")}),
                  flush=True)
    names = list(variants())
    medians = {n: {k: statistics.median(r[k] for r in runs if r["variant"] == n)
                   for k in ("step_s_median", "peak_rss_gib", "rss_after_gib")} for n in names}
    result = {"what": "one learner process's step time and peak RSS by allocator, alternated", "rounds": args.rounds,
              "steps": args.steps, "threads": args.threads, "overrides": args.overrides, "medians": medians,
              "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(),
              "versions": versions(), "time": t_start, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for n in names:
        m = medians[n]
        print(f"{n}: step {m['step_s_median']:.2f} s, peak RSS {m['peak_rss_gib']:.2f} GiB, "
              f"after {m['rss_after_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
