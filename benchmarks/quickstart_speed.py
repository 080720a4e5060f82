"""The quickstart's RL loop before and after a change, in one run: completions/s of the same
settings and seeds, and the first step's rewards, which must be identical.

    python -m benchmarks.quickstart_speed [--before c9e402b] [--steps 16] [--rounds 1]

Three runs a round, one after another on this machine, each under benchmarks.trl_compare's
sampler (peak sum of PSS, CPU seconds):

* before: the code at `--before` (a git worktree of that revision, its own packages first on
  the path), its own configs/quickstart.yaml;
* after, same settings: this checkout running that same config file, byte for byte
  (settings added since keep their defaults, which compute the same thing);
* after, bundled: this checkout's configs/quickstart.yaml as it ships.

All three take the same overrides: rl.steps, and no evaluation, rollout logs, report or
intermediate checkpoints, so the loop is what is timed (metrics.jsonl's elapsed_s at the
last step). The first step's mean reward must agree: the same prompts, samples and judge.
Writes results/quickstart_speed.json; BENCHMARKS.md shows it (benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.overhead import versions
from benchmarks.trl_compare import ROOT, run_rlaif

RESULTS = Path(__file__).parent / "results"
QUIET = ["eval.num_prompts=0", "eval.signal_posts=0", "eval.win_rate=false", "run.log_rollouts=false",
         "run.report=false", "run.trackers=[]", "run.progress=false", "run.checkpoint_every=0"]
BEFORE = "c9e402b"  # main before issue 37 (architecture part 2): the cleanup must cost no speed


def worktree(rev: str, where: Path) -> Path:
    """A detached checkout of `rev` at `where` (git worktree; removed by `drop`)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return where


def drop(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=BEFORE, help="the revision to compare against (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more overrides, every run")
    ap.add_argument("--out", default=str(RESULTS / "quickstart_speed.json"))
    args = ap.parse_args()
    common = QUIET + [f"rl.steps={args.steps}"] + args.overrides
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    runs, t_start, load_before = [], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="quickstart-speed-") as tmp_:
        tmp = Path(tmp_)
        old = worktree(rev, tmp / "before")
        old_config = str(old / "configs" / "quickstart.yaml")
        try:
            for i in range(args.rounds):
                for name, config, code in (("before", old_config, old), ("after-same-settings", old_config, None),
                                           ("after-bundled", "configs/quickstart.yaml", None)):
                    r = run_rlaif(config, common, tmp, f"{name}-{i}", code=code)
                    runs.append({"variant": name, "round": i, **r})
                    print(json.dumps({k: runs[-1][k] for k in ("variant", "round", "loop_s", "completions_per_s",
                                                               "peak_pss_gib")}
                                     | {"first_step_reward": r["reward_mean_by_step"][0]}), flush=True)
        finally:
            drop(old)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["variant"] == name)

    variants = ("before", "after-same-settings", "after-bundled")
    medians = {v: {k: med(v, k) for k in ("completions_per_s", "completions_per_s_after_step1", "peak_pss_gib",
                                          "cpu_s_per_completion", "loop_s")} for v in variants}
    first = {v: sorted({r["reward_mean_by_step"][0] for r in runs if r["variant"] == v}) for v in variants}
    result = {
        "what": f"the quickstart's RL loop, the code at {rev} against this checkout, one after another in one run",
        "before": rev, "after": head + ("+uncommitted" if dirty else ""), "steps": args.steps, "rounds": args.rounds,
        "overrides": common,
        "variants": {"before": f"{rev}: its own code and configs/quickstart.yaml",
                     "after-same-settings": f"{head}: {rev}'s configs/quickstart.yaml, unchanged",
                     "after-bundled": f"{head}: configs/quickstart.yaml as it ships"},
        "medians": medians,
        "ratios_over_before": {v: {k: medians[v][k] / medians["before"][k]
                                   for k in ("completions_per_s", "peak_pss_gib", "cpu_s_per_completion")}
                               for v in variants[1:]},
        "first_step_reward": first,
        "first_step_identical": len({x for v in variants for x in first[v]}) == 1,
        "reward_by_step": {r["variant"]: r["reward_mean_by_step"] for r in runs if r["round"] == 0},
        "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(), "versions": versions(),
        "time": t_start, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for v in variants:
        m = medians[v]
        print(f"{v}: {m['completions_per_s']:.3f} completions/s, peak PSS {m['peak_pss_gib']:.2f} GiB, "
              f"first-step reward {first[v]}")
    print("first step identical:", result["first_step_identical"])


if __name__ == "__main__":
    main()
