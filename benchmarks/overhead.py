"""Framework overhead: the synchronous Ray pipeline (`rlaif_ray.commands.train.train` with
rl.max_staleness=0) against the same steps done in one plain Python process without Ray
or Arrow, by the same rlaif_ray functions the actors call, alternated (ray plain ray plain
...). Target: the Ray loop at most 5% slower.

    python -m benchmarks.overhead configs/quickstart.yaml --pairs 3 --set rl.steps=4

Same config, prompts (PromptSampler, rl.seed), sampling seeds, models, steps and torch
thread counts (the plain process sets each role's pipeline.*.torch_threads before that
role's work). The plain steps call the classes the actors hold: generator =
engines.HFEngine.generate + decode (RolloutGenerator), labeler = labeling.Judge.score /
prefer (Labeler.score), learner = learner.PolicyLearner.step (LearnerWorker.train_step),
weight sync = PolicyLearner.state_for_sync into HFEngine.load_weights before the next batch
(where the actor installs them).
Timed: the loop from the first step to the end of the last one, in both variants; model
loading, Ray start-up and the final checkpoint write are outside it. The plain variant runs
in a fresh subprocess that never imports ray; each Ray run starts and stops its own Ray.
Per-step reward and loss of the two variants are compared (same seeds: they should agree).
The learner's allocator (rl.release_memory) applies to the learner actor only: the jemalloc
Ray ships, preloaded, else glibc with a fixed mmap threshold; the generator and labeler keep
glibc. One process chooses its allocator at start, so it cannot do the same. The plain side
therefore runs twice per pair: "plain" on glibc, switching the learner actor's glibc values
in with mallopt before its step (glibc's ceiling for the dynamic threshold, 32 MiB, before
the generator's and labeler's), and, where Ray ships jemalloc, "plain-jemalloc", the whole
process on it. The faster of the two (by median) is the baseline Ray is measured against:
the best one process can do with either allocator.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FIXED = ["rl.max_staleness=0", "eval.num_prompts=0", "eval.signal_posts=0", "run.log_rollouts=false",
         "run.report=false", "run.trackers=[]", "run.progress=false"]
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
LEARNER = (65536, 1048576)  # rlaif_ray.cpu.allocator.GLIBC_LEARNER's values (tests/test_benchmarks.py checks): the
# learner actor's glibc fallback; where Ray ships jemalloc the actor runs on that instead
GLIBC_CEILING = (32 << 20, 64 << 20)  # where glibc's dynamic threshold ends up (trim = 2x)


def mallopt(mmap_threshold: int, trim_threshold: int) -> None:
    """Switch glibc's malloc settings in this process (Linux/glibc only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


def cpu() -> str | None:
    """The CPU's model and widest vector unit: this project's 2-core machines vary (the same
    learner step, benchmarks.learner_malloc, took 12 s on an AVX-512 one and 20 s on an AVX2 one)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    field = lambda key: next((x.split(":", 1)[1].strip() for x in lines if x.startswith(key)), "")  # noqa: E731
    flags = field("flags").split()
    simd = next((s for s in ("avx512_bf16", "avx512f", "avx2") if s in flags), "no avx2")
    return f"{field('model name') or platform.machine()} (family {field('cpu family')}, model {field('model')}, {simd})"


def versions() -> dict:
    out = {"cpu": cpu(), "python": platform.python_version()}
    for pkg in ("torch", "ray", "transformers", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


class CpuSampler(threading.Thread):
    """CPU seconds (user + system) of this process and all its descendants (Ray's daemons,
    workers and actors), sampled every `every` seconds; `between(t0, t1)` interpolates each
    process's CPU time at the loop's start and end and sums it by kind of process."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.samples, self.names = every, {}, {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop_event.is_set():
            for p in [me, *me.children(recursive=True)]:
                try:
                    c = p.cpu_times()
                    if self.kind(self.names.get(p.pid, "")).startswith("ray"):  # until it shows its role
                        self.names[p.pid] = "driver" if p.pid == me.pid else " ".join(p.cmdline())[:200] or p.name()
                    self.samples.setdefault(p.pid, []).append((time.time(), c.user + c.system))
                except Exception:  # noqa: BLE001 -- the process ended between listing and reading
                    pass
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    @staticmethod
    def kind(name: str) -> str:
        for actor in ("RolloutGenerator", "Labeler", "LearnerWorker"):
            if f"ray::{actor}" in name:
                return actor
        if name == "driver":
            return "driver"
        for key, label in (("raylet", "raylet"), ("gcs_server", "gcs_server"), ("agent", "agents"),
                           ("log_monitor", "log_monitor"), ("ray::IDLE", "idle workers"),
                           ("default_worker", "idle workers")):
            if key in name:
                return f"ray: {label}"
        return "ray: other"

    def between(self, t0: float, t1: float) -> dict[str, float]:
        def at(xs, t):
            if t <= xs[0][0]:
                return 0.0 if t0 < xs[0][0] - self.every else xs[0][1]  # started during the loop: from 0
            for (ta, ca), (tb, cb) in zip(xs, xs[1:]):
                if ta <= t <= tb:
                    return ca + (cb - ca) * (t - ta) / max(tb - ta, 1e-9)
            return xs[-1][1]

        out: dict[str, float] = {}
        for pid, xs in self.samples.items():
            k = self.kind(self.names[pid])
            out[k] = out.get(k, 0.0) + max(at(xs, t1) - at(xs, t0), 0.0)
        return out


def run_ray(config: str, overrides: list[str], out: Path) -> dict:
    from rlaif_ray.commands.train import train
    from rlaif_ray.config import load_config
    from rlaif_ray.run.folder import read_metrics

    sampler = CpuSampler()
    sampler.start()
    try:
        run = train(load_config(config, overrides), out, log=lambda *_: None)
    finally:
        sampler.stop()
    rows = read_metrics(run)
    s = json.loads((run / "summary.json").read_text())
    completions = sum(r["completions"] for r in rows)
    steps_s = rows[-1]["elapsed_s"]  # logged before the final checkpoint is written
    t1 = (run / "metrics.jsonl").stat().st_mtime  # the last step's row: the loop's end
    cpu = sampler.between(t1 - steps_s, t1)
    return {"variant": "ray", "steps": len(rows), "completions": completions, "steps_s": steps_s,
            "completions_per_s": completions / steps_s, "stage_s": s["stage_busy_s"],
            "cpu_s": sum(cpu.values()), "cpu_s_by_process": cpu,
            "summary_loop_s": s["loop_s"], "reward_mean": [r["reward_mean"] for r in rows],
            "loss": [r["loss"] for r in rows], "kl": [r["kl"] for r in rows], "beta": [r["kl_beta"] for r in rows]}


def plain_variants() -> dict[str, dict[str, str]]:
    """The plain process's allocators, by variant name: the environment each runs with."""
    from rlaif_ray.cpu.allocator import bundled_jemalloc

    out = {"plain": {}}
    if bundled_jemalloc():
        out["plain-jemalloc"] = {"LD_PRELOAD": bundled_jemalloc()}
    return out


def env_without_allocator() -> dict[str, str]:
    """This environment without malloc settings or a preloaded library: a child's allocator is
    then only what the caller adds."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}


def run_plain(config: str, overrides: list[str], out: Path, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.overhead", config, "--plain-worker", str(out),
                           *[x for o in overrides for x in ("--set", o)]], text=True, env={**env_without_allocator(), **env})
    if proc.returncode:
        raise SystemExit(f"plain variant failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def plain_loop(config: str, overrides: list[str]) -> dict:
    """The synchronous loop's steps in this process, by the same classes the actors hold
    (HFEngine, Judge, PolicyLearner): no Ray, no Arrow batches between stages."""
    import torch

    from rlaif_ray.config import load_config
    from rlaif_ray.cpu.allocator import allocator
    from rlaif_ray.data.tasks import PromptSampler, task_prompts
    from rlaif_ray.engines.devices import dtype_name
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.feedback.labeling import load_judge
    from rlaif_ray.feedback.pairs import load_exemplars
    from rlaif_ray.feedback.scoring import pairwise_rewards
    from rlaif_ray.rl.learner import PolicyLearner, loss_normalisers
    from rlaif_ray.rl.losses import adaptive_kl_beta
    from rlaif_ray.run.resolve import resolve_auto

    assert "ray" not in sys.modules, "the plain variant must not import ray"
    cfg = resolve_auto(load_config(config, overrides))  # the threads `train` would give each role
    switch_malloc = cfg.rl.release_memory and allocator() != "jemalloc"  # jemalloc: no per-stage settings
    p, g, rc, rlc = cfg.pipeline, cfg.generation, cfg.reward, cfg.rl
    if any(r.num_actors != 1 or r.num_gpus for r in (p.generators, p.labelers, p.learner)) \
            or g.backend != "hf" or rc.backend != "hf" or rc.source not in ("direct", "pairwise"):
        raise SystemExit("the plain variant covers one CPU actor per role, hf backends, reward.source direct/pairwise")
    torch.set_num_threads(p.generators.torch_threads)
    gen = HFEngine(cfg.model.name, dtype=cfg.model.dtype)  # as RolloutGenerator
    tok = gen.tok
    items_all = task_prompts(cfg.task, tok).train
    torch.set_num_threads(p.labelers.torch_threads)
    judge, _ = load_judge(rc, rc.model or cfg.model.name, cfg.model.dtype, "cpu")  # as Labeler
    shots = load_exemplars(rc.pairwise.exemplars_path, rc.pairwise.shots)
    torch.set_num_threads(p.learner.torch_threads)  # as LearnerWorker
    learner = PolicyLearner(cfg.model.name, rlc, g.temperature, "cpu", cfg.model.dtype, top_k=g.top_k, top_p=g.top_p)

    sampler = PromptSampler(items_all, rlc.seed)
    stage = {"generator": 0.0, "labeler": 0.0, "learner": 0.0, "weight_sync": 0.0}
    cpu = dict.fromkeys(stage, 0.0)  # CPU seconds of this process (all threads) per stage
    out_rows, completions, dirty, beta = [], 0, False, rlc.beta
    t_loop, c_loop = time.perf_counter(), time.process_time()
    for step in range(1, rlc.steps + 1):
        batch_index = step - 1
        items = sampler.next(rlc.prompts_per_step)
        # weight sync: the generator installs the newest policy before its batch
        torch.set_num_threads(p.generators.torch_threads)
        if switch_malloc:
            mallopt(*GLIBC_CEILING)
        t0, c0 = time.perf_counter(), time.process_time()
        if dirty:
            gen.load_weights(dict(learner.state_for_sync(dtype_name(gen.dtype))))
        stage["weight_sync"] += time.perf_counter() - t0
        cpu["weight_sync"] += time.process_time() - c0
        # generator
        t0, c0 = time.perf_counter(), time.process_time()
        expanded = [(it, k) for it in items for k in range(rlc.samples_per_prompt)]
        tokens, logps, truncated = gen.generate([it["prompt_token_ids"] for it, _ in expanded], temperature=g.temperature,
                                                top_p=g.top_p, top_k=g.top_k, max_new_tokens=g.max_new_tokens,
                                                seed=rlc.seed * 1_000_003 + batch_index * 101)
        texts = [tok.decode(t, skip_special_tokens=True) for t in tokens]
        if g.strip_trailing:
            texts = [t.strip().rstrip(". ").strip() or t.strip() for t in texts]
        stage["generator"] += time.perf_counter() - t0
        cpu["generator"] += time.process_time() - c0
        # labeler
        torch.set_num_threads(p.labelers.torch_threads)
        t0, c0 = time.perf_counter(), time.process_time()
        contexts = [it["context"] for it, _ in expanded]
        if rc.source == "direct":
            rewards, _, metas = judge.score(contexts, texts)
            mass = [json.loads(m).get("label_mass", 1.0) for m in metas]
        else:  # samples (0, 1), (2, 3), ... of a prompt compared, both orders
            pairs = [(i, i + 1) for i, (_, k) in enumerate(expanded) if k % 2 == 0]
            pref = judge.prefer([contexts[i] for i, _ in pairs], [texts[i] for i, _ in pairs],
                                [texts[j] for _, j in pairs], rc.pairwise, shots)
            rewards, mass = [0.0] * len(texts), [1.0] * len(texts)
            for (i, j), pa_, m in zip(pairs, pref.p_a, pref.label_mass):
                r_a, r_b = pairwise_rewards(torch.tensor(pa_))
                rewards[i], rewards[j], mass[i], mass[j] = float(r_a), float(r_b), m, m
        stage["labeler"] += time.perf_counter() - t0
        cpu["labeler"] += time.process_time() - c0
        # learner (what LearnerWorker.train_step calls, one rank)
        torch.set_num_threads(p.learner.torch_threads)
        if switch_malloc:
            mallopt(*LEARNER)
        t0, c0 = time.perf_counter(), time.process_time()
        rows = [{"prompt_id": it["prompt_id"], "prompt_token_ids": it["prompt_token_ids"], "response_token_ids": t,
                 "behaviour_logprobs": lp, "reward": r, "reward_ok": m >= rc.min_label_mass,
                 "rollout_id": f"b{batch_index}:{it['prompt_id']}:{k}", "batch_index": batch_index}
                for (it, k), t, lp, r, m in zip(expanded, tokens, logps, rewards, mass)]
        try:
            stats = learner.step(rows, *loss_normalisers(tokens, [r["reward_ok"] for r in rows]), beta=beta)
        except Exception as err:  # noqa: BLE001
            raise SystemExit(f"step {step}: {err}") from None
        stage["learner"] += time.perf_counter() - t0
        cpu["learner"] += time.process_time() - c0
        dirty = True
        completions += len(tokens)
        out_rows.append({"reward_mean": sum(rewards) / len(rewards), "loss": stats["loss_sum"], "beta": beta,
                         "kl": stats["kl_sum"] / max(stats["usable_rows"], 1)})
        if rlc.kl_control == "adaptive" and stats["usable_rows"]:  # as the driver (commands.pipeline next_beta)
            beta = adaptive_kl_beta(beta, stats["kl_sum"] / stats["usable_rows"], rlc.kl_target, rlc.kl_horizon,
                                    stats["usable_rows"])
    steps_s, cpu_s = time.perf_counter() - t_loop, time.process_time() - c_loop
    return {"variant": "plain", "allocator": allocator(), "steps": rlc.steps, "completions": completions, "steps_s": steps_s,
            "completions_per_s": completions / steps_s, "stage_s": stage, "cpu_s": cpu_s, "stage_cpu_s": cpu,
            "reward_mean": [r["reward_mean"] for r in out_rows], "loss": [r["loss"] for r in out_rows],
            "kl": [r["kl"] for r in out_rows], "beta": [r["beta"] for r in out_rows], "ray_imported": "ray" in sys.modules,
            "arrow_imported": "pyarrow" in sys.modules}


def summarize(runs: list[dict]) -> dict:
    """The figures from the alternated runs: medians, ratios, per-step stage and CPU seconds. Ray is
    measured against the faster plain variant (the baseline), pair by pair against that variant."""
    pairs = sorted({r["pair"] for r in runs})
    names = list(dict.fromkeys(r["variant"] for r in runs))
    by = {v: [r for r in runs if r["variant"] == v] for v in names}
    med = {v: statistics.median(r["completions_per_s"] for r in by[v]) for v in names}
    base = max((v for v in names if v != "ray"), key=med.get)
    pair_ratio = [next(r for r in by["ray"] if r["pair"] == i)["completions_per_s"] /
                  next(r for r in by[base] if r["pair"] == i)["completions_per_s"] for i in pairs]
    diff = {k: max(abs(a - b) for x in by["ray"] for y in runs if y["variant"] != "ray" for a, b in zip(x[k], y[k]))
            for k in ("reward_mean", "loss", "beta")}

    def per_step(r: dict) -> dict:
        d = {n: sum(v for k, v in r["stage_s"].items() if k.startswith(n)) / r["steps"]
             for n in ("generator", "labeler", "learner", "weight_sync") if any(k.startswith(n) for k in r["stage_s"])}
        d["loop"] = r["steps_s"] / r["steps"]
        d["outside_stages"] = d["loop"] - d["generator"] - d["labeler"] - d["learner"]  # no stage timer covers it
        return d

    def medians(ds: list[dict]) -> dict:
        return {k: statistics.median(d.get(k, 0.0) for d in ds) for k in ds[0]}

    cpu = {v: statistics.median(r["cpu_s"] / r["steps"] for r in by[v]) for v in names}
    kinds = sorted({k for r in by["ray"] for k in r["cpu_s_by_process"]})
    return {
        "completions_per_s": med, "plain_baseline": base, "ratio_ray_over_plain": med["ray"] / med[base],
        "ray_slower_by": med[base] / med["ray"] - 1, "pair_ratios_ray_over_plain": pair_ratio,
        "target": "Ray at most 5% slower than the faster plain variant (ray_slower_by <= 0.05)",
        "meets_target": med[base] / med["ray"] - 1 <= 0.05,
        "stage_s_per_step_median": {v: medians([per_step(r) for r in by[v]]) for v in names},
        "max_abs_diff": diff, "cpu_s_per_step_median": cpu, "ratio_cpu_ray_over_plain": cpu["ray"] / cpu[base],
        "ray_cpu_s_per_step_by_process_median": {k: statistics.median(r["cpu_s_by_process"].get(k, 0.0) / r["steps"]
                                                                      for r in by["ray"]) for k in kinds}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "overhead.json"))
    ap.add_argument("--plain-worker", help=argparse.SUPPRESS)  # internal: one plain run, result to this file
    args = ap.parse_args()
    overrides = FIXED + args.overrides
    if args.plain_worker:
        Path(args.plain_worker).write_text(json.dumps(plain_loop(args.config, overrides)))
        return

    runs = []
    load_before = os.getloadavg()
    t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for variant, env in {"ray": {}, **plain_variants()}.items():
                out = Path(tmp) / f"{variant}-{i}"
                r = run_ray(args.config, overrides, out) if variant == "ray" else \
                    run_plain(args.config, args.overrides, out.with_suffix(".json"), env)
                r["variant"], r["pair"] = variant, i
                runs.append(r)
                print(json.dumps({k: v for k, v in r.items() if k not in ("reward_mean", "loss", "kl", "beta")}), flush=True)
    load_after = os.getloadavg()
    result = {
        "what": "completions/s of the synchronous loop (max_staleness 0): Ray pipeline vs the same steps in one "
                "plain Python process (no Ray, no Arrow) on glibc and on jemalloc, alternated; loop time only (model "
                "loading, Ray start-up and the final checkpoint write excluded from all)",
        "config": args.config, "overrides": overrides, "pairs": args.pairs, **summarize(runs),
        "load_before": load_before, "load_after": load_after, "cpus": os.cpu_count(),
        "machine": platform.machine(), "versions": versions(), "time": t_start, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    med, cpu, base = result["completions_per_s"], result["cpu_s_per_step_median"], result["plain_baseline"]
    print(f"ray / {base} completions/s: {result['ratio_ray_over_plain']:.3f} ({med['ray']:.3f} vs {med[base]:.3f}; "
          + ", ".join(f"{v} {m:.3f}" for v, m in med.items() if v not in ("ray", base)) + "); "
          f"Ray slower by {result['ray_slower_by']:+.1%}; CPU s per step ray / {base} {cpu['ray']:.1f} / {cpu[base]:.1f}; "
          f"max |reward diff| {result['max_abs_diff']['reward_mean']:.2e}")


if __name__ == "__main__":
    main()
