"""`make bench`: every benchmark, then BENCHMARKS.md regenerated from the results.
Takes about 35 minutes on 2 cores (the quickstart's memory run is the longest). The labeler
alignment grid is separate (`make bench-labeler`, about 2 hours)."""
from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


if __name__ == "__main__":
    run("-m", "benchmarks.overlap", "configs/quickstart.yaml", "--pairs", "2", "--set", "rl.steps=4")
    run("-m", "benchmarks.generation", "--rounds", "3", "--batch", "8", "--new-tokens", "64")
    run("-m", "benchmarks.labeling", "--pairs", "16", "--rounds", "2")
    run("-m", "benchmarks.demo")
    run("-m", "benchmarks.report")
