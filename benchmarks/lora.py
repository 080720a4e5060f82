"""LoRA against full fine-tuning on the quickstart config: one `rlaif-ray train` per mode (in
turn, same seed and settings), each under a memory sampler. Per mode: the bytes of one weight
update (learner rank 0 -> generators, summary.json weight_update_bytes: the full policy, or
with model.lora the adapter alone), the learner actor's peak memory (RSS and USS of
`ray::LearnerWorker`, sampled every 0.5 s), the run's wall time, and the held-out measures
(reward before -> after with its paired 95% CI, the independent measures' changes, the win
rate when on). Targets (issue 41): the update <= 5% of full fine-tuning's bytes, the learner's
peak <= 0.6x.

    python -m benchmarks.lora [--config configs/quickstart.yaml] [--set KEY=VALUE ...] [--r 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.peak_memory import label, sample, tree

RESULTS = Path(__file__).parent / "results"
# the quickstart shortened to fit about 15 minutes for both runs on 2 cores (the full one is ~10 min each)
SHORT = ["rl.steps=8", "eval.num_prompts=24", "eval.signal_posts=0"]


def _is_learner(p: psutil.Process) -> bool:
    try:
        return "LearnerWorker" in label(p)
    except psutil.Error:  # gone, or a zombie, between listing and reading
        return False


def run_mode(config: str, sets: list[str], out: Path) -> dict:
    """One training run in a subprocess; returns its wall time and the learner's peak memory."""
    argv = [sys.executable, "-m", "rlaif_ray.commands.cli", "train", config, "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    print("+", " ".join(argv[2:]), flush=True)
    t0 = time.time()
    child = subprocess.Popen(argv)
    root = psutil.Process(child.pid)
    peak = {"rss": 0, "uss": 0}
    while child.poll() is None:
        learner = sample([p for p in tree(root) if _is_learner(p)])
        for k in peak:
            peak[k] = max(peak[k], sum(r[k] for r in learner))
        time.sleep(0.5)
    if child.returncode:
        raise SystemExit(f"the run failed (exit {child.returncode})")
    return {"wall_s": round(time.time() - t0, 1), "learner_peak_rss_mib": round(peak["rss"] / 2**20),
            "learner_peak_uss_mib": round(peak["uss"] / 2**20)}


def measures(run: Path) -> dict:
    """What summary.json says of the update's size and the held-out measures."""
    s = json.loads((run / "summary.json").read_text())
    out = {"weight_update_bytes": s.get("weight_update_bytes")}
    if "heldout_after" in s:
        out["heldout_reward"] = {"before": round(s["heldout_before"]["reward_mean"], 4),
                                 "after": round(s["heldout_after"]["reward_mean"], 4),
                                 "change": round(s["heldout_change"]["mean"], 4),
                                 "ci95_halfwidth": round(s["heldout_change"]["ci95_halfwidth"], 4)}
        out["independent"] = {k: {"before": m["before"], "after": m["after"], "change": m["change"]}
                              for k, m in (s.get("independent") or {}).items()}
        out["hacking"] = (s.get("hacking") or {}).get("hacking")
        if s.get("win_rate", {}).get("win_rate") is not None:
            out["win_rate"] = {"win_rate": s["win_rate"]["win_rate"], "ci95": s["win_rate"]["ci95"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--set", action="append", default=None, help="overrides for both runs (default: a shorter run)")
    ap.add_argument("--r", type=int, default=16, help="model.lora.r (alpha 2r, the default targets)")
    ap.add_argument("--lr", default="3e-4", help="rl.lr of the LoRA run (adapters take a larger step)")
    ap.add_argument("--out", default=str(RESULTS / "lora.json"))
    args = ap.parse_args()
    sets = SHORT if args.set is None else args.set
    modes = {"full": [], "lora": [f"model.lora.r={args.r}", f"model.lora.alpha={2 * args.r}", f"rl.lr={args.lr}"]}
    result = {"config": args.config, "sets": sets, "modes": {},
              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "platform": platform.machine(),
                          "load_avg_before": round(os.getloadavg()[0], 2)}}
    with tempfile.TemporaryDirectory(prefix="bench-lora-", ignore_cleanup_errors=True) as tmp:
        for mode, extra in modes.items():
            run = Path(tmp) / mode
            r = run_mode(args.config, sets + extra, run)
            result["modes"][mode] = {"sets": extra, **r, **measures(run)}
            print(mode, json.dumps(result["modes"][mode]), flush=True)
    full, lora = result["modes"]["full"], result["modes"]["lora"]
    result["bytes_ratio"] = round(lora["weight_update_bytes"] / full["weight_update_bytes"], 5)
    result["learner_peak_ratio"] = round(lora["learner_peak_rss_mib"] / full["learner_peak_rss_mib"], 3)
    result["targets_met"] = {"bytes <= 5%": result["bytes_ratio"] <= 0.05,
                             "learner peak <= 0.6x": result["learner_peak_ratio"] <= 0.6}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("bytes_ratio", "learner_peak_ratio", "targets_met")}))


if __name__ == "__main__":
    main()
