"""`rlaif-ray label`: soft AI preference labels for a file of response pairs, through a pool
of labeler actors on Ray Data (actors/pair_labeler.py). Every input row comes out: rows that
are bad on input, that the labeler fails on, or whose label cannot be read carry an `error`
and a null `p_a`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.pair_labeler import label_with_ray_data
from actors.ray_session import ray_session
from rlaif_ray.config import Config, ConfigError
from rlaif_ray.data.schemas import LABELS, PAIRS
from rlaif_ray.feedback.pairs import read_label_input
from rlaif_ray.feedback.stats import alignment
from rlaif_ray.run.preflight import preflight
from rlaif_ray.run.resolve import inline_rubrics
from rlaif_ray.storage import atomic_write_json, publish_dir, temp_path


def label_file(cfg: Config, source: str | None = None, output: str | None = None, log=print,
               overwrite: bool = False) -> dict:
    """Labels `source` into the folder `output`. The Parquet files and _summary.json are
    written into a hidden temp folder beside it, renamed to `output` only when all are there:
    a label run that dies leaves no partial `output` for train-rm to read."""
    source = source or cfg.label.input
    if not source:
        raise ConfigError("label.input: give a JSONL/Parquet file of pairs or a bundled set "
                          "(hh_harmless, hh_helpful, pandalm, tldr_ai_judged)")
    out = Path(output or cfg.label.output)
    preflight(cfg, "label", out=out, overwrite=overwrite, log=log)  # an existing output is never overwritten
    cfg = cfg.model_copy(update={"reward": inline_rubrics(cfg.reward)})  # the actors need no rubric files
    rows = read_label_input(source)
    table = pa.Table.from_pylist(rows, schema=PAIRS)
    bad_input = sum(1 for r in rows if r["error"])
    log(f"{len(rows)} pairs from {source} ({bad_input} unusable on input, kept with an error); "
        f"{cfg.label.pool_size} labeler actor(s), backend {cfg.reward.backend}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        with ray_session(cfg):
            wall = label_with_ray_data(cfg, table, tmp)
        result = pq.read_table(tmp, schema=LABELS)
        summary = summarize_labels(result, wall, source)
        atomic_write_json(tmp / "_summary.json", {**summary, "config": cfg.model_dump(mode="json")})
        publish_dir(tmp, out)  # complete, or not there at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(json.dumps(summary))
    return summary


def summarize_labels(result: pa.Table, wall_s: float, source: str) -> dict:
    rows = result.to_pylist()
    labelled = [r for r in rows if r["error"] is None]
    errors: dict[str, int] = {}
    for r in rows:
        if r["error"] is not None:
            kind = "unusable label" if r["error"].startswith("unusable label") else (
                "labeler error" if r["error"].startswith("labeler ") else "bad input row")
            errors[kind] = errors.get(kind, 0) + 1
    summary = {"source": source, "rows": len(rows), "labelled": len(labelled), "errors": errors,
               "wall_s": round(wall_s, 1), "pairs_per_s": round(len(labelled) / wall_s, 3) if wall_s else None,
               "labelers": sorted({r["labeler"] for r in labelled})}
    with_ref = [r for r in labelled if r["human"] in ("a", "b")]
    if with_ref:
        summary["agreement_with_reference"] = alignment([r["p_a"] for r in with_ref], [r["human"] for r in with_ref])
    return summary
