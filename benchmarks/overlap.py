"""Overlap: completions/s of the same config with max_staleness 1 against 0, alternated
(0 1 0 1 ...) in one process on one Ray instance; also each stage's busy share.

    python -m benchmarks.overlap configs/quickstart.yaml --pairs 3 --set rl.steps=4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load() -> tuple[float, float, float]:
    return os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "overlap.json"))
    args = ap.parse_args()

    import ray

    from rlaif_ray.config import load_config
    from rlaif_ray.driver import start_ray, train

    base = ["eval.num_prompts=0", "eval.signal_posts=0", "run.log_rollouts=false"] + args.overrides
    start_ray(load_config(args.config, base))
    runs = []
    load_before = load()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for staleness in (0, 1):
                cfg = load_config(args.config, base + [f"rl.max_staleness={staleness}"])
                out = train(cfg, Path(tmp) / f"run{i}-{staleness}", log=lambda *_: None)
                s = json.loads((out / "summary.json").read_text())
                runs.append({"max_staleness": staleness, "completions_per_s": s["completions_per_s"],
                             "loop_s": s["loop_s"], "stage_busy_s": s["stage_busy_s"]})
                print(json.dumps(runs[-1]), flush=True)
    ray.shutdown()
    med = {k: statistics.median(r["completions_per_s"] for r in runs if r["max_staleness"] == k) for k in (0, 1)}
    result = {"what": "completions/s, max_staleness 1 vs 0 (median of alternated runs)",
              "config": args.config, "overrides": base, "pairs": args.pairs,
              "completions_per_s_staleness0": med[0], "completions_per_s_staleness1": med[1],
              "ratio_1_over_0": med[1] / med[0], "load_before": load_before, "load_after": load(),
              "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"ratio (staleness 1 / 0): {result['ratio_1_over_0']:.3f}  "
          f"({med[1]:.3f} vs {med[0]:.3f} completions/s)")


if __name__ == "__main__":
    main()
