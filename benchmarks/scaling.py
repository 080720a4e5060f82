"""Scaling model: predicted completions/s as the generator and labeler pools grow, from the
per-stage times measured by benchmarks/overlap.py (its synchronous runs), with the model of
rlaif_ray/run/scaling.py; also the model against the measured overlapped run.

    python -m benchmarks.scaling [--overlap benchmarks/results/overlap.json]

On a real cluster: run benchmarks.overlap there with the pools at 1, then with larger pools
(--set pipeline.generators.num_actors=G --set pipeline.labelers.num_actors=L) and compare
the measured completions/s with this table's row.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from rlaif_ray.run import scaling

RESULTS = Path(__file__).parent / "results"
FORMULA = ("T(d) = max(n t_g / G, n t_l / L', n t_t + t_s, (n t_g / G + n t_l / L' + n t_t + t_s) / d), "
           "throughput n / T(d); d = max_staleness + 1 (d = 1: synchronous, the sum of the stages; "
           "d -> inf: the slowest stage); L' = min(L, G)")


def _shown(path: str) -> str:
    """The path as the report shows it: relative to the repository when inside it."""
    p, root = Path(path).resolve(), Path(__file__).resolve().parents[1]
    return str(p.relative_to(root)) if p.is_relative_to(root) else p.name


def median_times(runs: list[dict]) -> scaling.StageTimes:
    ts = [scaling.stage_times(r["stage_busy_s"], r["loop_s"], r["completions"], r["steps"]) for r in runs]
    return scaling.StageTimes(**{f.name: statistics.median(getattr(t, f.name) for t in ts)
                                 for f in dataclasses.fields(scaling.StageTimes)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--overlap", default=str(RESULTS / "overlap.json"), help="benchmarks.overlap's result")
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--out", default=str(RESULTS / "scaling.json"))
    args = ap.parse_args()

    ov = json.loads(Path(args.overlap).read_text())
    sync = [r for r in ov["runs"] if r["max_staleness"] == 0]
    lagged = [r for r in ov["runs"] if r["max_staleness"] == 1]
    if not sync or "completions" not in sync[0]:
        raise SystemExit(f"{args.overlap}: no synchronous runs with per-stage times (re-run benchmarks.overlap)")
    t = median_times(sync)
    sizes = tuple(int(x) for x in args.sizes.split(","))
    measured = {"0": ov["completions_per_s_staleness0"], "1": ov["completions_per_s_staleness1"]}
    predicted = {"0": scaling.throughput(t, 1, 1, 0), "1": scaling.throughput(t, 1, 1, 1),
                 "inf": scaling.throughput(t, 1, 1, None)}
    check = {"measured_per_s": measured, "predicted_per_s": predicted,
             "measured_over_predicted": {k: measured[k] / predicted[k] for k in measured}}
    if lagged and "completions" in lagged[0]:
        # the overlapped run's own stage times (slower when stages share cores) with the sync run's t_s
        lt = median_times(lagged)
        contended = dataclasses.replace(lt, t_s=t.t_s)
        check["stage_s_per_completion_overlapped"] = {"t_g": lt.t_g, "t_l": lt.t_l, "t_t": lt.t_t}
        check["predicted_with_overlapped_stage_times_per_s"] = scaling.throughput(contended, 1, 1, 1)
    result = {"what": "predicted completions/s of the RL loop as the generator (G) and labeler (L) pools grow "
                      "(learner fixed), from the synchronous runs' per-stage times",
              "formula": FORMULA, "source": _shown(args.overlap), "source_time": ov.get("time"),
              "config": ov.get("config"), "overrides": ov.get("overrides"), "cpus": ov.get("cpus"),
              "load_before": ov.get("load_before"), "load_after": ov.get("load_after"),
              "versions": ov.get("versions"), "machine": ov.get("machine"),
              "stage_times": dataclasses.asdict(t), "bottleneck": scaling.bottleneck(t),
              "check_g1_l1": check, "table": scaling.table(t, sizes), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("stage_times", "bottleneck", "check_g1_l1")}, indent=1))


if __name__ == "__main__":
    main()
