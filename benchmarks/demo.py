"""The quickstart as a user runs it, under the peak-memory sampler; writes results/demo.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.overhead import versions

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    out = Path("runs") / f"bench-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    load_before = os.getloadavg()
    # the same run gives the memory figure (results/memory.json: every process at the peak)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peak_memory", "--out", str(RESULTS / "memory.json"),
                           "--", str(Path(sys.executable).parent / "rlaif-ray"), "train",
                           "configs/quickstart.yaml", "--out", str(out)], capture_output=True, text=True)
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    # the machine's state beside the memory figure (results/memory.json is written by the sampler)
    mem_file = RESULTS / "memory.json"
    mem_full = json.loads(mem_file.read_text())
    mem_full.update(cpus=os.cpu_count(), time=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    load_before=load_before, load_after=os.getloadavg(), versions=versions())
    mem_file.write_text(json.dumps(mem_full, indent=1))
    s = json.loads((out / "summary.json").read_text())
    b, a, ch = s["heldout_before"], s["heldout_after"], s["heldout_change"]
    figures = {
        "wall time (s)": mem["wall_s"], "peak memory, sum of PSS (GiB)": mem["peak_pss_sum_gib"],
        "peak memory, sum of RSS (GiB)": mem["peak_rss_sum_gib"],
        "judge signal (reference wins)": f"{s['signal']['reference_wins']:.0%} of {s['signal']['n']}",
        "held-out reward, initial -> final": f"{b['reward_mean']:+.3f} -> {a['reward_mean']:+.3f} "
                                             f"({ch['mean']:+.3f} +- {ch['ci95_halfwidth']:.3f}, n={a['n']})",
        "held-out response length (tokens)": f"{b['length_tokens']:.1f} -> {a['length_tokens']:.1f}",
        "completions/s (RL loop)": f"{s['completions_per_s']:.3f}",
    }
    if s.get("win_rate", {}).get("n"):
        w = s["win_rate"]
        figures["held-out win rate vs initial (pairwise judge)"] = (
            f"{w['win_rate']:.1%} (95% CI {w['ci95'][0]:.1%}-{w['ci95'][1]:.1%}, n={w['n']}); "
            f"length-controlled {w['length_controlled']:.1%}")
    for name, m in s.get("independent", {}).items():  # the measures that are not the reward, paired
        figures[f"{name}, initial -> final"] = (f"{m['before']:.3f} -> {m['after']:.3f} ({m['change']:+.3f}, "
                                                f"{m.get('test', 'paired')} one-sided p rose {m.get('p_rose', float('nan')):.3g}"
                                                f" / fell {m.get('p_fell', float('nan')):.3g})")
    if s.get("hacking"):
        v = s["hacking"]
        figures["reward hacking verdict"] = ("**suspected**: " if v["hacking"] else "not suspected: ") + v["reason"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps({
        "note": f"`rlaif-ray train configs/quickstart.yaml`, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, "
                f"load before {'/'.join(f'{x:.2f}' for x in load_before)}",
        "figures": figures}, indent=1))
    print(json.dumps(figures, indent=1))
