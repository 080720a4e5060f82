"""Weight updates on CPU for the bundled model: learner rank 0 -> an HF generator and a vLLM
generator (real actors on a local Ray), bucketed broadcast over gloo at a few bucket sizes
against the object-store path. Per receiver: wall time of one update and the peak memory
it added while loading (sampled RSS).

    python -m benchmarks.weight_update [--buckets 16,64,256] [--repeats 3]

On the object-store path the receiver also holds the staged payload (a model copy in its
dtype) from arrival to install; that size is reported beside the install's own peak.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--buckets", default="16,64,256", help="bucket sizes in MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--model", default=None, help="override model.name (the tests use a tiny model)")
    ap.add_argument("--out", default=str(RESULTS / "weight_update.json"))
    args = ap.parse_args()

    import ray

    from actors.generator import generator_actor
    from actors.pipeline import broadcast_weights, form_weight_group, start_learner, sync_weights
    from actors.ray_session import release
    from benchmarks.overhead import versions
    from rlaif_ray.config import load_config
    from rlaif_ray.run.resolve import resolve_auto

    cfg = resolve_auto(load_config(args.config, ["pipeline.learner.num_cpus=0.5"] +
                                   ([f"model.name={args.model}"] if args.model else [])))
    load_before = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    learner = start_learner(cfg, "wu")
    backends = args.backends.split(",")
    gens = [generator_actor().options(num_cpus=0.5).remote(
        f"generator-{b}", cfg.model.name, cfg.model.dtype, {**cfg.generation.model_dump(), "backend": b}, 1)
        for b in backends]
    infos = ray.get([g.info.remote() for g in gens])
    # every weight page resident before measuring (a freshly loaded HF model is memory-mapped:
    # its first write would count the whole model as new memory)
    ray.get([g.digest.remote() for g in gens])
    rows, version = [], 0
    try:
        for dtype in sorted({i["weight_dtype"] for i in infos}):  # each receiver gets its own dtype
            group = [g for g, i in zip(gens, infos) if i["weight_dtype"] == dtype]
            names = [i["name"] for i in infos if i["weight_dtype"] == dtype]
            for mb in [float(x) for x in args.buckets.split(",")]:
                form_weight_group(learner.workers[0], group, "cpu", 120, dtype, mb)
                for _ in range(args.repeats):
                    version += 1
                    t0 = time.perf_counter()
                    broadcast_weights(learner.workers, group, version, 300, names, dtype, mb)
                    wall = time.perf_counter() - t0
                    for i in ray.get([g.info.remote() for g in group]):
                        rows.append({"path": "broadcast", "bucket_mb": mb, "receiver": i["name"], "dtype": dtype,
                                     "wall_s": wall, "install_s": i["last_install_s"],
                                     "extra_mb": i["last_install_extra_mb"]})
            for _ in range(args.repeats):  # the object store: stage the payload, install at the next use
                version += 1
                t0 = time.perf_counter()
                payload = learner.weights(dtype)
                size_mb = sum(a.nbytes for a in ray.get(payload)["arrays"].values()) / 2**20
                sync_weights(group, payload, version, 300, names)
                ray.get([g.digest.remote() for g in group])  # installs the staged weights
                wall = time.perf_counter() - t0
                for i in ray.get([g.info.remote() for g in group]):
                    rows.append({"path": "object_store", "bucket_mb": None, "receiver": i["name"], "dtype": dtype,
                                 "wall_s": wall, "install_s": i["last_install_s"], "extra_mb": i["last_install_extra_mb"],
                                 "staged_payload_mb": size_mb})
                del payload
    finally:
        for a in gens + learner.workers:
            ray.kill(a)
        release("wu", ["learner"])
        ray.shutdown()

    def med(path, receiver, mb, key):
        xs = [r[key] for r in rows if r["path"] == path and r["receiver"] == receiver and r["bucket_mb"] == mb]
        return round(statistics.median(xs), 3) if xs else None

    summary = []
    for receiver in sorted({r["receiver"] for r in rows}):
        for path, mb in sorted({(r["path"], r["bucket_mb"]) for r in rows if r["receiver"] == receiver},
                               key=lambda x: (x[0], x[1] or 0)):
            one = next(r for r in rows if r["receiver"] == receiver and r["path"] == path and r["bucket_mb"] == mb)
            summary.append({"receiver": receiver, "dtype": one["dtype"], "path": path, "bucket_mb": mb,
                            "wall_s": med(path, receiver, mb, "wall_s"), "install_s": med(path, receiver, mb, "install_s"),
                            "extra_mb": med(path, receiver, mb, "extra_mb"),
                            "staged_payload_mb": one.get("staged_payload_mb")})
    result = {"what": "one weight update of the bundled model, learner rank 0 -> each receiver (medians of "
                      f"{args.repeats})", "model": cfg.model.name, "cpus": os.cpu_count(),
              "load_before": load_before, "load_after": os.getloadavg(), "versions": versions(),
              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "summary": summary, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for s in summary:
        print(json.dumps(s))


if __name__ == "__main__":
    main()
