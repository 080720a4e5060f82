"""`rlaif-ray eval`: policy A against policy B on held-out prompts, judged by the AI labeler
(METHOD.md section 7), and the same judgement for `train`'s end-of-run win rate.

Both policies answer the same prompts with the same sampling seed; the labeler judges
each pair in both orders (debiased P(A preferred)). Out come: the win rate of A with a 95%
Wilson interval, the soft win rate (mean P(A)), the length-controlled win rate (logistic
regression on the character length ratio, read at ratio 1), and for the harmless task a
harmless rate per policy (each response judged alone). Every judgement goes to Parquet.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import winrate
from .config import Config, ConfigError, EvalConfig, dump_config
from .data import DataError, prompt_batch, task_prompts
from .devices import role_device
from .progress import gather
from .scoring import SCORERS

JUDGEMENTS = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("context", pa.string(), nullable=False),
    pa.field("response_a", pa.string(), nullable=False),
    pa.field("response_b", pa.string(), nullable=False),
    pa.field("chars_a", pa.int64(), nullable=False),
    pa.field("chars_b", pa.int64(), nullable=False),
    pa.field("p_a", pa.float64()),  # debiased P(A preferred)
    pa.field("p_ab", pa.float64()),  # P(slot 1 better), A in slot 1 (eval.judge=scorer: A's own score)
    pa.field("p_ba", pa.float64()),  # P(slot 1 better), B in slot 1 (NaN: debias off; scorer: B's score)
    pa.field("label_mass", pa.float64()),  # probability the label tokens held (min of orders)
    pa.field("usable", pa.bool_(), nullable=False),  # label_mass >= reward.min_label_mass
    pa.field("harmless_a", pa.float64()),  # P(Yes) of the harmless scorer (null: not asked)
    pa.field("harmless_b", pa.float64()),
    pa.field("harmless_mass_a", pa.float64()),  # Yes/No probability mass (low: unusable, counted)
    pa.field("harmless_mass_b", pa.float64()),
])


def harmless_on(cfg: Config) -> bool:
    ev = cfg.eval
    return ev.harmless_rate == "on" or (ev.harmless_rate == "auto" and cfg.reward.pairwise.task == "harmless")


def check_eval_config(cfg: Config) -> None:
    """What the judgement needs, checked before any actor starts (so a run never fails in
    its final evaluation, after the training is done)."""
    ev = cfg.eval
    if ev.harmless_scorer not in SCORERS:
        raise ConfigError(f"eval.harmless_scorer: unknown scorer {ev.harmless_scorer!r}; known: {sorted(SCORERS)}")
    if cfg.reward.backend == "openai" and (harmless_on(cfg) or ev.judge == "scorer"):
        raise ConfigError("reward.backend=openai judges pairs only: set eval.harmless_rate=off and eval.judge=pairwise, "
                          "or judge with a local labeler (reward.backend hf or vllm)")


def summarize(rows: list[dict], ev: EvalConfig, min_label_mass: float = 0.0) -> dict:
    """The headline numbers from judgement rows (JUDGEMENTS fields). Pairs whose label
    tokens held less than `min_label_mass` are left out and counted."""
    usable = [r for r in rows if r["label_mass"] >= min_label_mass and r["p_a"] == r["p_a"]]
    out: dict = {"pairs": len(rows), "unusable_labels": len(rows) - len(usable),
                 "mean_chars": {"a": sum(r["chars_a"] for r in rows) / max(len(rows), 1),
                                "b": sum(r["chars_b"] for r in rows) / max(len(rows), 1)}}
    if usable:
        res = winrate.outcomes([r["p_a"] for r in usable], ev.tie_margin)
        out["win_rate"] = winrate.win_rate(res)
        out["soft_win_rate"] = winrate.mean_ci([r["p_a"] for r in usable])
        x = winrate.length_feature([r["chars_a"] for r in usable], [r["chars_b"] for r in usable], ev.length_feature)
        at = 1.0 if ev.length_feature == "ratio" else 0.0
        out["length_controlled"] = {**winrate.length_controlled(res, x, at, ev.bootstrap, ev.seed),
                                    "feature": ev.length_feature}
        both = [r for r in usable if ev.judge == "pairwise" and r["p_ba"] is not None and r["p_ba"] == r["p_ba"]]
        if both:  # how often the labeler picked the same slot in both orders
            out["same_slot_share"] = sum((r["p_ab"] > 0.5) == (r["p_ba"] > 0.5) for r in both) / len(both)
    if rows and rows[0].get("harmless_a") is not None:
        scorer = SCORERS[ev.harmless_scorer]
        ref = out["mean_chars"]["b"]  # METHOD.md App. J: B (the SFT/initial policy) sets the length
        out["harmless"] = {"scorer": scorer.name, "question": scorer.question, "threshold": ev.harmless_threshold,
                           "reference_chars": ref}
        for side in ("a", "b"):
            ok = [r for r in rows if (r.get(f"harmless_mass_{side}") or 0.0) >= min_label_mass]
            if not ok:
                out["harmless"][side] = {"n": 0, "unusable_labels": len(rows)}
                continue
            p = [r[f"harmless_{side}"] for r in ok]
            h = winrate.harmless_rate(p, ev.harmless_threshold)
            y = [float(v >= ev.harmless_threshold) for v in p]
            x = [r[f"chars_{side}"] / max(ref, 1.0) for r in ok]
            h["length_controlled"] = winrate.length_controlled(y, x, 1.0, ev.bootstrap, ev.seed)
            h["unusable_labels"] = len(rows) - len(ok)
            out["harmless"][side] = h
    return out


def judge(labeler, items: list[dict], a: list[str], b: list[str], cfg: Config, with_harmless: bool = False,
          desc: str = "judging") -> tuple[list[dict], dict]:
    """Both orders of every pair through one Labeler actor, in chunks (a progress bar per
    chunk); returns (judgement rows, summary)."""
    ev, bs = cfg.eval, cfg.eval.batch_size
    ctx = [it["context"] for it in items]
    chunks = range(0, len(items), bs)
    if ev.judge == "pairwise":
        outs = gather([labeler.compare.remote(ctx[i:i + bs], a[i:i + bs], b[i:i + bs]) for i in chunks],
                      f"{desc} pairs (both orders)", cfg.run.progress)
        got = {k: [x for o in outs for x in o[k]] for k in ("p_a", "p_ab", "p_ba", "label_mass")}
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
    return rows, summarize(rows, ev, cfg.reward.min_label_mass)


def eval_prompts(cfg: Config, tok) -> tuple[list[dict], dict]:
    """The prompts both policies answer (PROMPT fields) and how many were skipped/cut."""
    ev = cfg.eval
    # the held-out split of the task (or of the HH set named): never trained on, never sampled
    task = cfg.task if ev.prompts == "heldout" else cfg.task.model_copy(update={"name": ev.prompts})
    ps = task_prompts(task, tok)
    items = ps.heldout[:ev.num_prompts]
    counts = {"source": f"{task.name} held out", "skipped_long": ps.skipped_long, "truncated": ps.truncated,
              "notes": ps.notes}
    if not items:
        raise DataError(f"eval.prompts={ev.prompts}: no prompt fits task.max_prompt_tokens={cfg.task.max_prompt_tokens}")
    return items, counts


def _policy(name: str | None, cfg: Config) -> str:
    """A checkpoint folder (what `train` writes) or a model name; a path that is not a
    checkpoint stops here, before any actor starts."""
    name = name or cfg.model.name
    p = Path(name)
    from .models import is_checkpoint

    if p.is_dir() and not is_checkpoint(p):
        raise ConfigError(f"eval policy {name}: not a checkpoint folder (no model.safetensors)")
    if not p.exists() and (p.is_absolute() or name.startswith((".", "~"))):
        raise ConfigError(f"eval policy {name}: no such checkpoint folder")
    return name


def run_eval(cfg: Config, out: str | Path | None = None, log=print) -> Path:
    import ray

    from actors.generator import RolloutGenerator
    from actors.labeler import Labeler

    from .driver import start_ray
    from .models import load_tokenizer

    a_name, b_name = _policy(cfg.eval.policy_a, cfg), _policy(cfg.eval.policy_b, cfg)
    check_eval_config(cfg)
    if cfg.reward.backend == "openai":
        raise ConfigError("eval judges with a local labeler: set reward.backend to hf or vllm")
    tok = load_tokenizer(cfg.model.name)
    items, counts = eval_prompts(cfg, tok)
    folder = Path(out) if out else Path(cfg.run.out_dir) / f"{cfg.run.name}-eval-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(dump_config(cfg))
    log(f"eval: {len(items)} prompts ({counts['source']}; {counts['skipped_long']} skipped as too long); "
        f"A = {a_name}, B = {b_name}")
    started = start_ray(cfg)
    p, tag = cfg.pipeline, folder.name
    gen = {**cfg.generation.model_dump(), "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
           "max_new_tokens": cfg.eval.max_new_tokens or cfg.generation.max_new_tokens}
    actors = []
    try:
        for side, name in (("a", a_name), ("b", b_name)):
            actors.append(ray.remote(RolloutGenerator).options(
                name=f"policy-{side}@{tag}", num_cpus=p.generators.num_cpus, num_gpus=p.generators.num_gpus).remote(
                f"policy-{side}", name, cfg.model.dtype, gen, p.generators.torch_threads,
                role_device(p.generators.num_gpus), p.generators.vllm.model_dump()))
        labeler = ray.remote(Labeler).options(name=f"labeler-0@{tag}", num_cpus=p.labelers.num_cpus,
                                              num_gpus=p.labelers.num_gpus).remote(
            "labeler-0", cfg.reward.model_dump(), cfg.reward.model or cfg.model.name, cfg.model.dtype,
            p.labelers.torch_threads, role_device(p.labelers.num_gpus), p.labelers.vllm.model_dump())
        actors.append(labeler)
        t0 = time.perf_counter()
        gather([x.info.remote() for x in actors], "loading models", cfg.run.progress, unit="actor")
        bs = cfg.eval.batch_size
        refs = {side: [g.generate.remote(prompt_batch(items[i:i + bs]), -1, 1, cfg.eval.seed + i)
                       for i in range(0, len(items), bs)] for side, g in zip("ab", actors)}
        texts = {}
        for side in "ab":  # both policies generate at once; the bars show each one's progress
            batches = gather(refs[side], f"generating ({side.upper()})", cfg.run.progress, unit="batch")
            texts[side] = [t for bt in batches for t in bt.column("response_text").to_pylist()]
        gen_s = time.perf_counter() - t0
        rows, summary = judge(labeler, items, texts["a"], texts["b"], cfg, harmless_on(cfg))
        summary.update({"policy_a": a_name, "policy_b": b_name, "prompts": counts, "generation_s": gen_s,
                        "wall_s": time.perf_counter() - t0, "labeler": ray.get(labeler.info.remote())})
    finally:
        for x in actors:
            ray.kill(x)
        if started:
            ray.shutdown()
    pq.write_table(pa.Table.from_pylist(rows, schema=JUDGEMENTS), folder / "judgements.parquet")
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    log(headline(summary))
    if cfg.run.report:
        from .report import eval_report

        log(f"report: {eval_report(folder)}")
    return folder


def headline(s: dict) -> str:
    if "win_rate" not in s:
        return f"no usable labels among {s['pairs']} pairs ({s['unusable_labels']} unusable)"
    w, lc = s["win_rate"], s["length_controlled"]
    line = (f"win rate A over B: {w['win_rate']:.1%} (95% CI {w['ci95'][0]:.1%}-{w['ci95'][1]:.1%}, n={w['n']}, "
            f"{w['ties']} ties); length-controlled {lc['value']:.1%}")
    if "ci95" in lc:
        line += f" ({lc['ci95'][0]:.1%}-{lc['ci95'][1]:.1%})"
    line += (f"; soft {s['soft_win_rate']['mean']:.3f}; mean chars A {s['mean_chars']['a']:.0f} / "
             f"B {s['mean_chars']['b']:.0f}; {s['unusable_labels']} unusable labels")
    if "harmless" in s:
        h = s["harmless"]
        line += f"; harmless rate A {h['a']['rate']:.1%} / B {h['b']['rate']:.1%} (P(Yes) >= {h['threshold']})"
    return line
