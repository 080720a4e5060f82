"""The learner's AdamW step by kernel: torch's single-tensor loop (what the CPU learner ran
before) against the fused kernel (what it runs now), alternated on one loaded model in one
process (no Ray), at each thread count given.

    python -m benchmarks.adamw [--rounds 3] [--steps 3] [--threads 1,2]

Per round, kernel and thread count: a fresh AdamW over the policy's parameters, one warm-up
step (it allocates the moments), then `--steps` timed steps on fixed random gradients. Also
the largest difference between the two kernels' weights after the warm-up and timed steps,
and the peak RSS each step adds over the moments (the fused kernel allocates nothing).
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
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="torch thread counts (1: an overlapped actor's, 2: synchronous)")
    ap.add_argument("--out", default=str(RESULTS / "adamw.json"))
    args = ap.parse_args()

    import torch

    from benchmarks.overhead import versions
    from rlaif_ray.engines.models import load_model
    from rlaif_ray.rl.learner import ADAMW_KERNEL
    from rlaif_ray.run.memory import PeakRSS

    # the loop the CPU learner ran before, and the kernel PolicyLearner runs
    kernels = {"single-tensor loop (before)": dict(foreach=False), "fused (now)": ADAMW_KERNEL}
    load_before, t_start = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    model = load_model(args.model, "float32")
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    grads = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in start.items()}
    threads = [int(t) for t in args.threads.split(",")]
    runs, final = [], {}
    for rnd in range(args.rounds):
        for n in threads:
            torch.set_num_threads(n)
            names = list(kernels) if rnd % 2 == 0 else list(kernels)[::-1]  # alternate who goes first
            for name in names:
                with torch.no_grad():
                    for k, p in model.named_parameters():
                        p.copy_(start[k])
                opt = torch.optim.AdamW(model.parameters(), lr=3e-5, **kernels[name])
                times, extra = [], []
                for i in range(args.steps + 1):
                    for k, p in model.named_parameters():
                        p.grad = grads[k]
                    with PeakRSS() as mem:
                        t0 = time.perf_counter()
                        opt.step()
                        dt = time.perf_counter() - t0
                    if i:  # the first step allocates the moments
                        times.append(dt)
                        extra.append(mem.extra_mb)
                    opt.zero_grad(set_to_none=True)
                final[name] = {k: p.detach().clone() for k, p in model.named_parameters()}
                runs.append({"round": rnd, "threads": n, "kernel": name, "step_s": times,
                             "step_s_median": statistics.median(times), "extra_mb_max": max(extra)})
                print(json.dumps(runs[-1]), flush=True)
                del opt
    a, b = (final[k] for k in kernels)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    medians = {str(n): {name: statistics.median(r["step_s_median"] for r in runs if r["threads"] == n
                                                and r["kernel"] == name) for name in kernels} for n in threads}
    result = {"what": "one AdamW step over every parameter of the policy, by kernel, alternated",
              "model": args.model, "parameters": sum(v.numel() for v in start.values()), "rounds": args.rounds,
              "steps": args.steps, "medians": medians,
              "speedup": {n: m[list(kernels)[0]] / m[list(kernels)[1]] for n, m in medians.items()},
              "extra_mb_max": {name: max(r["extra_mb_max"] for r in runs if r["kernel"] == name) for name in kernels},
              "max_abs_weight_diff": diff, "load_before": load_before, "load_after": os.getloadavg(),
              "cpus": os.cpu_count(), "versions": versions(), "time": t_start, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for n, m in medians.items():
        print(f"{n} thread(s): " + ", ".join(f"{k} {v:.3f} s" for k, v in m.items()) +
              f"; {result['speedup'][n]:.2f}x")
    print(f"largest weight difference after {args.steps + 1} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
