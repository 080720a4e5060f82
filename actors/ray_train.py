"""The Ray Train loop of `sft` and `train-rm` (TorchTrainer: DDP over gloo on CPU, NCCL on
GPU; `num_workers` from the config). One skeleton; what differs is the model, the loss of
a batch and the held-out measure (`_sft_parts`, `_rm_parts`).

The driver tokenizes the data once and hands each worker the same list; every worker
takes its slice of each global batch (batch[rank::world]), so all ranks run the same
number of steps and the gradients DDP averages are those of the global batch. Rank 0
reports a checkpoint (safetensors + config + tokenizer) every epoch; the last one is
copied to the output folder, which `train`, `eval` and `train-rm` load by path.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
from ray.train.torch import TorchConfig, TorchTrainer

from rlaif_ray.config import ConfigError, TrainerConfig
from rlaif_ray.engines.devices import enable_tf32
from rlaif_ray.engines.models import load_model, load_tokenizer, quiet_transformers, resolve
from rlaif_ray.remote_folder import StorageFolder, filesystem, is_uri, join, parent
from rlaif_ray.rl import supervised
from rlaif_ray.storage import publish_dir, temp_path


def _world():
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled global batches of indices; the last partial batch (n % batch_size examples,
    a different draw each epoch) is dropped, so every rank runs the same steps. The driver
    refuses data smaller than one batch and records the count (supervised.check_batch)."""
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _all_reduce(t):
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)  # NCCL reduces CUDA tensors only: callers build t on the device
    return t


def _mean_over_ranks(x: float, device) -> float:
    import torch
    import torch.distributed as dist

    t = _all_reduce(torch.tensor([x], dtype=torch.float64, device=device))
    return float(t / (dist.get_world_size() if dist.is_initialized() else 1))


def _report(metrics: dict, model, tok_path: str, history: list[dict]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (model + tokenizer + history)."""
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
    """(autocast context, AdamW kwargs) for a worker's device: bf16 autocast over fp32 master
    weights and the fused AdamW on CUDA (TF32 on); plain fp32 on CPU."""
    import torch

    if device.type == "cuda":
        enable_tf32(device)
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), {"fused": True}
    return nullcontext, {}


def _sft_parts(c, model, device, rank, world, amp):
    """SFT: token cross-entropy on the reference responses; held out: the mean token loss."""
    import torch

    train, held, pad = c["train"], c["eval"], c["pad"]

    def part_loss(batch, part):
        """This worker's examples `part` of the global `batch`: their share of its loss."""
        tokens = sum(sum(1 for t in train[i]["labels"] if t != -100) for i in batch)
        with amp():
            s, _ = supervised.sft_loss_sum(model, [train[i] for i in part], pad, device)
        return s * world / max(tokens, 1)  # the global batch's token mean after DDP's average

    def size(i: int) -> int:
        return len(train[i]["ids"])

    def evaluate() -> dict:
        mine, tot = held[rank::world], torch.zeros(2, dtype=torch.float64, device=device)
        inner = getattr(model, "module", model)  # not through DDP: ranks may hold unequal shares
        with torch.no_grad(), amp():
            for i in range(0, len(mine), c["batch_size"]):
                s, n = supervised.sft_loss_sum(inner, mine[i:i + c["batch_size"]], pad, device)
                tot += torch.tensor([float(s), n], dtype=torch.float64, device=device)
        _all_reduce(tot)
        return {"heldout_loss": float(tot[0] / max(tot[1], 1)), "heldout_tokens": int(tot[1])}

    return part_loss, size, evaluate


def _rm_parts(c, model, device, rank, world, amp):
    """Reward model: soft-label cross-entropy of the two scores; held out: accuracy against
    the human label."""
    import torch

    train, held, pad, bs = c["train"], c["eval"], c["pad"], c["batch_size"]

    def part_loss(batch, part):
        """This worker's pairs `part` of the global `batch`: their share of its loss."""
        mine = [train[i] for i in part]
        with amp():
            r_a = supervised.scores(model, [x["ids_a"] for x in mine], pad, device)
            r_b = supervised.scores(model, [x["ids_b"] for x in mine], pad, device)
        target = torch.tensor([x["target"] for x in mine], device=device)
        # DDP averages over ranks: scale the local sum so the mean is the global-batch mean
        return supervised.rm_loss(r_a, r_b, target).sum() * world / len(batch)

    def size(i: int) -> int:
        return len(train[i]["ids_a"]) + len(train[i]["ids_b"])

    def evaluate() -> dict:
        mine, ra, rb = held[rank::world], [], []
        inner = getattr(model, "module", model)  # not through DDP: ranks may hold unequal shares
        with torch.no_grad(), amp():
            for i in range(0, len(mine), bs):
                chunk = mine[i:i + bs]
                ra += supervised.scores(inner, [x["ids_a"] for x in chunk], pad, device).tolist()
                rb += supervised.scores(inner, [x["ids_b"] for x in chunk], pad, device).tolist()
        hits = _all_reduce(torch.tensor([sum((a > b) == (x["human"] == "a") for a, b, x in zip(ra, rb, mine)),
                                         len(mine)], dtype=torch.float64, device=device))
        return {"heldout_accuracy": float(hits[0] / hits[1]) if hits[1] else float("nan"), "heldout_pairs": int(hits[1])}

    return part_loss, size, evaluate


def _load(c: dict):
    import torch
    from transformers import AutoModelForSequenceClassification

    if c["kind"] == "sft":
        return load_model(c["init"])  # fp32 master weights
    quiet_transformers()
    model = AutoModelForSequenceClassification.from_pretrained(resolve(c["init"]), num_labels=1,
                                                               dtype=torch.float32, use_safetensors=True)
    model.config.pad_token_id = c["pad"]  # the score is read at the last non-pad token
    return model


def train_loop(c: dict) -> None:
    """One Ray Train worker of `sft` or `train-rm` (c["kind"])."""
    import torch

    torch.set_num_threads(c["torch_threads"])
    torch.manual_seed(c["seed"])
    rank, world = _world()
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(_load(c))
    amp, fused = _precision(device)
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"], **fused)
    part_loss, size, evaluate = (_sft_parts if c["kind"] == "sft" else _rm_parts)(c, model, device, rank, world, amp)

    def held_out() -> dict:
        model.eval()
        out = evaluate()
        model.train()
        return out

    history: list[dict] = []
    _report({"epoch": 0, "train_loss": None, **held_out()}, model, c["tokenizer"], history)
    for epoch in range(1, c["epochs"] + 1):
        total, steps, t0 = 0.0, 0, time.perf_counter()
        for batch in _batches(len(c["train"]), c["batch_size"], c["seed"], epoch):
            opt.zero_grad()
            parts = _micro_batches(batch[rank::world], size, c["micro_batch_tokens"], device)
            for j, part in enumerate(parts):
                # DDP reduces the gradients once, in the last backward; the others accumulate
                last = j == len(parts) - 1 or not hasattr(model, "no_sync")
                with nullcontext() if last else model.no_sync():
                    loss = part_loss(batch, part)
                    loss.backward()
                total += float(loss.detach())  # this rank's estimate of the global-batch mean
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["max_grad_norm"])
            opt.step()
            steps += 1
        _report({"epoch": epoch, "train_loss": _mean_over_ranks(total / max(steps, 1), device), "steps": steps,
                 "epoch_s": time.perf_counter() - t0, **held_out()}, model, c["tokenizer"], history)


def _micro_batches(mine: list[int], size, budget: int, device) -> list[list[int]]:
    """This worker's examples `mine` in micro-batches of at most `budget` tokens (`size(i)`;
    rlaif_ray.rl.learner.split_by_tokens), as many on every worker (DDP's forward is a
    collective: it broadcasts buffers; rlaif_ray.rl.learner.ranks_agree_count)."""
    import torch.distributed as dist

    from rlaif_ray.rl.learner import ranks_agree_count, split_by_tokens

    if not budget:
        return [mine]
    sizes = [size(i) for i in mine]
    count = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        count = ranks_agree_count(len(split_by_tokens(sizes, budget)), len(mine), device)
    return [[mine[k] for k in part] for part in split_by_tokens(sizes, budget, count)]


def loop_config(kind: str, section, init: str, train: list, held: list, pad: int) -> dict:
    """What every worker gets: the data and the section's hyperparameters."""
    return {"kind": kind, "init": init, "tokenizer": init, "train": train, "eval": held, "pad": pad,
            "epochs": section.epochs, "lr": section.lr, "weight_decay": section.weight_decay,
            "batch_size": section.batch_size, "max_grad_norm": section.max_grad_norm, "seed": section.seed,
            "torch_threads": section.trainer.torch_threads, "micro_batch_tokens": section.trainer.micro_batch_tokens}


def storage_options(location) -> dict:
    """Ray Train's RunConfig storage for a path or a URI (through our filesystem, so an
    S3-compatible endpoint from AWS_ENDPOINT_URL reaches every worker as well)."""
    if is_uri(location):
        fs, path = filesystem(str(location))
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": str(Path(location).resolve())}


def fit(loop_cfg: dict, tc: TrainerConfig, out, name: str, log=print) -> list[dict]:
    """Run the loop on tc.num_workers Ray Train workers; copy the last checkpoint to `out`
    (into a hidden temp folder beside it, fsynced, then renamed: `out` appears complete or
    not at all). `out` may be a URI: Ray Train's storage is then on the same storage (workers
    on any node report their checkpoints there), and `out` is uploaded from this node's copy."""
    store = StorageFolder(out)
    if store.files():
        raise ConfigError(f"{name}: output folder {out} exists and is not empty (checkpoints are never overwritten)")
    res = {"CPU": tc.num_cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=res),
        run_config=ray.train.RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                       **storage_options(tc.storage_path or join(parent(out), "ray_train"))))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: Ray Train finished without a checkpoint ({result.error})")
    local = store.local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(local)
    try:
        tmp.mkdir()
        with result.checkpoint.as_directory() as d:
            for f in Path(d).iterdir():
                shutil.copy2(f, tmp / f.name)
        publish_dir(tmp, local)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store.push()
    history = json.loads((local / "train_log.json").read_text())
    for h in history:
        log(f"{name} epoch {h['epoch']}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in h.items() if k != "epoch"))
    return history
