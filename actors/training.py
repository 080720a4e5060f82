"""A training run on Ray: `run_training` is the whole run in named phases; `rl_loop` is the
RL loop itself, on one screen. Ray futures are used directly: up to rl.max_staleness + 1
batches are in flight, so generators sample batch k+1 (and labelers score it) while the
learner trains on batch k; with max_staleness = 0 it is the synchronous on-policy loop. The
machinery (actors, weight sync, recovery) is in actors/pipeline.py; `rlaif-ray train`
(actors/training.py) checks everything first and calls `run_training`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import ray

from rlaif_ray.config import Config, judge_is_reward_model
from rlaif_ray.data import schemas
from rlaif_ray.data.tasks import PromptSampler, PromptSet
from rlaif_ray.feedback.judgements import harmless_on
from rlaif_ray.feedback.stats import paired_change
from rlaif_ray.rl.learner import NonFiniteError
from rlaif_ray.run.folder import RunFolder, RunStateError
from rlaif_ray.run.measures import DECIMALS, MEASURES, compare_heldout, means, pick_examples, task_measures

from .evaluation import judge_pairs
from .pipeline import Pipeline, Rollouts


def run_training(cfg: Config, run: RunFolder, prompts: PromptSet, resumed: bool, log=print) -> None:
    """The whole run on a Ray session the caller holds: the actors, the measurements before
    training, the RL loop, the measurements after; a resumed run continues after its last
    checkpoint. Every actor is killed at the end, whatever happens."""
    pipe = Pipeline(cfg, run.path.name, log)
    try:
        eval_items = prompts.heldout[:cfg.eval.num_prompts]
        summary = before_training(pipe, run, eval_items, prompts, resumed)
        sampler, first_step = PromptSampler(prompts.train, cfg.rl.seed), 1
        if resumed:
            first_step = resume_run(pipe, run, sampler)
        rl_loop(pipe, run, sampler, first_step, summary, eval_items)
        after_training(pipe, run, summary, eval_items)
    finally:
        pipe.kill()


def rl_loop(pipe: Pipeline, run: RunFolder, sampler: PromptSampler, first_step: int, summary: dict,
            eval_items: list) -> None:
    """Launch up to max_staleness + 1 batches, take the oldest, train on it (which publishes
    the new weights), log, checkpoint, and now and then evaluate."""
    cfg, trained, t_loop = pipe.cfg, 0, time.perf_counter()
    warned_unusable = False  # a step with no usable label is said once; the counts go on in metrics.jsonl
    for step in range(first_step, cfg.rl.steps + 1):
        pipe.launch(sampler)
        batch, index, lag, waited = pipe.take()
        try:
            stats = pipe.train(batch)
        except NonFiniteError as err:  # nothing was applied; the last checkpoint is the last good one
            raise NonFiniteError(f"step {step}: {err}; last good checkpoint: {pipe.checkpoint}") from None
        trained += batch.num_rows
        elapsed = time.perf_counter() - t_loop
        row = metrics_row(step, pipe.version, index, lag, batch, stats, waited, elapsed, trained / elapsed)
        run.log_metrics(row)
        for k, v in (("queue_depth", len(pipe.inflight)), ("policy_lag", lag), ("reward_mean", row["reward_mean"]),
                     ("kl", row["kl"]), ("learner_wait_s", waited)):
            pipe.metrics.set(k, v)
        if cfg.run.log_rollouts:
            run.log_rollouts(batch, step)
        pipe.log(f"step {step:3d}/{cfg.rl.steps} | v{pipe.version} | reward {row['reward_mean']:+.4f} "
                 f"| kl {row['kl_per_seq']:+.4f}/seq {row['kl_per_token']:+.5f}/tok | beta {row['kl_beta']:.4g} "
                 f"| loss {row['loss']:+.4f} | {row['completions_per_s']:.2f} compl/s "
                 f"| staleness {lag} | len {row['response_len']:.1f}")
        if row["unusable_labels"] == batch.num_rows and not warned_unusable:
            warned_unusable = True
            problem = endpoint_problem(ray.get([a.info.remote() for a in pipe.labelers]))
            pipe.log(f"warning: step {step}: none of its {batch.num_rows} labels was usable (reward.min_label_mass="
                     f"{cfg.reward.min_label_mass}){f': {problem}' if problem else ''}")
        if step == cfg.rl.steps or (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
            checkpoint(pipe, run, step, sampler, last=step == cfg.rl.steps)
        if cfg.eval.win_rate and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.rl.steps \
                and "heldout_before" in summary:  # "is it learning?" while it runs
            win_rate_vs_initial(pipe, eval_items, summary["heldout_before"],
                                heldout_rewards(pipe, eval_items), step, run)
    summary["loop_s"] = time.perf_counter() - t_loop
    summary["completions_per_s"] = trained / summary["loop_s"]


def checkpoint(pipe: Pipeline, run: RunFolder, step: int, sampler: PromptSampler, last: bool = False) -> None:
    """The learner writes the checkpoint whole or not at all (PolicyLearner.save); only then
    does `latest` name it. A failed write (a full disk) stops the run with one line: `latest`
    still names the previous checkpoint, and --resume continues from there. A sharded learner
    writes its DCP shards, and full HF weights only into the `last` checkpoint."""
    previous = pipe.checkpoint
    try:
        pipe.save(str(run.checkpoint_dir(step)), step, sampler, hf_weights=last)
    except Exception as err:  # noqa: BLE001 - Ray wraps the learner's OSError
        cause = err if isinstance(err, OSError) else getattr(err, "cause", None)
        if not isinstance(cause, OSError):
            raise
        then = (f"checkpoints/latest still names {Path(previous).name}: free space, then "
                f"`rlaif-ray train {run.path / 'config.yaml'} --resume {run.location}`") if previous else \
            "no checkpoint was written before: free space and start the run again"
        raise RunStateError(f"step {step}: writing checkpoint {run.checkpoint_dir(step)} failed ({cause}); {then}") from None
    run.mark_checkpoint(step)


def metrics_row(step, version, index, lag, batch, stats, waited, elapsed, rate) -> dict:
    """One line of metrics.jsonl. The KL to the reference (rl.kl_estimator), over the usable
    rows: `kl_per_seq` the mean over rows of the summed per-token estimate (what
    rl.kl_target steers; `kl` is the same number, kept for older readers), `kl_per_token`
    the mean over their tokens; `kl_beta` the KL weight this step trained with."""
    rewards = [r for r in batch.column("reward").to_pylist() if r == r]  # an unusable label's may be NaN
    lengths = [len(t) for t in batch.column("response_token_ids").to_pylist()]
    return {"step": step, "policy_version": version, "batch_index": index, "staleness": lag,
            "reward_mean": sum(rewards) / max(len(rewards), 1), **part_means(batch), **judge_cost(batch),
            "kl": stats["kl"],
            "kl_per_seq": stats["kl"],
            "kl_per_token": stats["kl_sum"] / max(stats["tokens"], 1), "kl_beta": stats["beta"],
            "loss": stats["loss"],
            "pg_loss": stats["pg_loss"], "value_loss": stats["value_loss"],
            "ratio_mean": stats["ratio_mean"], "ratio_clipped_frac": stats["ratio_clipped_frac"],
            "grad_norm": stats["grad_norm"], "response_len": sum(lengths) / len(lengths),
            "truncated": sum(batch.column("truncated").to_pylist()),
            "unusable_labels": batch.num_rows - sum(batch.column("reward_ok").to_pylist()),
            "completions": batch.num_rows, "completions_per_s": rate,
            "waited_for_batch_s": waited, "elapsed_s": elapsed}


def judge_cost(batch) -> dict:
    """The judge tokens a batch cost (an endpoint judge: the labelers share each call's usage
    out over its rows' reward_meta); {} for a local judge."""
    metas = [json.loads(m) for m in batch.column("reward_meta").to_pylist()]
    keys = ("judge_prompt_tokens", "judge_completion_tokens")
    if not any(k in m for m in metas for k in keys):
        return {}
    return {k: round(sum(m.get(k, 0.0) for m in metas)) for k in keys}


def part_means(batch) -> dict:
    """reward.source sum: each part's mean reward over the batch's usable rows (reward_NAME)."""
    parts = [json.loads(p) for p, ok in zip(batch.column("reward_parts").to_pylist(),
                                            batch.column("reward_ok").to_pylist()) if p and ok]
    names = {k for p in parts for k in p}
    return {f"reward_{k}": sum(p[k] for p in parts if k in p) / max(sum(k in p for p in parts), 1) for k in sorted(names)}


def before_training(pipe: Pipeline, run: RunFolder, eval_items: list, prompts, resumed: bool) -> dict:
    """The start of summary.json: processes, the labeler's signal check and the held-out
    reward before training (a resumed run reads them back)."""
    cfg, log = pipe.cfg, pipe.log
    summary = run.read_json("summary_start.json") if resumed else {}
    summary.update({"run_dir": str(run.location), "skipped_long_prompts": prompts.skipped_long,
                    # what the generators sample with (vLLM: pipeline.generators.vllm.dtype or its rule)
                    "generator_weight_dtype": pipe.weight_dtype,
                    "processes": {i["name"]: i["pid"] for i in ray.get([a.info.remote() for a in pipe.actors()])}})
    run.write_json("processes.json", summary["processes"])
    if resumed:
        return summary
    with_reference = [it for it in prompts.heldout if it.get("reference")]
    if cfg.eval.signal_posts and len(with_reference) > 1:  # how far can this labeler be trusted?
        sig = ray.get(pipe.eval_labeler.signal.remote(with_reference, cfg.eval.signal_posts))
        summary["signal"] = sig
        log(f"judge signal ({sig['scorer']}): a prompt's own reference beats another prompt's "
            f"{sig['reference_wins']:.0%} of {sig['n']} (95% CI {sig['ci95'][0]:.0%}-{sig['ci95'][1]:.0%}; "
            "50% = no signal)")
    if eval_items:
        summary["heldout_before"] = heldout_rewards(pipe, eval_items)
        log(f"held-out reward before training: {summary['heldout_before']['reward_mean']:+.4f} "
            f"(mean length {summary['heldout_before']['length_tokens']:.1f} tokens)")
        # measures that are not the reward, to be paired with the same prompts later (docs/method.md §7.6)
        summary["independent_before"] = means(eval_items, summary["heldout_before"]["responses"],
                                              task_measures(cfg.task.name))
        log("held-out measures before training: " + ", ".join(
            f"{MEASURES[k][0]} {v:.{DECIMALS.get(k, 3)}f}" for k, v in summary["independent_before"].items()
            if v is not None))
    run.write_json("summary_start.json", summary)
    return summary


def resume_run(pipe: Pipeline, run: RunFolder, sampler: PromptSampler) -> int:
    """Continue exactly after the last checkpoint (weights, optimizer, data position);
    returns the first step to run."""
    checkpoint, state = run.latest_checkpoint()
    sampler.load_state(state["sampler"])
    run.truncate_after(state["step"])
    pipe.resume(checkpoint, state)
    pipe.log(f"resumed {run.location} at step {state['step']} (policy version {state['policy_version']})")
    return state["step"] + 1


def after_training(pipe: Pipeline, run: RunFolder, summary: dict, eval_items: list) -> None:
    """Held-out reward after training (paired with before), the win rate against the initial
    policy, busy times; writes summary.json."""
    cfg, log = pipe.cfg, pipe.log
    summary["recoveries"] = pipe.recoveries
    if eval_items and "heldout_before" in summary:
        summary["heldout_after"] = heldout_rewards(pipe, eval_items)
        b, a = summary["heldout_before"], summary["heldout_after"]
        delta, half = paired_change(b["rewards"], a["rewards"])
        summary["heldout_change"] = {"mean": delta, "ci95_halfwidth": half}
        log(f"held-out reward (same frozen judge, {a['n']} prompts): initial {b['reward_mean']:+.4f} -> "
            f"final {a['reward_mean']:+.4f} ({delta:+.4f} +- {half:.4f}, paired 95% CI); "
            f"length {b['length_tokens']:.1f} -> {a['length_tokens']:.1f} tokens")
        if cfg.eval.win_rate:  # did it learn? the final policy against the initial one
            summary["win_rate"] = row = win_rate_vs_initial(pipe, eval_items, b, a, cfg.rl.steps, run)
            comp = {k: row[k] for k in ("reward_change", "independent", "hacking")}
        else:
            comp = compare_heldout(eval_items, b, a, None, task_measures(cfg.task.name))
            log_comparison(log, cfg.rl.steps, b, a, comp, None)
        summary["independent"], summary["hacking"] = comp["independent"], comp["hacking"]
        summary["heldout_examples"] = pick_examples(eval_items, b, a)
    final = ray.get([a.info.remote() for a in pipe.actors()])
    summary["stage_busy_s"] = {i["name"]: i["busy_s"] for i in final}
    # bytes of one weight update from learner rank 0 (model.lora: the adapter alone)
    summary["weight_update_bytes"] = max((i.get("weight_update_bytes") or 0 for i in final), default=0)
    cost = {k: sum(i.get(k, 0) for i in final) for k in ("judge_prompt_tokens", "judge_completion_tokens",
                                                          "endpoint_requests", "endpoint_retries", "endpoint_waited_s",
                                                          "unparsable_answers", "unusable_answers",
                                                          "labels_outside_top_k")}
    if any(cost.values()):  # an endpoint judge: what it cost over the whole run, evaluations included
        summary["judge_usage"] = {**cost, "problem": endpoint_problem(final) or None}
        if cost["unusable_answers"]:
            log(f"warning: the judge endpoint gave {cost['unusable_answers']} unusable answers (counted as unusable "
                f"labels): {summary['judge_usage']['problem']}")
    summary["processes"] = {i["name"]: i["pid"] for i in final}  # after any restart
    run.write_json("summary.json", summary)


def endpoint_problem(infos: list[dict]) -> str:
    """The first problem an endpoint judge's answers had (actors' info(); "" if none)."""
    return next((i["endpoint_problem"] for i in infos if i.get("endpoint_problem")), "")


def heldout_rewards(pipe: Pipeline, items: list) -> dict:
    """Mean reward and response length on held-out prompts, same seeds every time; in
    chunks of eval.batch_size prompts per generator (one call over 48 prompts held GBs)."""
    cfg = pipe.cfg
    n = cfg.eval.batch_size * len(pipe.gens)
    chunks = [Rollouts(pipe, items[i:i + n], -1, 1, cfg.rl.seed + 999 + i, cfg.reward.source, cfg.eval.temperature)
              for i in range(0, len(items), n)]
    batch = schemas.concat([c.get(cfg.pipeline.batch_timeout_s) for c in chunks], schemas.SCORED)
    rewards = batch.column("reward").to_pylist()
    lengths = [len(t) for t in batch.column("response_token_ids").to_pylist()]
    ids = batch.column("prompt_id").to_pylist()
    return {"reward_mean": sum(rewards) / len(rewards), "length_tokens": sum(lengths) / len(lengths),
            "n": len(rewards), "rewards": dict(zip(ids, rewards)),
            "responses": dict(zip(ids, batch.column("response_text").to_pylist())),
            "examples": batch.select(["prompt_id", "response_text", "reward"]).to_pylist()[:3]}


def win_rate_vs_initial(pipe: Pipeline, items, before: dict, now: dict, step: int, run: RunFolder) -> dict:
    """The current policy's held-out responses against the initial policy's (same prompts,
    same seed), judged in both orders by the evaluation labeler (docs/method.md §7)."""
    ids = [it["prompt_id"] for it in items]
    rows, s = judge_pairs(pipe.eval_labeler, items, [now["responses"][i] for i in ids],
                          [before["responses"][i] for i in ids], pipe.cfg, harmless_on(pipe.cfg),
                          desc=f"step {step} win rate:")
    run.log_judgements(rows, step)
    names = task_measures(pipe.cfg.task.name)
    if "win_rate" not in s:  # no usable label: the measures that need no judge still stand
        comp = compare_heldout(items, before, now, None, names)
        log_comparison(pipe.log, step, before, now, comp, f"none ({s['unusable_labels']} unusable labels)")
        return {"step": step, "n": 0, "unusable_labels": s["unusable_labels"], **comp}
    w, lc = s["win_rate"], s["length_controlled"]
    row = {"step": step, "win_rate": w["win_rate"], "ci95": w["ci95"], "n": w["n"], "ties": w["ties"],
           "wins": w["wins"], "losses": w["losses"],
           "length_controlled": lc["value"], "length_controlled_ci95": lc.get("ci95"),
           "soft_win_rate": s["soft_win_rate"]["mean"], "unusable_labels": s["unusable_labels"],
           "mean_chars": s["mean_chars"], **({"harmless": s["harmless"]} if "harmless" in s else {})}
    # beside the win rate: the reward's own change and the measures that are not the reward
    # (docs/method.md §7.6), flat values for TensorBoard and the paired changes in full
    comp = compare_heldout(items, before, now, row, names, judge_is_reward_model(pipe.cfg))
    row.update({"heldout_reward": now["reward_mean"], **{k: m["after"] for k, m in comp["independent"].items()},
                **comp})
    run.log_winrate(row)
    pipe.metrics.set("eval_win_rate", w["win_rate"])
    log_comparison(pipe.log, step, before, now, comp,
                   f"{w['win_rate']:.1%} (95% CI {w['ci95'][0]:.1%}-{w['ci95'][1]:.1%}, n={w['n']}); "
                   f"length-controlled {lc['value']:.1%}; "
                   f"mean chars {s['mean_chars']['a']:.0f} vs {s['mean_chars']['b']:.0f}"
                   + (f"; {s['unusable_labels']} unusable labels left out" if s["unusable_labels"] else ""))
    return row


def log_comparison(log, step: int, before: dict, now: dict, comp: dict, win_rate: str | None) -> None:
    """One block: the training reward's change next to the win rate and the independent
    measures, so that a disagreement shows at a glance; a loud line when it looks like hacking."""
    rc = comp["reward_change"]
    log(f"step {step}: held-out, initial policy -> now ({now['n']} prompts, paired 95% CIs)")
    log(f"  {'held-out reward (training judge)':<34} {before['reward_mean']:+.4f} -> {now['reward_mean']:+.4f}  "
        f"{rc['mean']:+.4f} +- {rc['ci95_halfwidth'] if rc['ci95_halfwidth'] is not None else float('nan'):.4f}")
    if win_rate:
        log(f"  {'win rate vs initial (pairwise)':<34} {win_rate}")
    for name, m in comp["independent"].items():
        half = m["ci95_halfwidth"] if m["ci95_halfwidth"] is not None else float("nan")
        d = DECIMALS.get(name, 3)
        log(f"  {MEASURES[name][0]:<34} {m['before']:.{d}f} -> {m['after']:.{d}f}  {m['change']:+.{d}f} +- {half:.{d}f}")
    v = comp["hacking"]
    log(f"REWARD HACKING SUSPECTED: {v['reason']}" if v["hacking"] else f"  no sign of reward hacking: {v['reason']}")
