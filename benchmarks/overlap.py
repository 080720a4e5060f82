"""Overlap: completions/s of the same config with max_staleness 1 against 0, alternated
(0 1 0 1 ...) in one process on one Ray instance; also each stage's busy and idle share
from the actors' own timers, the slowest stage, and how close each run gets to the bound
it sets (completions / the slowest stage's busy seconds).

    python -m benchmarks.overlap configs/quickstart.yaml --pairs 3

Loop time: from the first step to the end of the last one (metrics.jsonl's elapsed_s);
model loading and the final checkpoint write are outside it. Also the rate after step 1
(its end to the end of the last step): the overlapped mode's first step fills the pipeline
(the learner waits for a first batch generated and labeled with nothing to overlap), a fixed
cost that weighs more the fewer steps a run has; after it, the loop's steady rate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.overhead import versions

RESULTS = Path(__file__).parent / "results"
FIXED = ["eval.num_prompts=0", "eval.signal_posts=0", "run.log_rollouts=false", "run.report=false",
         "run.trackers=[]", "run.progress=false"]
STAGES = (("generator", ("generator",)), ("labeler", ("labeler", "reward-model")), ("learner", ("learner",)))


def load() -> tuple[float, float, float]:
    return os.getloadavg()


def stage_seconds(busy: dict[str, float]) -> dict[str, float]:
    """Busy seconds per stage, per actor of its pool (a pool of k actors does k seconds of
    work per second); learner ranks share one batch, so the slowest rank counts."""
    out = {}
    for stage, prefixes in STAGES:
        xs = [v for k, v in busy.items() if k.startswith(prefixes)]
        if xs:
            out[stage] = max(xs) if stage == "learner" else sum(xs) / len(xs)
    return out


def describe(run_dir: Path, staleness: int) -> dict:
    from rlaif_ray.run.folder import read_metrics

    rows = read_metrics(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    completions, loop_s = sum(r["completions"] for r in rows), rows[-1]["elapsed_s"]
    stages = stage_seconds(s["stage_busy_s"])
    slowest = max(stages, key=stages.get)
    bound = completions / stages[slowest]
    cps = completions / loop_s
    after1 = (completions - rows[0]["completions"]) / (loop_s - rows[0]["elapsed_s"]) if len(rows) > 1 else None
    return {"max_staleness": staleness, "steps": len(rows), "completions": completions, "loop_s": loop_s,
            "completions_per_s": cps, "step1_s": rows[0]["elapsed_s"], "completions_per_s_after_step1": after1,
            "stage_busy_s": s["stage_busy_s"], "stage_s": stages,
            "busy_share": {k: v / loop_s for k, v in stages.items()},
            "idle_share": {k: 1 - v / loop_s for k, v in stages.items()},
            "slowest_stage": slowest, "slowest_stage_bound_per_s": bound, "of_bound": cps / bound,
            "summary_loop_s": s["loop_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "overlap.json"))
    args = ap.parse_args()

    import ray

    from actors.ray_session import start_ray
    from rlaif_ray.commands.train import train
    from rlaif_ray.config import load_config

    base = FIXED + args.overrides
    start_ray(load_config(args.config, base).ray)
    runs = []
    load_before, t_start = load(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for staleness in (0, 1):
                cfg = load_config(args.config, base + [f"rl.max_staleness={staleness}"])
                out = train(cfg, Path(tmp) / f"run{i}-{staleness}", log=lambda *_: None)
                runs.append(describe(out, staleness))
                print(json.dumps(runs[-1]), flush=True)
    ray.shutdown()

    def med(k: int, f) -> float:
        return statistics.median(f(r) for r in runs if r["max_staleness"] == k)

    cps = {k: med(k, lambda r: r["completions_per_s"]) for k in (0, 1)}
    after1 = {k: med(k, lambda r: r["completions_per_s_after_step1"]) for k in (0, 1)} \
        if all(r["completions_per_s_after_step1"] for r in runs) else None
    stages = sorted(runs[0]["stage_s"])
    result = {"what": "completions/s, max_staleness 1 vs 0 (median of alternated runs)",
              "config": args.config, "overrides": base, "pairs": args.pairs,
              "completions_per_s_staleness0": cps[0], "completions_per_s_staleness1": cps[1],
              "ratio_1_over_0": cps[1] / cps[0],
              "pair_ratios": [b["completions_per_s"] / a["completions_per_s"] for a, b in zip(runs[::2], runs[1::2])],
              "completions_per_s_after_step1": {str(k): v for k, v in after1.items()} if after1 else None,
              "ratio_after_step1": after1[1] / after1[0] if after1 else None,
              "busy_share_median": {str(k): {s: med(k, lambda r: r["busy_share"][s]) for s in stages} for k in (0, 1)},
              "of_bound_median": {str(k): med(k, lambda r: r["of_bound"]) for k in (0, 1)},
              "load_before": load_before, "load_after": load(), "cpus": os.cpu_count(),
              "machine": platform.machine(), "versions": versions(), "time": t_start, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"ratio (staleness 1 / 0): {result['ratio_1_over_0']:.3f}  "
          f"({cps[1]:.3f} vs {cps[0]:.3f} completions/s)" +
          (f"; after step 1: {result['ratio_after_step1']:.3f}" if after1 else ""))


if __name__ == "__main__":
    main()
