"""The RL driver: prompts -> generators -> labelers -> learner group -> weights -> generators.

The whole loop is `train` below. Ray futures are used directly: the driver keeps up to
`max_staleness + 1` batches in flight, so generators sample batch k+1 (and labelers score
it) while the learner trains on batch k; with max_staleness = 0 it is the synchronous
on-policy loop.
"""
from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

import ray

from . import schemas
from .config import Config
from .data import PromptSampler, build_prompts, load_tldr, prompt_batch
from .models import load_tokenizer
from .runlog import RunFolder


class StalenessError(RuntimeError):
    pass


class WeightSyncTimeout(RuntimeError):
    pass


def start_ray(cfg: Config) -> bool:
    """Start (or join) Ray; returns whether this call started it."""
    if ray.is_initialized():
        return False
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 dashboard_host=cfg.ray.dashboard_host, runtime_env={"env_vars": env})
    return True


def start_actors(cfg: Config, tag: str = ""):
    """Every role in its own actor (process), resources from the config. `tag` makes the
    actor names unique per run, so they read as generator-0@RUN in the dashboard."""
    from actors.generator import RolloutGenerator
    from actors.labeler import Labeler
    from actors.learner import LearnerGroup, LearnerWorker

    p, m = cfg.pipeline, cfg.model

    def opts(role, name):
        return dict(name=f"{name}@{tag}" if tag else name, num_cpus=role.num_cpus, num_gpus=role.num_gpus, max_restarts=role.max_restarts)

    def device(role):
        return "cuda" if role.num_gpus > 0 else "cpu"

    gens = [ray.remote(RolloutGenerator).options(max_concurrency=2, **opts(p.generators, f"generator-{i}")).remote(
        f"generator-{i}", m.name, m.dtype, cfg.generation.model_dump(), p.generators.torch_threads,
        device(p.generators)) for i in range(p.generators.num_actors)]
    labelers = [ray.remote(Labeler).options(**opts(p.labelers, f"labeler-{i}")).remote(
        f"labeler-{i}", cfg.reward.model or m.name, m.dtype, cfg.reward.scorer, cfg.reward.batch_size,
        p.labelers.torch_threads, device(p.labelers), cfg.reward.backend) for i in range(p.labelers.num_actors)]
    learner_opts = opts(p.learner, "")
    learner_opts.pop("name")
    learner = LearnerGroup(ray.remote(LearnerWorker), p.learner.num_actors, learner_opts, tag,
                           model_name=m.name, dtype=m.dtype, rl_cfg=cfg.rl.model_dump(),
                           temperature=cfg.generation.temperature, torch_threads=p.learner.torch_threads,
                           device=device(p.learner))
    return gens, labelers, learner


def split(items: list, n: int) -> list[list]:
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return [o for o in out if o]


def dispatch(gens, labelers, items, batch_index, samples, seed, mode, temperature=None):
    """Generate with every generator on a shard of the prompts and chain each shard's
    scoring on a labeler: futures only, nothing waits here."""
    refs = []
    for i, shard in enumerate(split(items, len(gens))):
        rollouts = gens[i].generate.remote(prompt_batch(shard), batch_index, samples, seed + i, temperature)
        refs.append(labelers[i % len(labelers)].score.remote(rollouts, mode))
    return refs


def sync_weights(gens, weights_ref, version: int, timeout: float, names: list[str] | None = None) -> None:
    """Send the new weights to every generator; an actor that does not acknowledge within
    `timeout` seconds is named in the error (never a hang)."""
    names = names or [f"generator-{i}" for i in range(len(gens))]
    acks = [g.set_weights.remote(weights_ref, version) for g in gens]
    ready, _ = ray.wait(acks, num_returns=len(acks), timeout=timeout)
    if len(ready) < len(acks):
        late = [n for n, a in zip(names, acks) if a not in ready]
        raise WeightSyncTimeout(f"weight sync to version {version} not acknowledged within {timeout:.0f}s by {late}")
    ray.get(acks)  # re-raise an actor's own error


def evaluate(gens, labelers, items, cfg: Config) -> dict:
    """Mean reward and response length on held-out prompts, same seed every time."""
    refs = dispatch(gens, labelers, items, -1, 1, cfg.rl.seed + 999, "direct", cfg.eval.temperature)
    batch = schemas.concat(ray.get(refs, timeout=cfg.pipeline.batch_timeout_s), schemas.SCORED)
    rewards = batch.column("reward").to_pylist()
    lengths = [len(t) for t in batch.column("response_token_ids").to_pylist()]
    return {"reward_mean": sum(rewards) / len(rewards), "length_tokens": sum(lengths) / len(lengths),
            "n": len(rewards), "rewards": dict(zip(batch.column("prompt_id").to_pylist(), rewards)),
            "examples": batch.select(["prompt_id", "response_text", "reward"]).to_pylist()[:3]}


def paired_change(before: dict, after: dict) -> tuple[float, float]:
    """Mean per-prompt reward change and its 95% half-width (normal approximation)."""
    diffs = [after[k] - before[k] for k in before if k in after]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    return mean, 1.96 * sd / n ** 0.5


def train(cfg: Config, out: str | Path | None = None, log=print) -> Path:
    run = RunFolder(cfg, out)
    tok = load_tokenizer(cfg.model.name)
    rows = load_tldr(cfg.task.data_path)
    prompts = build_prompts(rows, tok, cfg.task)
    if cfg.rl.prompts_per_step > len(prompts.train):
        raise ValueError(f"rl.prompts_per_step={cfg.rl.prompts_per_step} exceeds the {len(prompts.train)} train prompts")
    log(f"prompts: {len(prompts.train)} train, {len(prompts.heldout)} held out; "
        f"{prompts.skipped_long} skipped and {prompts.truncated} truncated (> {cfg.task.max_prompt_tokens} tokens)")
    started = start_ray(cfg)
    gens, labelers, learner = start_actors(cfg, run.path.name)
    try:
        summary: dict = {"run_dir": str(run.path), "skipped_long_prompts": prompts.skipped_long,
                         "processes": {i["name"]: i["pid"] for i in ray.get(
                             [a.info.remote() for a in gens + labelers + learner.workers])}}
        if cfg.eval.signal_posts:  # how far can this judge be trusted? measured, not assumed
            heldout_rows = rows[-max(cfg.eval.signal_posts + 1, cfg.task.heldout_size):]
            sig = ray.get(labelers[0].signal.remote(heldout_rows, cfg.eval.signal_posts))
            summary["signal"] = sig
            log(f"judge signal ({sig['scorer']}): reference summary beats another post's summary "
                f"{sig['reference_wins']:.0%} of {sig['n']} (95% CI {sig['ci95'][0]:.0%}-{sig['ci95'][1]:.0%}; 50% = no signal)")
        eval_items = prompts.heldout[:cfg.eval.num_prompts]
        if eval_items:
            summary["heldout_before"] = evaluate(gens, labelers, eval_items, cfg)
            log(f"held-out reward before training: {summary['heldout_before']['reward_mean']:+.4f} "
                f"(mean length {summary['heldout_before']['length_tokens']:.1f} tokens)")

        sampler = PromptSampler(prompts.train, cfg.rl.seed)
        version, launched, trained = 0, 0, 0
        inflight: deque = deque()  # (batch_index, sampler state before it, futures)
        t_loop = time.perf_counter()
        for step in range(1, cfg.rl.steps + 1):
            # keep up to max_staleness + 1 batches in flight: overlap without exceeding the lag bound
            while launched < cfg.rl.steps and len(inflight) <= cfg.rl.max_staleness:
                state = sampler.state()
                items = sampler.next(cfg.rl.prompts_per_step)
                refs = dispatch(gens, labelers, items, launched, cfg.rl.samples_per_prompt,
                                cfg.rl.seed * 1_000_003 + launched * 101, cfg.reward.source)
                inflight.append((launched, state, refs))
                launched += 1
            batch_index, _, refs = inflight.popleft()
            t_wait = time.perf_counter()
            batch = schemas.concat(ray.get(refs, timeout=cfg.pipeline.batch_timeout_s), schemas.SCORED)
            waited = time.perf_counter() - t_wait
            lag = version - min(batch.column("policy_version").to_pylist())
            if lag > cfg.rl.max_staleness:
                raise StalenessError(f"batch {batch_index} has policy lag {lag} > rl.max_staleness={cfg.rl.max_staleness}")

            stats = learner.train(batch, cfg.rl.loss_agg)
            version += 1
            sync_weights(gens, learner.weights(), version, cfg.pipeline.sync_timeout_s)

            trained += batch.num_rows
            rewards = batch.column("reward").to_pylist()
            lengths = [len(t) for t in batch.column("response_token_ids").to_pylist()]
            row = {"step": step, "policy_version": version, "batch_index": batch_index, "staleness": lag,
                   "reward_mean": sum(rewards) / len(rewards), "kl": stats["kl"], "loss": stats["loss"],
                   "pg_loss": stats["pg_loss"], "value_loss": stats["value_loss"],
                   "ratio_mean": stats["ratio_mean"], "ratio_clipped_frac": stats["ratio_clipped_frac"],
                   "grad_norm": stats["grad_norm"], "response_len": sum(lengths) / len(lengths),
                   "truncated": sum(batch.column("truncated").to_pylist()), "completions": batch.num_rows,
                   "completions_per_s": trained / (time.perf_counter() - t_loop), "waited_for_batch_s": waited,
                   "elapsed_s": time.perf_counter() - t_loop}
            run.log_metrics(row)
            if cfg.run.log_rollouts:
                run.log_rollouts(batch, step)
            log(f"step {step:3d}/{cfg.rl.steps} | v{version} | reward {row['reward_mean']:+.4f} | kl {row['kl']:+.4f} "
                f"| loss {row['loss']:+.4f} | {row['completions_per_s']:.2f} compl/s | staleness {lag} "
                f"| len {row['response_len']:.1f}")
            if step == cfg.rl.steps or (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
                nxt = inflight[0][:2] if inflight else (launched, sampler.state())
                learner.save(str(run.checkpoint_dir(step)), {"step": step, "policy_version": version,
                                                             "next_batch_index": nxt[0], "sampler": nxt[1]})
                run.mark_checkpoint(step)

        summary["loop_s"] = time.perf_counter() - t_loop
        summary["completions_per_s"] = trained / summary["loop_s"]
        if eval_items:
            summary["heldout_after"] = evaluate(gens, labelers, eval_items, cfg)
            b, a = summary["heldout_before"], summary["heldout_after"]
            delta, half = paired_change(b["rewards"], a["rewards"])
            summary["heldout_change"] = {"mean": delta, "ci95_halfwidth": half}
            log(f"held-out reward (same frozen judge, {a['n']} prompts): initial {b['reward_mean']:+.4f} -> "
                f"final {a['reward_mean']:+.4f} ({delta:+.4f} +- {half:.4f}, paired 95% CI); "
                f"length {b['length_tokens']:.1f} -> {a['length_tokens']:.1f} tokens")
        summary["stage_busy_s"] = {i["name"]: i["busy_s"] for i in ray.get(
            [a.info.remote() for a in gens + labelers + learner.workers])}
        run.write_json("summary.json", summary)
        log(f"run folder: {run.path}")
        return run.path
    finally:
        for a in gens + labelers + learner.workers:
            ray.kill(a)
        if started:
            ray.shutdown()
