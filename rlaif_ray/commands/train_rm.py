"""`rlaif-ray train-rm`: a reward model from AI soft labels (or human labels), Ray Train."""
from __future__ import annotations

from pathlib import Path

from actors.ray_session import ray_session
from actors.ray_train import fit, loop_config
from rlaif_ray.config import Config
from rlaif_ray.engines.models import load_tokenizer
from rlaif_ray.remote_folder import StorageFolder, as_location
from rlaif_ray.rl.supervised import check_batch, rm_data
from rlaif_ray.run.preflight import preflight


def run_train_rm(cfg: Config, out: str | Path | None = None, log=print, overwrite: bool = False) -> Path | str:
    r = cfg.rm
    out = as_location(out or r.output)  # a path or a URI of shared storage
    # an existing output is never overwritten; a partial `label` output in rm.labels stops here
    preflight(cfg, "train-rm", out=out, overwrite=overwrite, log=log)
    init = r.init or cfg.model.name
    tok = load_tokenizer(init)
    train, held, counts = rm_data(cfg.rm, tok)
    counts["left_out_per_epoch"] = check_batch(r.trainer, r.batch_size, "rm", len(train))
    log(f"train-rm: {counts['pairs']} {r.label_kind}-labelled pairs ({counts['skipped_no_label']} without a usable "
        f"label, {counts['truncated_texts']} texts cut to {r.max_tokens} tokens), {len(held)} held-out human pairs; "
        f"init {init}; {r.trainer.num_workers} Ray Train worker(s)")
    with ray_session(cfg):
        history = fit(loop_config("rm", r, init, train, held, tok.pad_token_id), r.trainer, out, "train-rm", log)
    StorageFolder(out).write_json("rm_summary.json", {**counts, "label_kind": r.label_kind, "init": init,
                                                      "history": history})
    return out
