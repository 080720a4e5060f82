"""Pairwise labeling throughput, alternated in one run (A B C A B C ...), same model, pairs
and label code (Judge.prefer); pairs/s counts one debiased label (both orders) per pair:
  - `batched`: both orders of `--batch` pairs in one right-padded forward pass (the hf
    default on a GPU, `reward.prefix_sharing: auto`);
  - `single`: one pair, one order per forward pass (two passes per debiased label);
  - `prefix_shared` (the hf default on CPU): the same batch, shared prefixes run once
    through a KV cache: the root (preamble, exemplars) once per Judge, kept across calls,
    the context both orders share once per pair, then the two orders' tails as one batch.
All three must give the same preferences (max difference reported). The issue's figure is
`ratio_default_over_single`: the default path on this machine (`default_path`) over
`single`; target `target_ratio`.

    python -m benchmarks.labeling --pairs 16 --rounds 3 [--shots 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

from benchmarks.overhead import versions

RESULTS = Path(__file__).parent / "results"
TARGET = 3.0  # issue 9: batched both-orders path at least 3x one pair and one order per forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="hh_helpful")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="pairs per forward pass in the batched path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shots", type=int, default=0, help="few-shot exemplars in the prompt")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (an actor's default is 1)")
    ap.add_argument("--out", default=None, help="default: results/labeling[_<shots>shot][_<threads>t].json")
    args = ap.parse_args()
    suffix = (f"_{args.shots}shot" if args.shots else "") + (f"_{args.threads}t" if args.threads != 1 else "")
    out_path = Path(args.out or RESULTS / f"labeling{suffix}.json")

    import torch

    from rlaif_ray.config import PairwiseConfig
    from rlaif_ray.engines.models import load_model, load_tokenizer
    from rlaif_ray.feedback import scoring
    from rlaif_ray.feedback.labeling import Judge
    from rlaif_ray.feedback.pairs import exemplar_pairs, load_pairs

    torch.set_num_threads(args.threads)
    rows, task = load_pairs(args.data, args.pairs)
    ctx, a, b = ([r[k] for r in rows] for k in ("context", "response_a", "response_b"))
    model, tok = load_model(args.model), load_tokenizer(args.model)
    judge = Judge.of_model(model, tok, "yesno_about_chat", args.batch, prefix_sharing="off")
    shared = Judge.of_model(model, tok, "yesno_about_chat", args.batch, prefix_sharing="on")
    default = Judge.of_model(model, tok, "yesno_about_chat", args.batch)  # what an actor gets: prefix_sharing auto
    default_path = "prefix_shared" if default.labels.engine.share_prefixes else "batched"
    opts, shots = PairwiseConfig(task=task), exemplar_pairs(args.data, args.shots)
    one_order = opts.model_copy(update={"debias": False})

    def batched():
        return judge.prefer(ctx, a, b, opts, shots).p_a

    def prefix_shared():
        return shared.prefer(ctx, a, b, opts, shots).p_a

    def single():
        out = []
        for c, x, y in zip(ctx, a, b):
            ab = judge.prefer([c], [x], [y], one_order, shots).p_a[0]
            ba = judge.prefer([c], [y], [x], one_order, shots).p_a[0]
            out.append(float(scoring.debias(torch.tensor(ab), torch.tensor(ba))))
        return out

    variants = (("batched", batched), ("single", single), ("prefix_shared", prefix_shared))
    load_before = os.getloadavg()
    with torch.no_grad():
        for _, fn in variants:  # warm-up; a labeler actor runs many batches, so its root KV is cached
            fn()
        times = {k: [] for k, _ in variants}
        cpu = {k: [] for k, _ in variants}
        faults = {k: [] for k, _ in variants}
        results = {}
        for _ in range(args.rounds):
            for name, fn in variants:
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                c0, t0 = time.process_time(), time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    diff = max(abs(p - q) for k in ("single", "prefix_shared") for p, q in zip(results["batched"], results[k]))
    rate = {k: args.pairs / statistics.median(v) for k, v in times.items()}
    cpu_rate = {k: args.pairs / statistics.median(v) for k, v in cpu.items()}
    lens = [len(judge.tok(t, add_special_tokens=False)["input_ids"]) for t in ctx]
    ratio = rate[default_path] / rate["single"]
    out = {"what": "debiased pairwise labels per second: both orders of a batch in one right-padded forward pass, "
                   "one pair and one order per pass, and the batch with shared prefixes run once (KV cache, root "
                   "kept across calls); alternated in one run",
           "shots": args.shots,
           "model": args.model, "data": args.data, "pairs": args.pairs, "batch_pairs": args.batch,
           "torch_threads": args.threads, "rounds": args.rounds, "cpus": os.cpu_count(),
           "context_tokens_median": statistics.median(lens),
           "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": load_before,
           "load_after": os.getloadavg(), "versions": versions(), "seconds": times, "cpu_seconds": cpu, "minor_page_faults": faults,
           "pairs_per_s": rate, "pairs_per_cpu_s": cpu_rate,
           "default_path": default_path, "target_ratio": TARGET,
           "ratio_default_over_single": ratio, "meets_target": ratio >= TARGET,
           "ratio_default_over_single_cpu_time": cpu_rate[default_path] / cpu_rate["single"],
           "ratio_batched_over_single": rate["batched"] / rate["single"],
           "ratio_prefix_shared_over_single": rate["prefix_shared"] / rate["single"],
           "ratio_prefix_shared_over_batched": rate["prefix_shared"] / rate["batched"], "max_abs_diff_p_a": diff}
    out_path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
