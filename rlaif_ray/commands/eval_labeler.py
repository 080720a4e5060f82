"""`rlaif-ray eval-labeler`: the AI labeler's alignment with human labels and its position
bias, per bundled pair set and prompt variant (in-process, no Ray; docs/method.md §7)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rlaif_ray.config import Config, dump_config
from rlaif_ray.labeler_eval import GRID, evaluate_labeler, parse_variant
from rlaif_ray.labeling import load_judge
from rlaif_ray.report import labeler_report


def eval_labeler(cfg: Config, datasets: list[str], variants: list[str], n: int):
    """Yields one result row per (data set, prompt variant), with its wall time."""
    for v in variants:
        parse_variant(v)  # refuse a typo before loading anything
    judge, _ = load_judge(cfg.reward, cfg.reward.model or cfg.model.name, cfg.model.dtype)
    cells = [(d, v) for d in datasets for v in variants]
    with torch.no_grad(), tqdm(total=len(cells), desc="labeler cells", unit="cell", leave=False,
                               disable=not cfg.run.progress) as bar:
        for d, v in cells:
            bar.set_postfix_str(f"{d} {v}")
            t0, cut = time.perf_counter(), judge.truncated
            row = evaluate_labeler(judge, d, v, n, cfg.rl.seed, cfg.reward.pairwise.cot_max_tokens)
            bar.update(1)
            yield {**row, "truncated_prompts": judge.truncated - cut, "wall_s": round(time.perf_counter() - t0, 1)}


def run_eval_labeler(cfg: Config, data: str, prompts: str, n: int, out: str | None, report: str | None) -> dict:
    """Prints the table as it goes (saved to `out` after each row: a long grid can be
    stopped and read) and writes the HTML report."""
    variants = GRID if prompts == "grid" else prompts.split(",")
    rows: list[dict] = []
    table = {"model": cfg.reward.model or cfg.model.name, "backend": cfg.reward.backend, "rows": rows}
    print(f"{'data':14} {'prompt':16} {'n':>4} {'alignment':>9} {'95% CI':>13} {'1 order':>7} "
          f"{'same slot':>9} {'1st slot':>8} {'s':>6}", flush=True)
    for r in eval_labeler(cfg, data.split(","), variants, n):
        rows.append(r)
        print(f"{r['data']:14} {r['variant']:16} {r['n']:4d} {r['alignment']:9.1%} "
              f"{r['ci95'][0]:6.1%}-{r['ci95'][1]:5.1%} {r['single_order_alignment']:7.1%} "
              f"{r['same_position_share']:9.1%} {r['of_which_first_slot']:8.1%} {r['wall_s']:6.0f}", flush=True)
        if out:
            Path(out).write_text(json.dumps(table, indent=1))
    if cfg.run.report:
        folder = Path(report or Path(cfg.run.out_dir) / f"{cfg.run.name}-labeler-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.json").write_text(json.dumps(table, indent=1))
        print(f"report: {labeler_report(table, folder, dump_config(cfg))}")
    return table
