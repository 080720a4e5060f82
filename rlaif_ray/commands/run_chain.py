"""`rlaif-ray run`: the canonical RLAIF chain (docs/method.md §2-3), every step in one folder.

    sft -> sample-pairs -> label -> train-rm -> train (reward.source: rm) -> eval

`run` executes the steps in order in one folder; each step is also its own command, and
each step's output is the next one's input (folders and files, nothing in memory).
"""
from __future__ import annotations

import time
from pathlib import Path

from rlaif_ray.commands.evaluate import run_eval
from rlaif_ray.commands.label import label_file
from rlaif_ray.commands.sample_pairs import sample_pairs
from rlaif_ray.commands.sft import run_sft
from rlaif_ray.commands.train import train
from rlaif_ray.commands.train_rm import run_train_rm
from rlaif_ray.config import Config
from rlaif_ray.remote_folder import StorageFolder, as_location, join
from rlaif_ray.run.folder import default_run_dir
from rlaif_ray.run.preflight import preflight


def run_chain(cfg: Config, out: str | Path | None = None, log=print, overwrite: bool = False) -> Path | str:
    """Every step of the canonical chain in one folder: sft/, pairs.jsonl, labels/, rm/,
    train/, eval/ and chain.json (what ran, in what order, how long). An existing non-empty
    folder is refused before anything starts (with `overwrite`: moved aside).

    The folder may be a URI of shared storage (run.out_dir s3://...): the models handed from
    step to step (sft/, rm/, the trained checkpoint) are then passed by URI, so an actor on any
    node fetches them (rlaif_ray.engines.models.resolve); the files only this driver reads
    (pairs.jsonl, labels/) are written here and uploaded after their step."""
    folder = as_location(out) if out else default_run_dir(cfg, "chain")
    preflight(cfg, "run", out=folder, overwrite=overwrite, log=log)
    store = StorageFolder(folder)
    local = store.local
    local.mkdir(parents=True, exist_ok=True)
    steps: list[dict] = []

    def step(name, fn, upload: str = ""):
        t0 = time.perf_counter()
        log(f"== {name}")
        result = fn()
        if upload:
            store.push(upload)
        steps.append({"step": name, "output": str(result), "wall_s": round(time.perf_counter() - t0, 1)})
        store.write_json("chain.json", steps)
        return result

    sft = step("sft", lambda: run_sft(cfg, join(folder, "sft"), log)) if cfg.sft.enabled else cfg.model.name
    cfg = cfg.model_copy(deep=True)
    cfg.sample_pairs.policy = str(sft)
    pairs = step("sample-pairs", lambda: sample_pairs(cfg, local / "pairs.jsonl", log), "pairs.jsonl")

    def label():
        label_file(cfg, str(pairs), str(local / "labels"), log)
        return local / "labels"

    labels = step("label", label, "labels")
    cfg.rm.labels, cfg.rm.init = str(labels), cfg.rm.init or str(sft)
    rm = step("train-rm", lambda: run_train_rm(cfg, join(folder, "rm"), log))
    cfg.reward.source, cfg.reward.rm_path = "rm", str(rm)
    cfg.reward.model = cfg.reward.model or cfg.model.name  # the AI judge stays the labeler model
    cfg.model.name = str(sft)  # RL starts from the SFT policy
    run = step("train", lambda: train(cfg, join(folder, "train"), log))
    latest = StorageFolder(run).read_bytes("checkpoints/latest").decode().strip()
    cfg.eval.policy_a, cfg.eval.policy_b = join(run, "checkpoints", latest), str(sft)
    step("eval", lambda: run_eval(cfg, local / "eval", log), "eval")
    log(f"chain folder: {folder}")
    return folder
