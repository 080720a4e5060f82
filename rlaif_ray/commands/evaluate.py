"""`rlaif-ray eval`: policy A against policy B on held-out prompts, judged by the AI labeler
(docs/method.md §7); the Ray part is actors/evaluation.py.

Both policies answer the same prompts with the same sampling seed; the labeler judges
each pair in both orders (debiased P(A preferred)). Out come: the win rate of A with a 95%
Wilson interval, the soft win rate (mean P(A)), the length-controlled win rate (logistic
regression on the character length ratio, read at ratio 1), and for the harmless task a
harmless rate per policy (each response judged alone). Every judgement goes to Parquet.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.evaluation import evaluate_policies
from actors.ray_session import ray_session
from rlaif_ray.config import Config, dump_config
from rlaif_ray.data.schemas import JUDGEMENTS
from rlaif_ray.engines.models import load_tokenizer
from rlaif_ray.feedback.judgements import eval_prompts, headline
from rlaif_ray.run.folder import default_run_dir
from rlaif_ray.run.preflight import preflight
from rlaif_ray.run.report import eval_report
from rlaif_ray.run.resolve import resolve_auto
from rlaif_ray.storage import atomic_path, atomic_write_json, atomic_write_text


def run_eval(cfg: Config, out: str | Path | None = None, log=print, overwrite: bool = False) -> Path:
    cfg = resolve_auto(cfg)
    folder = Path(out) if out else default_run_dir(cfg, "eval")
    # the two policies and the output folder (never overwritten), checked before Ray starts
    a_name, b_name = preflight(cfg, "eval", out=folder, overwrite=overwrite, log=log)
    items, counts = eval_prompts(cfg, load_tokenizer(cfg.model.name))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", dump_config(cfg))
    log(f"eval: {len(items)} prompts ({counts['source']}; {counts['skipped_long']} skipped as too long); "
        f"A = {a_name}, B = {b_name}")
    with ray_session(cfg):
        rows, summary = evaluate_policies(cfg, items, {"a": a_name, "b": b_name}, folder.name)
    summary.update({"policy_a": a_name, "policy_b": b_name, "prompts": counts})
    with atomic_path(folder / "judgements.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=JUDGEMENTS), tmp)
    atomic_write_json(folder / "summary.json", summary)
    log(headline(summary))
    if cfg.run.report:
        log(f"report: {eval_report(folder)}")
    return folder
