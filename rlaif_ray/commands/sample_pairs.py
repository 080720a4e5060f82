"""`rlaif-ray sample-pairs`: two responses per train prompt from a policy checkpoint -> the
JSONL pairs file that `label` reads (id, context, response_a, response_b, policy)."""
from __future__ import annotations

import json
from pathlib import Path

import ray

from actors.generator import generator_actor
from actors.ray_session import actor_options, gather, ray_session
from rlaif_ray.config import Config
from rlaif_ray.data.tasks import prompt_batch, task_prompts
from rlaif_ray.engines.devices import role_device
from rlaif_ray.engines.models import load_tokenizer
from rlaif_ray.feedback.pairs import normalize_text, rm_heldout
from rlaif_ray.run.preflight import preflight
from rlaif_ray.run.resolve import resolve_auto
from rlaif_ray.storage import atomic_write_text


def sample_pairs(cfg: Config, out: str | Path | None = None, log=print, overwrite: bool = False) -> Path:
    cfg = resolve_auto(cfg)
    sp = cfg.sample_pairs
    policy = sp.policy or cfg.model.name
    out = Path(out or sp.output)
    preflight(cfg, "sample-pairs", out=out, overwrite=overwrite, log=log)  # an existing file is never overwritten
    # train prompts only, minus the contexts whose pairs measure the reward model (no leak)
    held = {normalize_text(x["context"]) for x in rm_heldout(cfg.rm)[0]}
    train = task_prompts(cfg.task, load_tokenizer(cfg.model.name)).train
    kept = [it for it in train if normalize_text(it["context"]) not in held]
    items = kept[:sp.num_prompts]
    gen = {**cfg.generation.model_dump(), "temperature": sp.temperature}
    role = cfg.pipeline.generators
    with ray_session(cfg):
        actor = generator_actor().options(**actor_options(role, "sampler")).remote(
            "sampler", policy, cfg.model.dtype, gen, role.torch_threads, role_device(role.num_gpus),
            role.vllm.model_dump())
        try:
            bs = cfg.eval.batch_size
            batches = gather([actor.generate.remote(prompt_batch(items[i:i + bs]), -1, 2, sp.seed + i)
                              for i in range(0, len(items), bs)], "sampling pairs", cfg.run.progress, unit="batch")
        finally:
            ray.kill(actor)
    rows = [r for b in batches for r in b.select(["prompt_id", "context", "sample_index", "response_text"]).to_pylist()]
    by_prompt: dict = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], {"context": r["context"]})[r["sample_index"]] = r["response_text"]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps({"id": pid, "context": r["context"], "response_a": r[0],
                                               "response_b": r[1], "policy": policy}) + "\n"
                                   for pid, r in by_prompt.items()))  # whole or not at all
    same = sum(1 for r in by_prompt.values() if r[0] == r[1])
    log(f"sample-pairs: {len(by_prompt)} pairs from {policy} at T={sp.temperature} -> {out} "
        f"({same} pairs with two identical responses; {len(train) - len(kept)} train prompts left out: "
        "their contexts are in the reward model's held-out pairs)")
    return out
