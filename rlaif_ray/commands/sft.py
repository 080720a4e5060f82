"""`rlaif-ray sft`: supervised fine-tuning on the task's reference responses (Ray Train)."""
from __future__ import annotations

from pathlib import Path

from actors.ray_session import ray_session
from actors.ray_train import fit, loop_config
from rlaif_ray.config import Config
from rlaif_ray.engines.models import load_tokenizer
from rlaif_ray.remote_folder import StorageFolder, as_location
from rlaif_ray.rl.supervised import check_batch, sft_data
from rlaif_ray.run.preflight import preflight


def run_sft(cfg: Config, out: str | Path | None = None, log=print, overwrite: bool = False) -> Path | str:
    s = cfg.sft
    out = as_location(out or s.output)  # a path or a URI of shared storage
    preflight(cfg, "sft", out=out, overwrite=overwrite, log=log)  # an existing output is never overwritten
    tok = load_tokenizer(cfg.model.name)
    train, held, counts = sft_data(cfg, tok)
    counts["left_out_per_epoch"] = check_batch(s.trainer, s.batch_size, "sft", len(train))
    log(f"sft: {len(train)} train / {len(held)} held-out examples ({counts['skipped_long']} posts skipped as too long); "
        f"{s.trainer.num_workers} Ray Train worker(s)")
    with ray_session(cfg):
        history = fit(loop_config("sft", s, cfg.model.name, train, held, tok.pad_token_id), s.trainer, out, "sft", log)
    StorageFolder(out).write_json("sft_summary.json", {**counts, "history": history})
    return out
