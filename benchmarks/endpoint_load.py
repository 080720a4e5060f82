"""Load on `serve-labeler` (issue 20, item 1): the endpoint on loopback (Ray Serve, the
bundled model unless --model says otherwise, the default `serve.*` limits but a shorter
`serve.request_timeout_s`), then, bounded in count and time:

  1. junk, one at a time: bodies over serve.max_body_bytes (declared, and chunked without a
     length), 100,000 prompts, too many tokens (per prompt, per request), text/plain;
  2. traffic for --seconds: `--workers` clients sending valid labeling-sized requests back to
     back, two `heavy` requests at the most the limits admit (serve.max_total_tokens worth of
     prompts x max_tokens, which run into the time limit), and a burst of --burst concurrent
     valid requests (beyond serve.max_queued_requests: 429 + Retry-After);
  3. valid requests once it is quiet again.

Printed and written to results/endpoint_load.json: requests sent by kind, status counts by
kind, p50/p95 latency of the valid requests answered 200, and the replica's RSS (psutil on
the pid /health reports) before, peak during, and after; the load average of the machine.

    python -m benchmarks.endpoint_load [--seconds 30] [--model PATH] [--timeout-s 10]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
HARD_CAP_S = 60  # the traffic phase never runs longer than this
MAX_REQUESTS = 2000  # nor sends more than this


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.every, self.peak, self.stop = psutil.Process(pid), every, 0, threading.Event()

    def now(self) -> int:
        return self.proc.memory_info().rss

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model.name (default: the bundled smollm2-135m-instruct)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the traffic phase (at most 60)")
    ap.add_argument("--workers", type=int, default=3, help="clients sending valid requests back to back")
    ap.add_argument("--burst", type=int, default=24, help="concurrent valid requests fired at once")
    ap.add_argument("--timeout-s", type=float, default=10.0, help="serve.request_timeout_s for the run")
    ap.add_argument("--out", default=str(RESULTS / "endpoint_load.json"))
    args = ap.parse_args()
    seconds = min(args.seconds, HARD_CAP_S)

    import psutil
    import ray
    import requests
    from ray import serve

    from benchmarks.overhead import versions
    from rlaif_ray.commands.serve_labeler import serve_labeler
    from rlaif_ray.config import load_config
    from rlaif_ray.feedback.openai_api import EndpointLimits

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    over = [f"serve.port={port}", "serve.num_cpus=1", f"serve.request_timeout_s={args.timeout_s}",
            "serve.api_key_env=ENDPOINT_LOAD_NO_KEY"] + ([f"model.name={args.model}"] if args.model else [])
    cfg = load_config(None, over)
    limits = EndpointLimits.of(cfg.serve)
    load_before = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    base = f"http://127.0.0.1:{port}"
    sent, status, latency = Counter(), defaultdict(Counter), defaultdict(list)
    lock = threading.Lock()
    retry_after = []

    def post(kind: str, body=None, data=None, ctype="application/json", timeout=120):
        with lock:
            if sum(sent.values()) >= MAX_REQUESTS:
                return None
            sent[kind] += 1
        headers = {"Content-Type": ctype} if ctype else {}
        t = time.monotonic()
        try:
            r = requests.post(f"{base}/v1/completions", data=json.dumps(body) if data is None else data,
                              headers=headers, timeout=timeout)
            code = r.status_code
            if code == 429:
                retry_after.append(r.headers.get("Retry-After"))
        except requests.RequestException as e:
            code = type(e).__name__
        took = time.monotonic() - t
        with lock:
            status[kind][str(code)] += 1
            latency[kind].append((code, took))
        return code

    prompt = ("Human: What is a good way to learn to cook?\n\nAssistant: Start with simple recipes. "
              "Which response is more helpful? Answer 1 or 2: ") * 3
    valid = {"prompt": [prompt] * 4, "max_tokens": 1, "temperature": 0.0, "logprobs": 5}
    try:
        serve_labeler(cfg)
        health = requests.get(f"{base}/health", timeout=30).json()
        rss = RssSampler(health["pid"])
        for _ in range(3):
            post("warmup", valid)
        time.sleep(1.0)
        rss_before = rss.now()
        rss.start()

        # 1. junk
        big = 5 * (1 << 20)
        post("oversized_body (5 MiB, Content-Length)", data=b'{"prompt": "' + b"x" * big + b'"}')
        post("oversized_body (5 MiB, chunked)", data=(b"x" * (1 << 16) for _ in range(big >> 16)))
        post("too_many_prompts (100,000)", {"prompt": ["x"] * 100_000, "max_tokens": 1})
        post("too_many_tokens (one prompt)", {"prompt": "word " * (limits.max_prompt_tokens + 50), "max_tokens": 1})
        post("too_many_tokens (per request)", {"prompt": ["word " * 600] * limits.max_prompts,
                                               "max_tokens": limits.max_tokens})
        post("wrong_content_type (text/plain)", valid, ctype="text/plain")

        # 2. traffic
        end = time.monotonic() + seconds
        per = limits.max_total_tokens // (limits.max_tokens + 40)  # the most prompts the limits admit
        heavy = {"prompt": [f"Write a very long story number {i}." for i in range(per)],
                 "max_tokens": limits.max_tokens, "temperature": 1.0, "logprobs": 20}

        def worker():
            while time.monotonic() < end:
                if post("valid", valid) is None:
                    return

        threads = [threading.Thread(target=worker) for _ in range(args.workers)]
        for th in threads:
            th.start()
        time.sleep(min(2.0, seconds / 10))
        threads += [threading.Thread(target=post, args=("heavy (%d prompts x %d tokens)" % (per, limits.max_tokens),
                                                        heavy)) for _ in range(2)]
        for th in threads[-2:]:
            th.start()
        time.sleep(min(6.0, seconds / 4))
        burst = [threading.Thread(target=post, args=("valid (burst)", valid)) for _ in range(args.burst)]
        for th in burst:
            th.start()
        for th in threads + burst:
            th.join(max(1.0, end + args.timeout_s + 30 - time.monotonic()))
        traffic_s = time.monotonic() - (end - seconds)

        # 3. after
        time.sleep(1.0)
        for _ in range(5):
            post("valid (after)", valid)
        time.sleep(1.0)
        rss.stop.set()
        rss.join()
        rss_after = rss.now()
        health = requests.get(f"{base}/health", timeout=30).json()
    finally:
        serve.shutdown()
        ray.shutdown()
    load_after = os.getloadavg()

    ok = sorted(t for kind in ("valid", "valid (burst)", "valid (after)") for code, t in latency[kind] if code == 200)

    def pct(q):
        return round(ok[min(len(ok) - 1, int(q * len(ok)))], 3) if ok else None

    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    result = {
        "what": "serve-labeler under oversized and concurrent requests on loopback (benchmarks/endpoint_load.py)",
        "model": cfg.model.name, "limits": limits.__dict__, "traffic_s": round(traffic_s, 1),
        "sent": dict(sent), "status": {k: dict(v) for k, v in status.items()},
        "valid_200": {"count": len(ok), "p50_s": pct(0.5), "p95_s": pct(0.95),
                      "max_s": round(ok[-1], 3) if ok else None},
        # quiet (after) against under load (beside the heavy requests and the burst)
        "valid_200_p50_s_by_kind": {k: round(statistics.median(t for c, t in latency[k] if c == 200), 3)
                                    for k in ("valid", "valid (burst)", "valid (after)")
                                    if any(c == 200 for c, _ in latency[k])},
        "retry_after_s": sorted(Counter(retry_after).items()),
        "replica_rss_mb": {"before": mb(rss_before), "peak_during": mb(rss.peak), "after": mb(rss_after)},
        "replica_health_after": health,
        "machine": {"cpus": psutil.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in load_after]},
        "versions": versions(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("sent", "status", "valid_200", "valid_200_p50_s_by_kind",
                                             "retry_after_s", "replica_rss_mb",
                                             "machine", "traffic_s")}, indent=2))


if __name__ == "__main__":
    main()
