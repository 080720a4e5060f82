"""The canonical RLAIF chain (METHOD.md sections 2-3): `sample-pairs` and `run`.

    sft -> sample-pairs -> label -> train-rm -> train (reward.source: rm) -> eval

`run` executes the steps in order in one folder; each step is also its own command, and
each step's output is the next one's input (folders and files, nothing in memory).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import Config, ConfigError
from .devices import role_device


def sample_pairs(cfg: Config, out: str | Path | None = None, log=print) -> Path:
    """Two responses per train prompt from a policy checkpoint -> the JSONL pairs file that
    `label` reads (id, context, response_a, response_b, policy)."""
    import ray

    from actors.generator import RolloutGenerator

    from .data import prompt_batch, task_prompts
    from .driver import start_ray
    from .models import load_tokenizer
    from .progress import gather

    sp = cfg.sample_pairs
    policy = sp.policy or cfg.model.name
    out = Path(out or sp.output)
    if out.exists():
        raise ConfigError(f"sample_pairs.output: {out} exists (pairs are never overwritten)")
    from .supervised import _norm, rm_heldout

    # train prompts only, minus the contexts whose pairs measure the reward model (no leak)
    held = {_norm(x["context"]) for x in rm_heldout(cfg)[0]}
    train = task_prompts(cfg.task, load_tokenizer(cfg.model.name)).train
    kept = [it for it in train if _norm(it["context"]) not in held]
    items = kept[:sp.num_prompts]
    gen = {**cfg.generation.model_dump(), "temperature": sp.temperature}
    role = cfg.pipeline.generators
    started = start_ray(cfg)
    actor = ray.remote(RolloutGenerator).options(num_cpus=role.num_cpus, num_gpus=role.num_gpus).remote(
        "sampler", policy, cfg.model.dtype, gen, role.torch_threads, role_device(role.num_gpus),
        role.vllm.model_dump())
    try:
        bs = cfg.eval.batch_size
        batches = gather([actor.generate.remote(prompt_batch(items[i:i + bs]), -1, 2, sp.seed + i)
                          for i in range(0, len(items), bs)], "sampling pairs", cfg.run.progress, unit="batch")
    finally:
        ray.kill(actor)
        if started:
            ray.shutdown()
    rows = [r for b in batches for r in b.select(["prompt_id", "context", "sample_index", "response_text"]).to_pylist()]
    by_prompt: dict = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], {"context": r["context"]})[r["sample_index"]] = r["response_text"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for pid, r in by_prompt.items():
            f.write(json.dumps({"id": pid, "context": r["context"], "response_a": r[0], "response_b": r[1],
                                "policy": policy}) + "\n")
    same = sum(1 for r in by_prompt.values() if r[0] == r[1])
    log(f"sample-pairs: {len(by_prompt)} pairs from {policy} at T={sp.temperature} -> {out} "
        f"({same} pairs with two identical responses; {len(train) - len(kept)} train prompts left out: "
        "their contexts are in the reward model's held-out pairs)")
    return out


def run_chain(cfg: Config, out: str | Path | None = None, log=print) -> Path:
    """Every step of the canonical chain in one folder: sft/, pairs.jsonl, labels/, rm/,
    train/, eval/ and chain.json (what ran, in what order, how long)."""
    from .driver import train
    from .evaluate import run_eval
    from .label_file import label_file
    from .supervised import run_sft, run_train_rm

    folder = Path(out) if out else Path(cfg.run.out_dir) / f"{cfg.run.name}-chain-{time.strftime('%Y%m%d-%H%M%S')}"
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"run: {folder} exists and is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    steps: list[dict] = []

    def step(name, fn):
        t0 = time.perf_counter()
        log(f"== {name}")
        result = fn()
        steps.append({"step": name, "output": str(result), "wall_s": round(time.perf_counter() - t0, 1)})
        (folder / "chain.json").write_text(json.dumps(steps, indent=1))
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
