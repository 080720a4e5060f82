"""`rlaif-ray label`: soft AI preference labels for a file of response pairs.

Ray Data streams blocks of pairs through a fixed pool of Labeler actors (label.pool_size)
and writes each labelled block to Parquet as it comes (its own progress bars show the
flow). Every input row comes out: rows that are bad on input, that the labeler fails on,
or whose label cannot be read carry an `error` and a null `p_a`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from actors.metrics import RoleMetrics
from actors.ray_session import ray_session
from rlaif_ray.config import Config, ConfigError, RewardConfig
from rlaif_ray.devices import role_device
from rlaif_ray.labeling import load_judge
from rlaif_ray.memory import trim_heap
from rlaif_ray.pair_data import load_exemplars, read_label_input
from rlaif_ray.preflight import preflight
from rlaif_ray.runlog import atomic_write_json, publish_dir, temp_path
from rlaif_ray.schemas import LABELS, PAIRS
from rlaif_ray.stats import alignment


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
    rows = read_label_input(source)
    table = pa.Table.from_pylist(rows, schema=PAIRS)
    bad_input = sum(1 for r in rows if r["error"])
    log(f"{len(rows)} pairs from {source} ({bad_input} unusable on input, kept with an error); "
        f"{cfg.label.pool_size} labeler actor(s), backend {cfg.reward.backend}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        with ray_session(cfg):
            wall = _label_with_ray_data(cfg, table, tmp)
        result = pq.read_table(tmp, schema=LABELS)
        summary = summarize_labels(result, wall, source)
        atomic_write_json(tmp / "_summary.json", {**summary, "config": cfg.model_dump(mode="json")})
        publish_dir(tmp, out)  # complete, or not there at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(json.dumps(summary))
    return summary


def _label_with_ray_data(cfg: Config, table: pa.Table, out: Path) -> float:
    """Blocks of PAIRS rows through a pool of Labeler actors (each called on a block, see
    Labeler.__call__), written to Parquet as they come; returns the wall time."""
    t0 = time.perf_counter()
    bs = cfg.label.batch_size
    # the whole pool is up before the first block goes out (a clear error if it cannot start),
    # and each actor holds one block at a time, so blocks spread over the pool
    ray.data.DataContext.get_current().wait_for_min_actors_s = cfg.label.actor_start_timeout_s
    ds = ray.data.from_arrow([table.slice(i, bs) for i in range(0, table.num_rows, bs)] or [table])
    ds = ds.map_batches(
        PairLabeler, batch_size=bs, batch_format="pyarrow", zero_copy_batch=False,
        compute=ray.data.ActorPoolStrategy(size=cfg.label.pool_size, max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.label.num_cpus, num_gpus=cfg.label.num_gpus,
        fn_constructor_kwargs=dict(reward=cfg.reward.model_dump(),
                                   model_name=cfg.reward.model or cfg.model.name, dtype=cfg.model.dtype,
                                   torch_threads=cfg.label.torch_threads, device=role_device(cfg.label.num_gpus),
                                   vllm=cfg.pipeline.labelers.vllm.model_dump()))
    ds.write_parquet(str(out))
    return time.perf_counter() - t0


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


class PairLabeler:
    """One actor of the Ray Data pool: PAIRS rows in, LABELS rows out. Rows flagged bad on
    input, and rows the labeler fails on or cannot read a label for, come out with `error`
    set, never dropped."""

    def __init__(self, reward: dict, model_name: str, dtype: str = "auto", torch_threads: int = 1,
                 device: str = "cpu", vllm: dict | None = None):
        torch.set_num_threads(torch_threads)
        cfg = RewardConfig.model_validate(reward)
        self.min_label_mass, self.pairwise = cfg.min_label_mass, cfg.pairwise
        self.shots = load_exemplars(cfg.pairwise.exemplars_path, cfg.pairwise.shots)
        self.judge, served = load_judge(cfg, model_name, dtype, device, vllm)
        self.tag = f"labeler:{os.getpid()}"  # the `labeler` column
        pw = cfg.pairwise
        self.prompt_config = json.dumps({"backend": cfg.backend, "model": served, "task": pw.task,
                                         "preamble": pw.preamble, "shots": pw.shots, "exemplars": pw.exemplars_path,
                                         "cot": pw.cot, "cot_max_tokens": pw.cot_max_tokens,
                                         "self_consistency": pw.self_consistency, "debias": pw.debias})
        self.metrics = RoleMetrics("labeler", self.tag)

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        rows = batch.to_pylist()
        out = [{**{k: r.get(k) for k in PAIRS.names}, "p_a": None, "p_ab": None, "p_ba": None,
                "label_mass": None, "rationale": None, "labeler": self.tag, "prompt_config": self.prompt_config}
               for r in rows]
        todo = [i for i, r in enumerate(out) if not r["error"]]
        try:
            self._label(out, todo)
        except Exception:  # noqa: BLE001 - find the row(s) at fault, label the rest
            for i in todo:
                try:
                    self._label(out, [i])
                except Exception as e:  # noqa: BLE001
                    out[i]["error"] = f"labeler {self.tag}: {type(e).__name__}: {e}"[:2000]
        trim_heap()
        self.metrics.inc("labels", len(out))
        self.metrics.inc("unusable_labels", sum(1 for r in out if r["error"]))
        self.metrics.observe("batch_s", time.perf_counter() - t0)
        return pa.Table.from_pylist(out, schema=LABELS)

    def _label(self, out: list[dict], idx: list[int]) -> None:
        if not idx:
            return
        pref = self.judge.prefer([out[i]["context"] for i in idx], [out[i]["response_a"] for i in idx],
                                 [out[i]["response_b"] for i in idx], self.pairwise, self.shots)
        for j, i in enumerate(idx):
            row, mass = out[i], pref.label_mass[j]
            row.update(p_ab=pref.p_ab[j], p_ba=None if pref.p_ba[j] != pref.p_ba[j] else pref.p_ba[j], label_mass=mass)
            if pref.rationales:
                row["rationale"] = json.dumps(pref.rationales[j])
            if mass < self.min_label_mass or pref.p_a[j] != pref.p_a[j]:
                row["error"] = (f"unusable label: '1'/'2' held {mass:.3g} of the next-token probability "
                                f"(reward.min_label_mass={self.min_label_mass})")
            else:
                row["p_a"] = pref.p_a[j]
