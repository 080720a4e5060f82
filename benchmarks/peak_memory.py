"""Run a command and report the peak memory of its whole process tree (driver, Ray's
GCS/raylet, every actor): the sum of RSS and of PSS (shared pages split fairly; RSS
counts memory-mapped weights and the object store once per process).

    python -m benchmarks.peak_memory -- rlaif-ray train configs/quickstart.yaml
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return []


def sample(procs) -> tuple[int, int]:
    rss = pss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return rss, pss


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    t0 = time.time()
    child = subprocess.Popen(argv)
    root = psutil.Process(child.pid)
    peak_rss = peak_pss = 0
    while child.poll() is None:
        rss, pss = sample(tree(root))
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(1.0)
    result = {"command": " ".join(argv), "exit_code": child.returncode, "wall_s": round(time.time() - t0, 1),
              "peak_rss_sum_gib": round(peak_rss / 2**30, 2), "peak_pss_sum_gib": round(peak_pss / 2**30, 2)}
    print(json.dumps(result))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
