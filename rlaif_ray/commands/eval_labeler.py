"""`rlaif-ray eval-labeler`: the AI labeler's alignment with human labels and its position
bias, per pair set (bundled, or the user's own file of human-labelled pairs) and prompt
variant (in-process, no Ray; docs/method.md §7)."""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rlaif_ray.config import Config, dump_config
from rlaif_ray.feedback.labeler_eval import GRID, evaluate_labeler, parse_variant
from rlaif_ray.feedback.labeling import load_judge
from rlaif_ray.run.report import labeler_report


def eval_labeler(cfg: Config, datasets: list[str], variants: list[str], n: int, files: dict | None = None,
                 task: str | None = None):
    """Yields one result row per (data set, prompt variant), with its wall time. `files`:
    {entry: PairFile} for the entries of `datasets` that are the user's pair files (asked
    as `task`, default reward.pairwise.task); the others are bundled sets."""
    files = files or {}
    for v in variants:
        parse_variant(v)  # refuse a typo before loading anything
    judge, _ = load_judge(cfg.reward, cfg.reward.model or cfg.model.name, cfg.model.dtype)
    cells = [(d, v) for d in datasets for v in variants]
    with torch.no_grad(), tqdm(total=len(cells), desc="labeler cells", unit="cell", leave=False,
                               disable=not cfg.run.progress) as bar:
        for d, v in cells:
            bar.set_postfix_str(f"{d} {v}")
            t0, cut = time.perf_counter(), judge.truncated
            pf = files.get(d)
            row = evaluate_labeler(judge, d, v, n, cfg.rl.seed, cfg.reward.pairwise.cot_max_tokens, source=pf,
                                   task=(task or cfg.reward.pairwise.task) if pf else None)
            bar.update(1)
            yield {**row, "skipped_rows": len(pf.skipped) if pf else 0, "truncated_prompts": judge.truncated - cut,
                   "wall_s": round(time.perf_counter() - t0, 1)}


def describe_file(pf, task: str, task_from: str) -> dict:
    """What the table records of a pair file: its rows, the usable and skipped ones (each
    skipped row with its reason) and the labeler task it was asked as."""
    return {"path": pf.path, "rows": pf.total, "usable": len(pf.rows), "skipped": len(pf.skipped),
            "skipped_rows": list(pf.skipped), "task": task, "task_from": task_from}


def run_eval_labeler(cfg: Config, data: str, prompts: str, n: int, out: str | None, report: str | None,
                     overwrite: bool = False, task: str | None = None,
                     log=functools.partial(print, flush=True)) -> dict:
    """Prints the table as it goes (saved to `out` after each row: a long grid can be
    stopped and read) and writes the HTML report. `data`: comma-separated bundled set names
    and pair files (JSONL/Parquet, checked whole before the labeler loads; a skipped row is
    counted in the table and listed in it). An existing `out` or `report` is refused unless
    `overwrite` (then moved aside, as every command's output)."""
    from rlaif_ray.run.preflight import preflight
    from rlaif_ray.run.resolve import inline_rubrics

    variants = GRID if prompts == "grid" else prompts.split(",")
    datasets = data.split(",")
    folder = Path(report or Path(cfg.run.out_dir) / f"{cfg.run.name}-labeler-{time.strftime('%Y%m%d-%H%M%S')}")
    files = preflight(cfg, "eval-labeler", out=out, overwrite=overwrite, log=log,
                      report=folder if cfg.run.report else None, pair_data=datasets,
                      shots=max(parse_variant(v)[2] for v in variants))
    cfg = cfg.model_copy(update={"reward": inline_rubrics(cfg.reward)})  # the actors need no rubric files
    task_from = "--task" if task else "reward.pairwise.task"
    task = task or cfg.reward.pairwise.task
    rows: list[dict] = []
    table = {"model": cfg.reward.model or cfg.model.name, "backend": cfg.reward.backend, "rows": rows,
             "files": {d: describe_file(pf, task, task_from) for d, pf in files.items()}}
    for d, f in table["files"].items():
        log(f"{d}: {f['rows']} rows, {f['usable']} usable pairs, {f['skipped']} skipped; labeler task {task} "
            f"(from {task_from})" + (f"; skipped: {'; '.join(f['skipped_rows'][:5])}"
                                     + (f"; ... ({f['skipped'] - 5} more: all under 'files' in --out and the "
                                        "report's table.json)"
                                        if f["skipped"] > 5 else "") if f["skipped"] else ""))
    width = max([14] + [len(d) for d in datasets])
    log(f"{'data':{width}} {'prompt':16} {'n':>4} {'alignment':>9} {'95% CI':>13} {'1 order':>7} "
        f"{'same slot':>9} {'1st slot':>8} {'s':>6}")
    for r in eval_labeler(cfg, datasets, variants, n, files, task):
        rows.append(r)
        log(f"{r['data']:{width}} {r['variant']:16} {r['n']:4d} {r['alignment']:9.1%} "
            f"{r['ci95'][0]:6.1%}-{r['ci95'][1]:5.1%} {r['single_order_alignment']:7.1%} "
            f"{r['same_position_share']:9.1%} {r['of_which_first_slot']:8.1%} {r['wall_s']:6.0f}")
        if out:
            Path(out).write_text(json.dumps(table, indent=1))
    if cfg.run.report:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.json").write_text(json.dumps(table, indent=1))
        log(f"report: {labeler_report(table, folder, dump_config(cfg))}")
    return table
