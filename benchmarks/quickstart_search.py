"""Search the quickstart's settings by measures that are not its own reward (issue: the demo
must improve the policy, not please its judge). Each candidate is a full `rlaif-ray train
configs/quickstart.yaml --set ...` run, one after the other on this machine; what decides is
the paired change of the independent measures on the held-out prompts (ROUGE-L/ROUGE-1
against the human TL;DR, the commentary share, the debiased pairwise win rate against the
initial policy: docs/method.md §7.6), and whether the hacking detector fired. The training
reward's change is recorded beside them, never used to rank.

    python -m benchmarks.quickstart_search [--only NAME,...] [--set KEY=VALUE ...]

Appends to benchmarks/results/quickstart_search.json (a candidate run again replaces its
row); BENCHMARKS.md shows the table (benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.overhead import versions

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "quickstart_search.json"

# name -> overrides of configs/quickstart.yaml; the first is the hacked setting
CANDIDATES = {
    "about-fixed-lr3e-5": ["reward.scorer=yesno_about_chat", "rl.kl_control=fixed", "rl.lr=3e-5"],
    "about-adaptive-kl2": ["reward.scorer=yesno_about_chat", "rl.kl_control=adaptive", "rl.kl_target=2",
                           "rl.kl_horizon=64", "rl.lr=3e-5"],
    "good-adaptive-kl2": ["reward.scorer=yesno_good_chat", "rl.kl_control=adaptive", "rl.kl_target=2",
                          "rl.kl_horizon=64", "rl.lr=3e-5"],
    "score10-adaptive-kl2": ["reward.scorer=score10_chat", "rl.kl_control=adaptive", "rl.kl_target=2",
                             "rl.kl_horizon=64", "rl.lr=3e-5"],
    "good-fixed-lr1e-5": ["reward.scorer=yesno_good_chat", "rl.kl_control=fixed", "rl.lr=1e-5"],
    "accurate-adaptive-kl2": ["reward.scorer=yesno_accurate_chat", "rl.kl_control=adaptive", "rl.kl_target=2",
                              "rl.kl_horizon=64", "rl.lr=3e-5"],
    # a horizon of one step's completions: beta moves up to 20% a step (64 moved it 2.5%: too slow for 16 steps)
    "about-adaptive-kl2-h8-lr1e-5": ["reward.scorer=yesno_about_chat", "rl.kl_control=adaptive", "rl.kl_target=2",
                                     "rl.kl_horizon=8", "rl.lr=1e-5"],
    "good-adaptive-kl2-h8-lr1e-5": ["reward.scorer=yesno_good_chat", "rl.kl_control=adaptive", "rl.kl_target=2",
                                    "rl.kl_horizon=8", "rl.lr=1e-5"],
    "good-adaptive-kl2-h8-lr3e-5": ["reward.scorer=yesno_good_chat", "rl.kl_control=adaptive", "rl.kl_target=2",
                                    "rl.kl_horizon=8", "rl.lr=3e-5"],
}


def row_of(name: str, overrides: list[str], run: Path, wall_s: float, load: tuple) -> dict:
    s = json.loads((run / "summary.json").read_text())
    w = s.get("win_rate") or {}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"name": name, "overrides": overrides, "run": str(run), "wall_s": wall_s, "loop_s": s.get("loop_s"),
            "completions_per_s": s.get("completions_per_s"), "load_before": load, "load_after": os.getloadavg(),
            "reward_change": s.get("heldout_change"), "independent": s.get("independent"),
            "hacking": s.get("hacking"), "win_rate": {k: w.get(k) for k in ("win_rate", "ci95", "n")},
            "final_kl_per_seq": metrics[-1].get("kl_per_seq") if metrics else None,
            "final_beta": metrics[-1].get("kl_beta") if metrics else None,
            "signal": (s.get("signal") or {}).get("reference_wins")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="applied to every candidate")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CANDIDATES)
    old = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
    rows = {r["name"]: r for r in old["rows"]}
    for name in names:
        overrides = CANDIDATES[name] + args.extra
        run = Path("runs") / f"search-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        cmd = [str(Path(sys.executable).parent / "rlaif-ray"), "train", args.config, "--out", str(run)]
        for o in overrides:
            cmd += ["--set", o]
        print("+", " ".join(cmd), flush=True)
        load, t0 = os.getloadavg(), time.perf_counter()
        subprocess.run(cmd, check=True)
        rows[name] = row_of(name, overrides, run, time.perf_counter() - t0, load)
        print(json.dumps(rows[name]["independent"], indent=1), rows[name]["hacking"], flush=True)
        RESULTS.mkdir(exist_ok=True)
        OUT.write_text(json.dumps({"config": args.config, "cpus": os.cpu_count(),
                                   "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "versions": versions(), "rows": list(rows.values())}, indent=1))


if __name__ == "__main__":
    main()
