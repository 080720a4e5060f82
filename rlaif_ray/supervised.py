"""`rlaif-ray sft` and `rlaif-ray train-rm` on Ray Train (TorchTrainer: DDP over gloo on
CPU, NCCL on GPU; `num_workers` from the config).

The driver tokenizes the data once and hands each worker the same list; every worker
takes its slice of each global batch (batch[rank::world]), so all ranks run the same
number of steps and the gradients DDP averages are those of the global batch. Rank 0
reports a checkpoint (safetensors + config + tokenizer) every epoch; the last one is
copied to the output folder, which `train`, `eval` and `train-rm` load by path.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .config import Config, ConfigError, TrainerConfig


def _world():
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled global batches of indices; the last partial batch (n % batch_size examples,
    a different draw each epoch) is dropped, so every rank runs the same steps. The driver
    refuses data smaller than one batch and records the count (`_check_batch`)."""
    import numpy as np

    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _mean_over_ranks(x: float, device) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def _report(metrics: dict, model, tok_path: str, history: list[dict]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (model + tokenizer + history)."""
    import tempfile

    import ray.train

    from .models import load_tokenizer

    history.append(metrics)
    rank, _ = _world()
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            inner = getattr(model, "module", model)  # unwrap DDP
            inner.save_pretrained(d, safe_serialization=True)
            load_tokenizer(tok_path).save_pretrained(d)
            Path(d, "train_log.json").write_text(json.dumps(history, indent=1))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def _precision(device):
    """(autocast context, AdamW kwargs) for a Ray Train worker's device: bf16 autocast over fp32
    master weights and the fused AdamW on CUDA (TF32 on); plain fp32 on CPU."""
    from contextlib import nullcontext

    import torch

    from .devices import enable_tf32

    if device.type == "cuda":
        enable_tf32(device)
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), {"fused": True}
    return nullcontext, {}


def rm_loop(c: dict) -> None:
    """One Ray Train worker of `train-rm`."""
    import torch
    import torch.distributed as dist
    import ray.train.torch
    from transformers import AutoModelForSequenceClassification

    from . import rm
    from .models import _quiet, resolve

    torch.set_num_threads(c["torch_threads"])
    torch.manual_seed(c["seed"])
    rank, world = _world()
    device = ray.train.torch.get_device()
    _quiet()
    model = AutoModelForSequenceClassification.from_pretrained(resolve(c["init"]), num_labels=1,
                                                               dtype=torch.float32, use_safetensors=True)
    model.config.pad_token_id = c["pad"]  # the score is read at the last non-pad token
    model = ray.train.torch.prepare_model(model)
    amp, fused = _precision(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"], **fused)
    train, held, bs = c["train"], c["eval"], c["batch_size"]

    def evaluate() -> dict:
        model.eval()
        mine = held[rank::world]
        ra, rb = [], []
        inner = getattr(model, "module", model)  # not through DDP: ranks may hold unequal shares
        with torch.no_grad(), amp():
            for i in range(0, len(mine), bs):
                chunk = mine[i:i + bs]
                ra += rm.scores(inner, [x["ids_a"] for x in chunk], c["pad"], device).tolist()
                rb += rm.scores(inner, [x["ids_b"] for x in chunk], c["pad"], device).tolist()
        hits = torch.tensor([sum((a > b) == (x["human"] == "a") for a, b, x in zip(ra, rb, mine)), len(mine)],
                            dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(hits)
        model.train()
        return {"heldout_accuracy": float(hits[0] / hits[1]) if hits[1] else float("nan"), "heldout_pairs": int(hits[1])}

    history: list[dict] = []
    _report({"epoch": 0, "train_loss": None, **evaluate()}, model, c["tokenizer"], history)
    for epoch in range(1, c["epochs"] + 1):
        total, steps, t0 = 0.0, 0, time.perf_counter()
        for batch in _batches(len(train), bs, c["seed"], epoch):
            mine = [train[i] for i in batch[rank::world]]
            with amp():
                r_a = rm.scores(model, [x["ids_a"] for x in mine], c["pad"], device)
                r_b = rm.scores(model, [x["ids_b"] for x in mine], c["pad"], device)
            target = torch.tensor([x["target"] for x in mine], device=device)
            # DDP averages over ranks: scale the local sum so the mean is the global-batch mean
            loss = rm.rm_loss(r_a, r_b, target).sum() * world / len(batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["max_grad_norm"])
            opt.step()
            total += float(loss.detach())  # this rank's estimate of the global-batch mean
            steps += 1
        _report({"epoch": epoch, "train_loss": _mean_over_ranks(total / max(steps, 1), device), "steps": steps,
                 "epoch_s": time.perf_counter() - t0, **evaluate()}, model, c["tokenizer"], history)


def sft_loop(c: dict) -> None:
    """One Ray Train worker of `sft`: token cross-entropy on the reference responses."""
    import torch
    import torch.distributed as dist
    import ray.train.torch

    from . import rm
    from .models import load_model

    torch.set_num_threads(c["torch_threads"])
    torch.manual_seed(c["seed"])
    rank, world = _world()
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(load_model(c["init"]))  # fp32 master weights
    amp, fused = _precision(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"], **fused)
    train, held, bs = c["train"], c["eval"], c["batch_size"]

    def heldout_loss() -> dict:
        model.eval()
        mine = held[rank::world]
        tot = torch.zeros(2, dtype=torch.float64, device=device)
        inner = getattr(model, "module", model)  # not through DDP: ranks may hold unequal shares
        with torch.no_grad(), amp():
            for i in range(0, len(mine), bs):
                s, n = rm.sft_loss_sum(inner, mine[i:i + bs], c["pad"], device)
                tot += torch.tensor([float(s), n], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(tot)
        model.train()
        return {"heldout_loss": float(tot[0] / max(tot[1], 1)), "heldout_tokens": int(tot[1])}

    history: list[dict] = []
    _report({"epoch": 0, "train_loss": None, **heldout_loss()}, model, c["tokenizer"], history)
    for epoch in range(1, c["epochs"] + 1):
        total, steps, t0 = 0.0, 0, time.perf_counter()
        for batch in _batches(len(train), bs, c["seed"], epoch):
            tokens = sum(sum(1 for t in train[i]["labels"] if t != -100) for i in batch)
            with amp():
                s, _ = rm.sft_loss_sum(model, [train[i] for i in batch[rank::world]], c["pad"], device)
            loss = s * world / max(tokens, 1)  # the global batch's token mean after DDP's average
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["max_grad_norm"])
            opt.step()
            total += float(loss.detach())  # this rank's estimate of the global-batch mean
            steps += 1
        _report({"epoch": epoch, "train_loss": _mean_over_ranks(total / max(steps, 1), device), "steps": steps,
                 "epoch_s": time.perf_counter() - t0, **heldout_loss()}, model, c["tokenizer"], history)


def fit(loop, loop_config: dict, tc: TrainerConfig, out: Path, name: str, log=print) -> list[dict]:
    """Run `loop` on tc.num_workers Ray Train workers; copy the last checkpoint to `out`."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{name}: output folder {out} exists and is not empty (checkpoints are never overwritten)")
    res = {"CPU": tc.num_cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=res),
        run_config=ray.train.RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                       storage_path=str(Path(tc.storage_path or out.parent / "ray_train").resolve())))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: Ray Train finished without a checkpoint ({result.error})")
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for f in Path(d).iterdir():
            shutil.copy2(f, out / f.name)
    history = json.loads((out / "train_log.json").read_text())
    for h in history:
        log(f"{name} epoch {h['epoch']}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in h.items() if k != "epoch"))
    return history


def sft_data(cfg: Config, tok) -> tuple[list[dict], list[dict], dict]:
    """(train, held-out) SFT examples from the task's posts that have a reference summary;
    the task's RL held-out posts are never used."""
    from .data import task_prompts
    from .rm import sft_example

    s = cfg.sft
    task = cfg.task.model_copy(update={"data_path": s.data_path or cfg.task.data_path})
    ps = task_prompts(task, tok)  # TL;DR reference summaries, or HH chosen responses
    # posts whose pairs measure the reward model are never fine-tuned on (the RM starts from SFT)
    held_ctx = {_norm(x["context"]) for x in rm_heldout(cfg)[0]}
    kept = [it for it in ps.train if _norm(it["context"]) not in held_ctx]
    rm_overlap = len(ps.train) - len(kept)
    items = [it for it in kept if it.get("reference")]
    if s.max_examples:
        items = items[:s.max_examples]
    if len(items) <= s.heldout:
        raise ConfigError(f"sft.heldout={s.heldout}: only {len(items)} posts with a reference summary")
    ex = [sft_example(it["prompt_token_ids"], tok(" " + it["reference"].strip() if cfg.task.prompt_format == "raw"
                                                  else it["reference"].strip(), add_special_tokens=False)["input_ids"]
                      [:s.max_response_tokens], tok.eos_token_id) for it in items]
    return ex[:-s.heldout], ex[-s.heldout:], {"examples": len(items), "skipped_long": ps.skipped_long,
                                              "no_reference": sum(1 for it in kept if not it.get("reference")),
                                              "dropped_rm_heldout_posts": rm_overlap}


def run_sft(cfg: Config, out: str | Path | None = None, log=print) -> Path:
    from .driver import start_ray
    from .models import load_tokenizer

    s = cfg.sft
    tok = load_tokenizer(cfg.model.name)
    train, held, counts = sft_data(cfg, tok)
    counts["left_out_per_epoch"] = _check_batch(s.trainer, s.batch_size, "sft", len(train))
    out = Path(out or s.output)
    log(f"sft: {len(train)} train / {len(held)} held-out examples ({counts['skipped_long']} posts skipped as too long); "
        f"{s.trainer.num_workers} Ray Train worker(s)")
    started = start_ray(cfg)
    try:
        history = fit(sft_loop, {"init": cfg.model.name, "tokenizer": cfg.model.name, "train": train, "eval": held,
                                 "pad": tok.pad_token_id, **_common(s)}, s.trainer, out, "sft", log)
    finally:
        if started:
            import ray

            ray.shutdown()
    (out / "sft_summary.json").write_text(json.dumps({**counts, "history": history}, indent=1))
    return out


def rm_data(cfg: Config, tok) -> tuple[list[dict], list[dict], dict]:
    """(train, held-out) encoded pairs: training pairs from rm.labels (the output of `label`,
    or any pairs file with a human label for rm.label_kind=human); held-out pairs with a
    human label from rm.eval_data, never trained on (same ids are dropped, counted)."""
    from .data import read_records
    from .pairs import BUNDLED, load_pairs, read_label_input
    from .rm import encode_pairs

    r = cfg.rm
    if not r.labels:
        raise ConfigError("rm.labels: the output folder of `rlaif-ray label` (or a pairs file with human labels)")
    path = Path(r.labels)
    if r.labels in BUNDLED:  # the set's own human labels (RLHF baseline); bad rows kept with an error
        rows = [{"error": None, **x} for x in load_pairs(r.labels, keep_bad=True)[0]]
    elif path.is_dir():
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.is_file():
        rows = read_label_input(str(path)) if r.label_kind == "human" else read_records(path)
    else:
        raise ConfigError(f"rm.labels: {path} not found")
    held_rows, unusable_held = rm_heldout(cfg)
    # a training pair on a held-out context (the same post or dialogue) would leak: dropped, counted
    held_ctx = {_norm(x["context"]) for x in held_rows}
    overlap = sum(1 for x in rows if _norm(x.get("context") or "") in held_ctx)
    rows = [x for x in rows if _norm(x.get("context") or "") not in held_ctx][:r.max_pairs]
    train, counts = encode_pairs(rows, tok, r.label_kind, r.max_tokens)
    held, hcounts = encode_pairs(held_rows, tok, "human", r.max_tokens)
    counts.update({"dropped_heldout_overlap": overlap, "heldout_pairs": len(held),
                   "heldout_unusable": unusable_held + hcounts["skipped_no_label"],
                   "heldout_truncated_texts": hcounts["truncated_texts"]})
    if not train:
        raise ConfigError(f"rm.labels: no usable {r.label_kind} labels in {r.labels} ({counts})")
    return train, held, counts


def _norm(text: str) -> str:
    return " ".join(str(text).split())


def rm_heldout(cfg: Config) -> tuple[list[dict], int]:
    """The RM's held-out human-labelled pairs: the last rm.eval_n usable rows of rm.eval_data
    (a bundled set, minus its exemplar rows; or a file), and how many rows were unusable."""
    from .pairs import BUNDLED, EXEMPLAR_ROWS, load_pairs, read_label_input

    r = cfg.rm
    if r.eval_data in BUNDLED:
        rows = load_pairs(r.eval_data, keep_bad=True, skip_last=EXEMPLAR_ROWS if r.eval_data.startswith("hh_") else 0)[0]
    elif Path(r.eval_data).is_file():
        rows = read_label_input(r.eval_data)
    else:
        raise ConfigError(f"rm.eval_data: {r.eval_data} is neither a bundled pair set nor a file")
    ok = [{**x, "error": None} for x in rows if not x.get("error") and x.get("human") in ("a", "b")]
    return ok[-r.eval_n:], len(rows) - len(ok)


def run_train_rm(cfg: Config, out: str | Path | None = None, log=print) -> Path:
    from .driver import start_ray
    from .models import load_tokenizer

    r = cfg.rm
    init = r.init or cfg.model.name
    tok = load_tokenizer(init)
    train, held, counts = rm_data(cfg, tok)
    counts["left_out_per_epoch"] = _check_batch(r.trainer, r.batch_size, "rm", len(train))
    out = Path(out or r.output)
    log(f"train-rm: {counts['pairs']} {r.label_kind}-labelled pairs ({counts['skipped_no_label']} without a usable "
        f"label, {counts['truncated_texts']} texts cut to {r.max_tokens} tokens), {len(held)} held-out human pairs; "
        f"init {init}; {r.trainer.num_workers} Ray Train worker(s)")
    started = start_ray(cfg)
    try:
        history = fit(rm_loop, {"init": init, "tokenizer": init, "train": train, "eval": held,
                                "pad": tok.pad_token_id, **_common(r)}, r.trainer, out, "train-rm", log)
    finally:
        if started:
            import ray

            ray.shutdown()
    (out / "rm_summary.json").write_text(json.dumps({**counts, "label_kind": r.label_kind, "init": init,
                                                     "history": history}, indent=1))
    return out


def _common(section) -> dict:
    return {"epochs": section.epochs, "lr": section.lr, "weight_decay": section.weight_decay,
            "batch_size": section.batch_size, "max_grad_norm": section.max_grad_norm, "seed": section.seed,
            "torch_threads": section.trainer.torch_threads}


def _check_batch(tc: TrainerConfig, batch_size: int, name: str, n: int) -> int:
    """Refuses layouts that cannot train; returns the examples left out of each epoch."""
    if batch_size % tc.num_workers:
        raise ConfigError(f"{name}.batch_size={batch_size} does not divide across "
                          f"{name}.trainer.num_workers={tc.num_workers}")
    if n < batch_size:
        raise ConfigError(f"{name}: {n} training examples is less than one batch ({name}.batch_size={batch_size})")
    return n % batch_size
