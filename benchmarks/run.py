"""`make bench`: every benchmark (each figure from at least 3 alternated pairs or rounds,
medians), then BENCHMARKS.md regenerated from benchmarks/results/*.json. Took about an hour
and a half on a 2-core AVX-512 machine, before the overhead benchmark's plain loop ran on two
allocators (3 runs more); expect longer on an AVX2 CPU, where a learner step took 1.5x as long
(the quickstart runs under the memory sampler and the overlap pairs of 16 steps are the
longest). The labeler alignment grid is separate (`make bench-labeler`, about 2 hours). Where `trl` imports
(`pip install -c constraints-cpu.txt -e '.[trl]'`), also rlaif-ray against TRL's GRPOTrainer
(benchmarks/trl_compare.py: 2 rounds of 2-3 systems x 10 steps, about an hour more)."""
from __future__ import annotations

import subprocess
import sys

from benchmarks.quickstart_speed import BEFORE

QUICK = ["configs/quickstart.yaml", "--pairs", "3", "--set", "rl.steps=4"]


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


if __name__ == "__main__":
    run("-m", "benchmarks.overhead", *QUICK)
    # the quickstart's own 16 steps: the overlapped mode's first step fills the pipeline, a fixed cost
    # that a 4-step run weighs 4 times as much as the quickstart does (about 45 minutes on AVX2)
    run("-m", "benchmarks.overlap", "configs/quickstart.yaml", "--pairs", "3")
    run("-m", "benchmarks.scaling")  # from overlap.json's per-stage times
    run("-m", "benchmarks.generation", "--rounds", "3", "--batch", "8", "--new-tokens", "64")
    run("-m", "benchmarks.labeling", "--pairs", "16", "--rounds", "3")
    run("-m", "benchmarks.labeling", "--pairs", "16", "--rounds", "3", "--shots", "2")
    run("-m", "benchmarks.weight_update", "--buckets", "16,64,256", "--repeats", "3")
    run("-m", "benchmarks.lora")  # LoRA against full fine-tuning: update bytes, learner peak, held-out (~15 min)
    if subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode == 0:
        # vLLM's server, 1 vs 8 requests in flight: the bundled model (compute-bound here), a tiny one (spare compute)
        run("-m", "benchmarks.judge_concurrency", "--pairs", "32", "--rounds", "3")
        run("-m", "benchmarks.judge_concurrency", "--pairs", "32", "--rounds", "3", "--model", "tiny", "--concurrency", "1,8,32")
    run("-m", "benchmarks.demo")  # the full quickstart under the memory sampler: results/memory.json too
    # the quickstart loop before issue 37's cleanup against this checkout: needs that revision
    if subprocess.run(["git", "cat-file", "-e", f"{BEFORE}^{{commit}}"], capture_output=True).returncode == 0:
        run("-m", "benchmarks.quickstart_speed", "--steps", "16")
    else:
        print(f"revision {BEFORE} is not in this clone: skipping benchmarks.quickstart_speed", flush=True)
    if subprocess.run([sys.executable, "-c", "import trl"], capture_output=True).returncode == 0:  # the optional extra
        run("-m", "benchmarks.trl_compare", "--rounds", "2")
    else:
        print("trl does not import: skipping benchmarks.trl_compare (pip install -e '.[trl]')", flush=True)
    run("-m", "benchmarks.report")
