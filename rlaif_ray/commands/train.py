"""`rlaif-ray train`: RL from AI feedback. Every check that needs files or models runs before
Ray starts (preflight); then the run folder, and the run itself on Ray (actors/training.py)."""
from __future__ import annotations

from pathlib import Path

from actors.ray_session import ray_session
from actors.training import run_training
from rlaif_ray.config import Config
from rlaif_ray.remote_folder import as_location
from rlaif_ray.run.folder import RunFolder, default_run_dir
from rlaif_ray.run.preflight import preflight
from rlaif_ray.run.report import train_report
from rlaif_ray.run.resolve import resolve_auto


def train(cfg: Config, out: str | Path | None = None, log=print, resume: str | Path | None = None,
          overwrite: bool = False) -> Path | str:
    """A new run in `out` (refused when it exists and is not empty, unless `overwrite`: the
    old one is moved aside), or `resume` a run folder from its last complete checkpoint."""
    cfg = resolve_auto(cfg)  # what `auto` means on this machine, recorded in the run's config.yaml
    if resume is None:
        out = as_location(out) if out else default_run_dir(cfg)
    # every check that needs files or models (and the output or the run to resume), before Ray starts
    prompts = preflight(cfg, "train", out=out, overwrite=overwrite, resume=resume, log=log)
    log(f"prompts: {len(prompts.train)} train, {len(prompts.heldout)} held out; "
        f"{prompts.skipped_long} skipped and {prompts.truncated} truncated (> {cfg.task.max_prompt_tokens} tokens)"
        + "".join(f"; {n}" for n in prompts.notes))
    run = RunFolder(cfg, resume if resume is not None else out, resume=resume is not None)
    for note in run.notes:  # what --resume found: a torn last line, a fallback checkpoint
        log(f"note: {note}")
    finished = False
    try:
        with ray_session(cfg, check_fit=True):
            run_training(cfg, run, prompts, resume is not None, log)
        if cfg.run.report:
            log(f"report: {train_report(run.path)}")
        finished = True
    finally:
        # the trackers get the summary and the report, and a failed run is marked so; a run
        # on shared storage: what is not yet uploaded goes now
        run.close(ok=finished)
    log(f"run folder: {run.location}")
    return run.location if run.store is not None else run.path  # a run on shared storage: its URI
