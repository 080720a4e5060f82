"""`rlaif-ray signal`: how well each scorer ranks a prompt's own reference above another
prompt's, on the task's last prompts that have a reference (in-process, no Ray)."""
from __future__ import annotations

import torch

from rlaif_ray.config import Config
from rlaif_ray.data.tasks import task_prompts
from rlaif_ray.engines.models import load_model, load_tokenizer
from rlaif_ray.feedback.labeler_eval import measure_signal
from rlaif_ray.feedback.labeling import Judge
from rlaif_ray.rubrics import SCORERS


def measure_scorers(cfg: Config, names: list[str] | None, n: int):
    """Signal of several scorers on the last rows of the task data."""
    name = cfg.reward.model or cfg.model.name
    model, tok = load_model(name, cfg.model.dtype), load_tokenizer(name)
    prompts = task_prompts(cfg.task, load_tokenizer(cfg.model.name))
    rows = [it for it in prompts.train + prompts.heldout if it.get("reference")][-(n + 1):]
    with torch.no_grad():
        for scorer in names or list(SCORERS):
            yield measure_signal(Judge.of_model(model, tok, scorer, cfg.reward.batch_size), rows, n)
