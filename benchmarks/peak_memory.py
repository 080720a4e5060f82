"""Run a command and report the peak memory of its whole process tree (driver, Ray's
GCS/raylet, every actor): the sum of RSS and of PSS (shared pages split fairly; RSS
counts memory-mapped weights and the object store once per process). `--out FILE` also
writes, for the moment of peak PSS, every process with its PSS, RSS and USS (MiB).

    python -m benchmarks.peak_memory [--out FILE] -- rlaif-ray train configs/quickstart.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import psutil


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return []


def label(p: psutil.Process) -> str:
    """Short form of the command line: Ray sets actor titles such as `ray::RolloutGenerator`."""
    words = " ".join(p.cmdline()).split()  # setproctitle pads the title with spaces
    return " ".join(os.path.basename(w) if w.startswith("/") else w for w in words)[:100] or p.name()


def sample(procs) -> list[dict]:
    rows = []
    for p in procs:
        try:
            info = p.memory_full_info()
            rows.append({"pid": p.pid, "name": label(p), "pss": getattr(info, "pss", info.rss),
                         "rss": info.rss, "uss": info.uss})
        except psutil.Error:
            pass
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the result JSON, with the per-process breakdown at peak PSS")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    t0 = time.time()
    child = subprocess.Popen(argv)
    root = psutil.Process(child.pid)
    peak_rss = peak_pss = 0
    at_peak, peak_t = [], 0.0
    while child.poll() is None:
        rows = sample(tree(root))
        pss = sum(r["pss"] for r in rows)
        peak_rss = max(peak_rss, sum(r["rss"] for r in rows))
        if pss > peak_pss:
            peak_pss, at_peak, peak_t = pss, rows, time.time() - t0
        time.sleep(1.0)
    # the command without this machine's paths
    result = {"command": " ".join([os.path.basename(argv[0]), *argv[1:]]), "exit_code": child.returncode,
              "wall_s": round(time.time() - t0, 1),
              "peak_rss_sum_gib": round(peak_rss / 2**30, 2), "peak_pss_sum_gib": round(peak_pss / 2**30, 2)}
    if args.out:
        mib = [{**r, **{k: round(r[k] / 2**20) for k in ("pss", "rss", "uss")}} for r in at_peak]
        with open(args.out, "w") as f:
            json.dump({**result, "peak_pss_at_s": round(peak_t, 1),
                       "processes_at_peak_pss_mib": sorted(mib, key=lambda r: -r["pss"])}, f, indent=1)
    print(json.dumps(result))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
