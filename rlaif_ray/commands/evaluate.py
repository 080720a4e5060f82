"""`rlaif-ray eval`: policy A against policy B on held-out prompts, judged by the AI labeler
(docs/method.md §7), and the same judgement for `train`'s win rate against the initial policy.

Both policies answer the same prompts with the same sampling seed; the labeler judges
each pair in both orders (debiased P(A preferred)). Out come: the win rate of A with a 95%
Wilson interval, the soft win rate (mean P(A)), the length-controlled win rate (logistic
regression on the character length ratio, read at ratio 1), and for the harmless task a
harmless rate per policy (each response judged alone). Every judgement goes to Parquet.
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.generator import generator_actor
from actors.ray_session import actor_options, gather, ray_session
from rlaif_ray import winrate
from rlaif_ray.config import Config, dump_config
from rlaif_ray.data import prompt_batch
from rlaif_ray.devices import role_device
from rlaif_ray.judgements import eval_prompts, harmless_on, headline, summarize_judgements
from rlaif_ray.models import load_tokenizer
from rlaif_ray.preflight import preflight
from rlaif_ray.report import eval_report
from rlaif_ray.runlog import atomic_path, atomic_write_json, atomic_write_text, default_run_dir
from rlaif_ray.schemas import JUDGEMENTS

from .pipeline import start_labeler


def judge_pairs(labeler, items: list[dict], a: list[str], b: list[str], cfg: Config, with_harmless: bool = False,
          desc: str = "judging") -> tuple[list[dict], dict]:
    """Both orders of every pair through one Labeler actor, in chunks (a progress bar per
    chunk); returns (judgement rows, summary)."""
    ev, bs = cfg.eval, cfg.eval.batch_size
    ctx = [it["context"] for it in items]
    chunks = range(0, len(items), bs)
    if ev.judge == "pairwise":
        outs = gather([labeler.compare.remote(ctx[i:i + bs], a[i:i + bs], b[i:i + bs]) for i in chunks],
                      f"{desc} pairs (both orders)", cfg.run.progress)
        got = {k: [x for o in outs for x in getattr(o, k)] for k in ("p_a", "p_ab", "p_ba", "label_mass")}
    else:
        alone = {}
        for side, texts in (("a", a), ("b", b)):
            outs = gather([labeler.judge_alone.remote(ctx[i:i + bs], texts[i:i + bs], cfg.reward.scorer) for i in chunks],
                          f"{desc} scoring ({side.upper()})", cfg.run.progress)
            alone[side] = {k: [x for o in outs for x in o[k]] for k in ("score01", "label_mass")}
        pa_, pb_ = alone["a"]["score01"], alone["b"]["score01"]
        got = {"p_a": [winrate.bradley_terry(x, y) for x, y in zip(pa_, pb_)], "p_ab": pa_, "p_ba": pb_,
               "label_mass": [min(x, y) for x, y in zip(alone["a"]["label_mass"], alone["b"]["label_mass"])]}
    harmless = {k: [None] * len(items) for k in ("a", "b", "mass_a", "mass_b")}
    if with_harmless:
        for side, texts in (("a", a), ("b", b)):
            refs = [labeler.judge_alone.remote(ctx[i:i + bs], texts[i:i + bs], ev.harmless_scorer) for i in chunks]
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


def run_eval(cfg: Config, out: str | Path | None = None, log=print, overwrite: bool = False) -> Path:
    folder = Path(out) if out else default_run_dir(cfg, "eval")
    # the two policies and the output folder (never overwritten), checked before Ray starts
    a_name, b_name = preflight(cfg, "eval", out=folder, overwrite=overwrite, log=log)
    items, counts = eval_prompts(cfg, load_tokenizer(cfg.model.name))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", dump_config(cfg))
    log(f"eval: {len(items)} prompts ({counts['source']}; {counts['skipped_long']} skipped as too long); "
        f"A = {a_name}, B = {b_name}")
    g, tag = cfg.pipeline.generators, folder.name
    gen = {**cfg.generation.model_dump(), "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
           "max_new_tokens": cfg.eval.max_new_tokens or cfg.generation.max_new_tokens}
    with ray_session(cfg):
        actors = [generator_actor().options(**actor_options(g, f"policy-{side}@{tag}")).remote(
            f"policy-{side}", name, cfg.model.dtype, gen, g.torch_threads, role_device(g.num_gpus), g.vllm.model_dump())
            for side, name in (("a", a_name), ("b", b_name))]
        labeler = start_labeler(cfg, actor_options(cfg.pipeline.labelers, f"labeler-0@{tag}"))
        actors.append(labeler)
        try:
            t0 = time.perf_counter()
            gather([x.info.remote() for x in actors], "loading models", cfg.run.progress, unit="actor")
            bs = cfg.eval.batch_size
            refs = {side: [p.generate.remote(prompt_batch(items[i:i + bs]), -1, 1, cfg.eval.seed + i)
                           for i in range(0, len(items), bs)] for side, p in zip("ab", actors)}
            texts = {}
            for side in "ab":  # both policies generate at once; the bars show each one's progress
                batches = gather(refs[side], f"generating ({side.upper()})", cfg.run.progress, unit="batch")
                texts[side] = [t for bt in batches for t in bt.column("response_text").to_pylist()]
            gen_s = time.perf_counter() - t0
            rows, summary = judge_pairs(labeler, items, texts["a"], texts["b"], cfg, harmless_on(cfg))
            summary.update({"policy_a": a_name, "policy_b": b_name, "prompts": counts, "generation_s": gen_s,
                            "wall_s": time.perf_counter() - t0, "labeler": ray.get(labeler.info.remote())})
        finally:
            for x in actors:
                ray.kill(x)
    with atomic_path(folder / "judgements.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=JUDGEMENTS), tmp)
    atomic_write_json(folder / "summary.json", summary)
    log(headline(summary))
    if cfg.run.report:
        log(f"report: {eval_report(folder)}")
    return folder
