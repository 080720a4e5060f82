"""`rlaif-ray export RUN --to DIR`: a train run's policy (its latest checkpoint, or
--checkpoint step-N) as a Hugging Face model folder with a model card, and with --push REPO_ID
uploaded to the Hub from that same folder. The work is rlaif_ray/run/export.py; no Ray."""
from __future__ import annotations

from pathlib import Path

from rlaif_ray.run.export import check_push, checkpoint_step, export_policy, push_folder


def run_export(run: str, to: str, checkpoint: str = "latest", *, push: str | None = None, private: bool = False,
               overwrite: bool = False, dtype: str = "float32", log=print) -> Path:
    """Every argument checked first (the checkpoint's name, the repo id and the token), then
    the folder written whole; then, with `push`, uploaded."""
    checkpoint_step(checkpoint)
    if push:
        check_push(push)
    folder = export_policy(run, to, checkpoint, overwrite=overwrite, dtype=dtype, repo_id=push, log=log)
    if push:
        push_folder(folder, push, private=private, message=f"rlaif-ray export of {run} ({checkpoint})", log=log)
    return folder
