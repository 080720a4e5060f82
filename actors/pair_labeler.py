"""The labeler pool of `rlaif-ray label`: Ray Data streams blocks of pairs through a fixed pool
of `PairLabeler` actors (label.pool_size) and writes each labelled block to Parquet as it
comes (its own progress bars show the flow)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import ray
import ray.data

from rlaif_ray.config import Config, RewardConfig
from rlaif_ray.data.schemas import LABELS, PAIRS
from rlaif_ray.engines.devices import role_device
from rlaif_ray.feedback.labeling import load_judge
from rlaif_ray.feedback.pairs import load_exemplars

from .labeler import local_model
from .process import ActorProcess


def label_with_ray_data(cfg: Config, table: pa.Table, out: Path) -> float:
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


class PairLabeler:
    """One actor of the Ray Data pool: PAIRS rows in, LABELS rows out. Rows flagged bad on
    input, and rows the labeler fails on or cannot read a label for, come out with `error`
    set, never dropped."""

    def __init__(self, reward: dict, model_name: str, dtype: str = "auto", torch_threads: int = 1,
                 device: str = "cpu", vllm: dict | None = None):
        self.tag = f"labeler:{os.getpid()}"  # the `labeler` column
        self.proc = ActorProcess("labeler", self.tag, torch_threads, device)
        cfg = RewardConfig.model_validate(reward)
        self.min_label_mass, self.pairwise = cfg.min_label_mass, cfg.pairwise
        self.shots = load_exemplars(cfg.pairwise.exemplars_path, cfg.pairwise.shots)
        self.judge, served = load_judge(cfg, model_name, dtype, device, vllm)
        if local_model(self.judge) is not None:
            self.proc.tune(local_model(self.judge))
        pw = cfg.pairwise
        self.prompt_config = json.dumps({"backend": cfg.backend, "model": served, "task": pw.task,
                                         "preamble": pw.preamble, "shots": pw.shots, "exemplars": pw.exemplars_path,
                                         "cot": pw.cot, "cot_max_tokens": pw.cot_max_tokens,
                                         "self_consistency": pw.self_consistency, "debias": pw.debias,
                                         "rubric": pw.rubric})

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.proc.busy():
            out = self._rows(batch.to_pylist())
        self.proc.metrics.inc("labels", len(out))
        self.proc.metrics.inc("unusable_labels", sum(1 for r in out if r["error"]))
        return pa.Table.from_pylist(out, schema=LABELS)

    def _rows(self, rows: list[dict]) -> list[dict]:
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
        return out

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
