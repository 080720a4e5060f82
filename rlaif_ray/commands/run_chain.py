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
from rlaif_ray.run.folder import default_run_dir
from rlaif_ray.run.preflight import preflight
from rlaif_ray.storage import atomic_write_json


def run_chain(cfg: Config, out: str | Path | None = None, log=print, overwrite: bool = False) -> Path:
    """Every step of the canonical chain in one folder: sft/, pairs.jsonl, labels/, rm/,
    train/, eval/ and chain.json (what ran, in what order, how long). An existing non-empty
    folder is refused before anything starts (with `overwrite`: moved aside)."""
    folder = Path(out) if out else default_run_dir(cfg, "chain")
    preflight(cfg, "run", out=folder, overwrite=overwrite, log=log)
    folder.mkdir(parents=True, exist_ok=True)
    steps: list[dict] = []

    def step(name, fn):
        t0 = time.perf_counter()
        log(f"== {name}")
        result = fn()
        steps.append({"step": name, "output": str(result), "wall_s": round(time.perf_counter() - t0, 1)})
        atomic_write_json(folder / "chain.json", steps)
        return result

    sft = step("sft", lambda: run_sft(cfg, folder / "sft", log)) if cfg.sft.enabled else cfg.model.name
    cfg = cfg.model_copy(deep=True)
    cfg.sample_pairs.policy = str(sft)
    pairs = step("sample-pairs", lambda: sample_pairs(cfg, folder / "pairs.jsonl", log))
    def label():
        label_file(cfg, str(pairs), str(folder / "labels"), log)
        return folder / "labels"

    labels = step("label", label)
    cfg.rm.labels, cfg.rm.init = str(labels), cfg.rm.init or str(sft)
    rm = step("train-rm", lambda: run_train_rm(cfg, folder / "rm", log))
    cfg.reward.source, cfg.reward.rm_path = "rm", str(rm)
    cfg.reward.model = cfg.reward.model or cfg.model.name  # the AI judge stays the labeler model
    cfg.model.name = str(sft)  # RL starts from the SFT policy
    run = step("train", lambda: train(cfg, folder / "train", log))
    cfg.eval.policy_a, cfg.eval.policy_b = str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()), str(sft)
    step("eval", lambda: run_eval(cfg, folder / "eval", log))
    log(f"chain folder: {folder}")
    return folder
