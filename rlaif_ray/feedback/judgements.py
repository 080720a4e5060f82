"""Judgements of policy A against policy B (docs/method.md §7), the parts without Ray: which
prompts both answer, the headline numbers from judgement rows (win rate with a Wilson
interval, soft and length-controlled win rates, the harmless rate) and their one-line
summary. `rlaif-ray eval` (commands/evaluate.py) and `train`'s win rate produce the rows."""
from __future__ import annotations

from rlaif_ray.config import Config, EvalConfig
from rlaif_ray.data.files import DataError
from rlaif_ray.data.tasks import task_prompts
from rlaif_ray.feedback import winrate
from rlaif_ray.rubrics import SCORERS


def harmless_on(cfg: Config) -> bool:
    ev = cfg.eval
    return ev.harmless_rate == "on" or (ev.harmless_rate == "auto" and cfg.reward.pairwise.task == "harmless")


def summarize_judgements(rows: list[dict], ev: EvalConfig, min_label_mass: float = 0.0) -> dict:
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
        ref = out["mean_chars"]["b"]  # docs/method.md App. J: B (the SFT/initial policy) sets the length
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
