"""`rlaif-ray label`: soft AI preference labels for a file of response pairs.

Ray Data streams blocks of pairs through a fixed pool of Labeler actors (label.pool_size)
and writes each labelled block to Parquet as it comes (its own progress bars show the
flow). Every input row comes out: rows that are bad on input, that the labeler fails on,
or whose label cannot be read carry an `error` and a null `p_a`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .config import Config, ConfigError
from .devices import role_device
from .pairs import alignment, read_label_input
from .schemas import LABELS, PAIRS


def label_file(cfg: Config, source: str | None = None, output: str | None = None, log=print) -> dict:
    import ray
    import ray.data

    from actors.labeler import Labeler

    from .driver import start_ray

    source = source or cfg.label.input
    if not source:
        raise ConfigError("label.input: give a JSONL/Parquet file of pairs or a bundled set "
                          "(hh_harmless, hh_helpful, pandalm, tldr_ai_judged)")
    out = Path(output or cfg.label.output)
    if out.exists() and any(out.iterdir() if out.is_dir() else [out]):
        raise ConfigError(f"label.output: {out} exists and is not empty (labels are never overwritten)")
    rows = read_label_input(source)
    table = pa.Table.from_pylist(rows, schema=PAIRS)
    bad_input = sum(1 for r in rows if r["error"])
    log(f"{len(rows)} pairs from {source} ({bad_input} unusable on input, kept with an error); "
        f"{cfg.label.pool_size} labeler actor(s), backend {cfg.reward.backend}")
    start_ray(cfg)
    t0 = time.perf_counter()
    bs = cfg.label.batch_size
    # the whole pool is up before the first block goes out (a clear error if it cannot start),
    # and each actor holds one block at a time, so blocks spread over the pool
    ray.data.DataContext.get_current().wait_for_min_actors_s = cfg.label.actor_start_timeout_s
    ds = ray.data.from_arrow([table.slice(i, bs) for i in range(0, table.num_rows, bs)] or [table])
    ds = ds.map_batches(
        Labeler, batch_size=bs, batch_format="pyarrow", zero_copy_batch=False,
        compute=ray.data.ActorPoolStrategy(size=cfg.label.pool_size, max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.label.num_cpus, num_gpus=cfg.label.num_gpus,
        fn_constructor_kwargs=dict(name="labeler", reward=cfg.reward.model_dump(),
                                   model_name=cfg.reward.model or cfg.model.name, dtype=cfg.model.dtype,
                                   torch_threads=cfg.label.torch_threads, device=role_device(cfg.label.num_gpus),
                                   vllm=cfg.pipeline.labelers.vllm.model_dump()))
    ds.write_parquet(str(out))
    wall = time.perf_counter() - t0
    result = pq.read_table(out, schema=LABELS)
    summary = summarize(result, wall, source)
    (out / "_summary.json").write_text(json.dumps({**summary, "config": cfg.model_dump(mode="json")}, indent=1))
    log(json.dumps(summary))
    return summary


def summarize(result: pa.Table, wall_s: float, source: str) -> dict:
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
