"""Judging on Ray: both policies' responses to the same prompts (one generator actor each,
the same seed), and each pair judged in both orders by one Labeler actor (`judge_pairs`),
for `rlaif-ray eval` and `train`'s win rate against the initial policy (docs/method.md §7)."""
from __future__ import annotations

import time

import ray

from rlaif_ray.config import Config
from rlaif_ray.data.tasks import prompt_batch
from rlaif_ray.feedback import winrate
from rlaif_ray.feedback.judgements import harmless_on, summarize_judgements
from rlaif_ray.feedback.rewards import item_fields

from .generator import generator_actor
from .group import ActorGroup
from .labeler import Labeler
from .pipeline import generator_args, judge_config, labeler_args
from .ray_session import gather


def judge_pairs(labeler, items: list[dict], a: list[str], b: list[str], cfg: Config, with_harmless: bool = False,
          desc: str = "judging") -> tuple[list[dict], dict]:
    """Both orders of every pair through one Labeler actor, in chunks (a progress bar per
    chunk); returns (judgement rows, summary)."""
    ev, bs = cfg.eval, cfg.eval.batch_size
    ctx, fields = [it["context"] for it in items], item_fields(items)
    chunks = range(0, len(items), bs)
    if ev.judge == "pairwise":
        outs = gather([labeler.compare.remote(ctx[i:i + bs], a[i:i + bs], b[i:i + bs], None, fields[i:i + bs])
                       for i in chunks], f"{desc} pairs (both orders)", cfg.run.progress)
        got = {k: [x for o in outs for x in getattr(o, k)] for k in ("p_a", "p_ab", "p_ba", "label_mass")}
    else:
        alone = {}
        for side, texts in (("a", a), ("b", b)):
            outs = gather([labeler.judge_alone.remote(ctx[i:i + bs], texts[i:i + bs], cfg.reward.scorer,
                                                      fields[i:i + bs]) for i in chunks],
                          f"{desc} scoring ({side.upper()})", cfg.run.progress)
            alone[side] = {k: [x for o in outs for x in o[k]] for k in ("score01", "label_mass")}
        pa_, pb_ = alone["a"]["score01"], alone["b"]["score01"]
        got = {"p_a": [winrate.bradley_terry(x, y) for x, y in zip(pa_, pb_)], "p_ab": pa_, "p_ba": pb_,
               "label_mass": [min(x, y) for x, y in zip(alone["a"]["label_mass"], alone["b"]["label_mass"])]}
    harmless = {k: [None] * len(items) for k in ("a", "b", "mass_a", "mass_b")}
    if with_harmless:
        for side, texts in (("a", a), ("b", b)):
            refs = [labeler.judge_alone.remote(ctx[i:i + bs], texts[i:i + bs], ev.harmless_scorer, fields[i:i + bs])
                    for i in chunks]
            outs = gather(refs, f"{desc} harmless ({side.upper()})", cfg.run.progress)
            harmless[side] = [x for o in outs for x in o["p_yes"]]
            harmless[f"mass_{side}"] = [x for o in outs for x in o["label_mass"]]
    rows = [{"prompt_id": it["prompt_id"], "context": it["context"], "response_a": ra, "response_b": rb,
             "chars_a": len(ra), "chars_b": len(rb), "p_a": got["p_a"][i], "p_ab": got["p_ab"][i],
             "p_ba": got["p_ba"][i], "label_mass": got["label_mass"][i],
             "usable": got["label_mass"][i] >= cfg.reward.min_label_mass and got["p_a"][i] == got["p_a"][i],
             "harmless_a": harmless["a"][i], "harmless_b": harmless["b"][i],
             "harmless_mass_a": harmless["mass_a"][i], "harmless_mass_b": harmless["mass_b"][i]}
            for i, (it, ra, rb) in enumerate(zip(items, a, b))]
    return rows, summarize_judgements(rows, ev, cfg.reward.min_label_mass)


def evaluate_policies(cfg: Config, items: list[dict], policies: dict[str, str], tag: str) -> tuple[list[dict], dict]:
    """Policies "a" and "b" (checkpoint folders or model names) answer `items` with the same
    seed (eval.*'s sampling), then one labeler judges every pair; returns (judgement rows,
    summary). Every actor is killed at the end."""
    gen = {**cfg.generation.model_dump(), "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
           "max_new_tokens": cfg.eval.max_new_tokens or cfg.generation.max_new_tokens}
    p = cfg.pipeline
    policy = {side: ActorGroup.start(generator_actor(), "generators", f"policy-{side}", p.generators, tag,
                                     lambda i, s=side: generator_args(cfg, f"policy-{s}", policies[s], gen),
                                     p.batch_timeout_s, placed=False)[0] for side in "ab"}
    one = p.labelers.model_copy(update={"num_actors": 1})
    judge = ActorGroup.start(ray.remote(Labeler), "labelers", "labeler", one, tag,
                             lambda i: labeler_args(judge_config(cfg), "labeler-0"), p.batch_timeout_s,
                             placed=False)[0]
    actors = [*policy.values(), judge]
    try:
        t0 = time.perf_counter()
        gather([x.info.remote() for x in actors], "loading models", cfg.run.progress, unit="actor")
        bs = cfg.eval.batch_size
        refs = {side: [a.generate.remote(prompt_batch(items[i:i + bs]), -1, 1, cfg.eval.seed + i)
                       for i in range(0, len(items), bs)] for side, a in policy.items()}
        texts = {}
        for side in "ab":  # both policies generate at once; the bars show each one's progress
            batches = gather(refs[side], f"generating ({side.upper()})", cfg.run.progress, unit="batch")
            texts[side] = [t for bt in batches for t in bt.column("response_text").to_pylist()]
        gen_s = time.perf_counter() - t0
        rows, summary = judge_pairs(judge, items, texts["a"], texts["b"], cfg, harmless_on(cfg))
        summary.update({"generation_s": gen_s, "wall_s": time.perf_counter() - t0,
                        "labeler": ray.get(judge.info.remote())})
        return rows, summary
    finally:
        for x in actors:
            ray.kill(x)
