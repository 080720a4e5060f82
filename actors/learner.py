"""LearnerWorker: one rank of a torch.distributed group (gloo on CPU, NCCL on GPU) holding
the policy, the frozen reference policy for KL and the optimizer. LearnerGroup: the
driver-side handle that shards a scored batch across the ranks and gathers metrics."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlaif_ray import lm, rl, schemas, weight_sync
from rlaif_ray.metrics import RoleMetrics
from rlaif_ray.models import trim_heap


class NonFiniteError(RuntimeError):
    pass


class LearnerWorker:
    def __init__(self, rank: int, world_size: int, model_name: str, dtype: str, rl_cfg: dict,
                 temperature: float, torch_threads: int, device: str = "cpu"):
        import torch

        from rlaif_ray.models import load_model

        torch.set_num_threads(torch_threads)
        torch.manual_seed(rl_cfg["seed"])
        self.torch, self.rank, self.world_size = torch, rank, world_size
        self.rl, self.temperature, self.device = rl_cfg, temperature, device
        self.model_name = model_name
        self.policy = load_model(model_name, dtype).to(device).train()
        if rl_cfg["gradient_checkpointing"]:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref = load_model(model_name, dtype).to(device).eval().requires_grad_(False)
        self.pad = self.policy.config.pad_token_id or self.policy.config.eos_token_id
        self.value_head = None
        params = list(self.policy.parameters())
        if rl_cfg["baseline"] == "value":
            # scalar value head on the policy trunk (METHOD.md's separate value model is a
            # second 135M copy; sharing the trunk keeps CPU runs affordable)
            self.value_head = torch.nn.Linear(self.policy.config.hidden_size, 1).to(device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
            params += list(self.value_head.parameters())
        self.params = params
        # foreach=False: the multi-tensor kernels allocate temporaries the size of every
        # parameter at once (a model-sized spike at each step); one tensor at a time does not
        self.opt = torch.optim.AdamW(params, lr=rl_cfg["lr"], weight_decay=rl_cfg["weight_decay"], foreach=False)
        self.busy_s = 0.0
        self._stores = {}  # TCP stores this rank hosts, by group (host_store)
        self.metrics = RoleMetrics("learner", f"learner-{rank}")

    def info(self) -> dict:
        return {"name": f"learner-{self.rank}", "pid": os.getpid(), "busy_s": self.busy_s}

    def env(self, names: list[str]) -> dict:
        return {k: os.environ.get(k) for k in names}

    def host_store(self, purpose: str, world: int, timeout_s: float = 300.0) -> tuple[str, int]:
        """Rank 0: host the TCP store of a group ("train": the gradient group; "weights": the
        broadcast group) on a port the OS picks; returns where the other ranks find it."""
        import ray

        ip = ray.util.get_node_ip_address()
        self._stores[purpose] = weight_sync.host_store(ip, world, timeout_s)
        return ip, self._stores[purpose].port

    def setup(self, master: str, port: int, timeout_s: float = 300.0) -> int:
        import datetime

        import torch.distributed as dist

        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        store = self._stores["train"] if self.rank == 0 else \
            weight_sync.join_store(master, port, self.world_size, timeout_s)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return os.getpid()

    def train_step(self, shard: pa.RecordBatch, num_tokens: int, num_seqs: int) -> dict:
        import time

        import torch
        import torch.distributed as dist

        t0 = time.perf_counter()
        schemas.check(shard, schemas.SCORED, f"learner rank {self.rank} input")
        rows = shard.to_pylist()
        prompts = [r["prompt_token_ids"] for r in rows]
        responses = [r["response_token_ids"] for r in rows]
        logp, mask, values = lm.response_logprobs(self.policy, prompts, responses, self.pad,
                                                  self.temperature, self.value_head)
        # rollouts whose label could not be read stay in the record but out of the loss
        mask = mask * torch.tensor([float(r["reward_ok"]) for r in rows])[:, None]
        with torch.no_grad():
            ref_logp, _, _ = lm.response_logprobs(self.ref, prompts, responses, self.pad, self.temperature)
        behaviour = torch.zeros_like(logp)
        for i, r in enumerate(rows):
            behaviour[i, :len(r["behaviour_logprobs"])] = torch.tensor(r["behaviour_logprobs"])
        reward = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
        kl = rl.kl_per_token(logp.detach(), ref_logp, self.rl["kl_estimator"]) * mask
        returns = rl.returns_to_go(reward, kl, mask, self.rl["beta"])
        adv = rl.advantages(returns, mask, self.rl["baseline"], values, [r["prompt_id"] for r in rows])
        ratio = rl.truncated_ratio(logp, behaviour, self.rl["is_clip"]) * mask
        agg = dict(mask=mask, how=self.rl["loss_agg"], num_tokens=num_tokens, num_seqs=num_seqs)
        pg = rl.aggregate(rl.policy_loss(logp, adv, ratio, mask), **agg)
        loss = pg
        vl = torch.zeros(())
        if values is not None:
            vl = rl.aggregate(rl.value_loss(values, returns, mask), **agg)
            loss = loss + self.rl["value_coef"] * vl
        finite = torch.tensor([float(torch.isfinite(loss)) * float(torch.isfinite(reward).all())])
        if self.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops together
        if finite.item() < 1:
            bad = [r["rollout_id"] for r, x in zip(rows, reward.tolist()) if not np.isfinite(x)]
            raise NonFiniteError(f"non-finite loss or reward at learner rank {self.rank}; "
                                 f"non-finite rewards in rollouts {bad[:5]}; batch {rows[0]['batch_index']}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:
            # losses are normalised by the global batch, so summed gradients are the mean
            for p in self.params:  # a parameter without a gradient on this rank still takes part
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in self.params])
            dist.all_reduce(flat)
            offset = 0
            for p in self.params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.rl["max_grad_norm"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # no model-sized gradients held between steps
        if self.rl["release_memory"]:
            trim_heap()
        n_seq = max(len(rows), 1)
        self.busy_s += time.perf_counter() - t0
        self.metrics.observe("learner_step_s", time.perf_counter() - t0)
        return {
            "loss_sum": float(loss.detach()), "pg_loss_sum": float(pg.detach()), "value_loss_sum": float(vl.detach()),
            "kl_sum": float(kl.sum()), "ratio_sum": float(ratio.sum()), "tokens": float(mask.sum()),
            "ratio_clipped": float(((torch.exp(logp.detach() - behaviour) > self.rl["is_clip"]) & (mask > 0)).sum()),
            "grad_norm": float(grad_norm), "rows": n_seq, "busy_s": self.busy_s,
        }

    def _named(self) -> list:
        """The policy's parameters in a fixed order; tied weights are sent once."""
        tie = getattr(self.policy.config, "tie_word_embeddings", False)
        return [(k, v) for k, v in self.policy.named_parameters() if not (tie and k == "lm_head.weight")]

    def get_weights(self) -> dict:
        """Policy parameters as numpy arrays (zero-copy through the object store)."""
        return {k: v.detach().cpu().numpy() for k, v in self._named()}

    def weight_spec(self) -> list:
        return weight_sync.spec(self._named())

    def join_weight_group(self, master: str, port: int, world: int, backend: str, timeout_s: float) -> int:
        """Rank 0 of the weight-broadcast group (the generators are ranks 1..world-1)."""
        self.weight_group = weight_sync.open_group(master, port, 0, world, backend, timeout_s,
                                                   store=self._stores.pop("weights"))
        self.weight_device = "cuda" if backend == "nccl" else "cpu"
        return os.getpid()

    def broadcast_weights(self, version: int) -> int:
        """Send the current policy to every generator of the group; returns the bytes sent."""
        with self.torch.no_grad():
            return weight_sync.send(self.weight_group, self._named(), version, self.weight_device)

    def save(self, path: str, state: dict) -> None:
        """Safetensors weights (+ config and tokenizer files) and optimizer state."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(path, safe_serialization=True)
        # with the tokenizer beside the weights, `eval` and `train` load a checkpoint by folder
        from rlaif_ray.models import load_tokenizer

        load_tokenizer(self.model_name).save_pretrained(path)
        tensors, meta = _flatten_optimizer(self.opt.state_dict())
        if self.value_head is not None:
            tensors.update({f"value_head.{k}": v.contiguous() for k, v in self.value_head.state_dict().items()})
        save_file(tensors, str(path / "optimizer.safetensors"))
        (path / "trainer_state.json").write_text(json.dumps({**state, "optimizer_meta": meta}, indent=1))

    def load(self, path: str) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        weights = load_file(str(path / "model.safetensors"))
        self.policy.load_state_dict(weights, strict=False)
        tensors = load_file(str(path / "optimizer.safetensors"))
        if self.value_head is not None:
            self.value_head.load_state_dict({k[len("value_head."):]: v for k, v in tensors.items()
                                             if k.startswith("value_head.")})
        meta = json.loads((path / "trainer_state.json").read_text())["optimizer_meta"]
        self.opt.load_state_dict(_unflatten_optimizer(tensors, meta))


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    """torch optimizer state -> (tensors for safetensors, JSON metadata). No pickle."""
    import torch

    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"state.{pid}.{k}"] = v.contiguous() if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


class LearnerGroup:
    """N LearnerWorker actors forming one torch.distributed group."""

    def __init__(self, actor_cls, n: int, options: dict, tag: str = "", placement: list[dict] | None = None,
                 **worker_kwargs):
        import ray

        self.tag = tag
        placement = placement or [{}] * n  # per rank: its bundle of the group's placement group
        self.workers = [actor_cls.options(name=f"learner-{r}@{tag}" if tag else f"learner-{r}", **options,
                                          **placement[r]).remote(rank=r, world_size=n, **worker_kwargs)
                        for r in range(n)]
        master, port = ray.get(self.workers[0].host_store.remote("train", n))
        self.pids = ray.get([w.setup.remote(master, port) for w in self.workers])

    @staticmethod
    def shard(batch: pa.RecordBatch, n: int) -> list[pa.RecordBatch]:
        """Split by prompt (a group-mean baseline needs a prompt's samples together),
        balancing rows."""
        ids = batch.column("prompt_id").to_pylist()
        groups: dict = {}
        for i, p in enumerate(ids):
            groups.setdefault(p, []).append(i)
        buckets = [[] for _ in range(n)]
        for rows in sorted(groups.values(), key=len, reverse=True):
            min(buckets, key=len).extend(rows)
        if any(not b for b in buckets):
            raise ValueError(f"batch of {len(groups)} prompts cannot feed {n} learner workers "
                             "(set rl.prompts_per_step >= pipeline.learner.num_actors)")
        return [batch.take(pa.array(sorted(b))) for b in buckets]

    def train(self, batch: pa.RecordBatch, loss_agg: str) -> dict:
        import ray

        tokens = sum(len(x) for x in batch.column("response_token_ids").to_pylist())
        shards = self.shard(batch, len(self.workers))
        outs = ray.get([w.train_step.remote(s, max(tokens, 1), batch.num_rows) for w, s in zip(self.workers, shards)])
        tot = {k: sum(o[k] for o in outs) for k in ("loss_sum", "pg_loss_sum", "value_loss_sum", "kl_sum",
                                                     "ratio_sum", "tokens", "ratio_clipped", "rows")}
        return {"loss": tot["loss_sum"], "pg_loss": tot["pg_loss_sum"], "value_loss": tot["value_loss_sum"],
                "kl": tot["kl_sum"] / tot["rows"], "ratio_mean": tot["ratio_sum"] / max(tot["tokens"], 1),
                "ratio_clipped_frac": tot["ratio_clipped"] / max(tot["tokens"], 1),
                "grad_norm": outs[0]["grad_norm"], "learner_busy_s": outs[0]["busy_s"]}

    def weights(self):
        return self.workers[0].get_weights.remote()

    def save(self, path: str, state: dict) -> None:
        import ray

        ray.get(self.workers[0].save.remote(path, state))

    def load(self, path: str) -> None:
        import ray

        ray.get([w.load.remote(path) for w in self.workers])
