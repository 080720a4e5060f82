"""LearnerWorker: one rank of the learner group (FSDP over gloo on CPU, NCCL on GPU), a thin
Ray shell around rlaif_ray.rl.learner.PolicyLearner. LearnerGroup: the driver-side handle that
shards a scored batch across the ranks and gathers metrics."""
from __future__ import annotations

import datetime
import os
import time

import pyarrow as pa
import ray
import torch.distributed as dist

from rlaif_ray.data import schemas
from rlaif_ray.engines import weight_sync
from rlaif_ray.engines.devices import collective_backend, collective_device
from rlaif_ray.rl.learner import PolicyLearner, loss_normalisers

from .process import ActorProcess


class LearnerWorker:
    """Ray concerns around a rlaif_ray.rl.learner.PolicyLearner: the process group (rank 0 hosts
    its store), Arrow in, metrics, the weight group to the generators. The model is loaded
    in `setup`, once the group is up (FSDP shards over it)."""

    def __init__(self, rank: int, world_size: int, model_name: str, dtype: str, rl_cfg: dict,
                 temperature: float, torch_threads: int, device: str = "cpu", top_k: int = 0, top_p: float = 1.0,
                 reference: bool = True, lora: dict | None = None):
        # the heap a step freed goes back after it (rl.release_memory; the allocator is the
        # actor's start-up environment: rlaif_ray.cpu.allocator.learner_env)
        release = bool(rl_cfg.get("release_memory", True)) if isinstance(rl_cfg, dict) else rl_cfg.release_memory
        self.proc = ActorProcess("learner", f"learner-{rank}", torch_threads, device, release_memory=release)
        self.rank, self.world_size, self.device = rank, world_size, device
        # the sampler's settings: the learner scores the distribution the generators sampled from
        self.args = dict(model_name=model_name, rl_cfg=rl_cfg, temperature=temperature, device=device, dtype=dtype,
                         top_k=top_k, top_p=top_p, reference=reference, lora=lora)
        self.learner: PolicyLearner | None = None
        self._stores = {}  # TCP stores this rank hosts, by group (host_store)
        self.update_bytes = 0  # what the last weight update sent (model.lora: the adapter alone)

    def info(self) -> dict:
        return self.proc.info(weight_update_bytes=self.update_bytes)

    def env(self, names: list[str]) -> dict:
        return {k: os.environ.get(k) for k in names}

    def host_store(self, purpose: str, world: int, timeout_s: float = 300.0) -> tuple[str, int]:
        """Rank 0: host the TCP store of a group ("train": the learner group; "weights": the
        broadcast group) on a port the OS picks; returns where the other ranks find it."""
        ip = ray.util.get_node_ip_address()
        self._stores[purpose] = weight_sync.host_store(ip, world, timeout_s)
        return ip, self._stores[purpose].port

    def setup(self, master: str | None = None, port: int | None = None, timeout_s: float = 300.0) -> int:
        """Join the learner group (more than one rank) and load the models."""
        store = None
        if self.world_size > 1:
            backend = collective_backend(self.device)
            store = self._stores["train"] if self.rank == 0 else \
                weight_sync.join_store(master, port, self.world_size, timeout_s)
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        self.learner = PolicyLearner(**self.args, store=store)
        return os.getpid()

    def train_step(self, shard: pa.RecordBatch, num_tokens: int, num_seqs: int, beta: float | None = None) -> dict:
        """One PolicyLearner.step; `beta` (None: rl.beta) is this step's KL weight."""
        schemas.check(shard, schemas.SCORED, f"learner rank {self.rank} input")
        with self.proc.busy("learner_step_s"):
            out = self.learner.step(shard.to_pylist(), num_tokens, num_seqs, beta=beta)
        return {**out, "busy_s": self.proc.busy_s}

    def get_weights(self, dtype: str = "float32") -> dict | None:
        """The policy in `dtype` for the object store (weight_sync.pack); rank 0 returns it,
        the other ranks take part in the gathers and return None."""
        named = self._rank0_only(self.learner.state_for_sync(dtype))
        if named is None:
            return None
        payload = weight_sync.pack(named, dtype, adapter=self.learner.lora is not None)
        self.update_bytes = sum(a.nbytes for a in payload["arrays"].values())
        return payload

    def _rank0_only(self, named):
        """Rank 0 keeps the gathering iterator; the other ranks run it to the end (each step
        is a collective they must join) and get None."""
        if self.rank == 0:
            return named
        for _ in named:
            pass
        return None

    def weight_spec(self, dtype: str = "float32") -> list:
        return self.learner.weight_spec(dtype)

    def join_weight_group(self, master: str, port: int, world: int, backend: str, timeout_s: float) -> int:
        """Rank 0 of the weight-broadcast group (the generators are ranks 1..world-1)."""
        self.weight_group = weight_sync.open_group(master, port, 0, world, backend, timeout_s,
                                                   store=self._stores.pop("weights"))
        self.weight_device = collective_device(backend)
        return os.getpid()

    def broadcast_weights(self, version: int, dtype: str = "float32", bucket_bytes: int = 256 << 20) -> dict:
        """Rank 0 sends the current policy, cast to `dtype`, to every generator of the group in
        buckets; the other ranks take part in the shard gathers. Returns bytes and seconds."""
        t0 = time.perf_counter()
        named = self._rank0_only(self.learner.state_for_sync(dtype))
        if named is None:
            return {"bytes": 0, "largest_bucket": 0, "s": time.perf_counter() - t0}
        out = weight_sync.send_buckets(self.weight_group, named, self.learner.weight_spec(dtype), version,
                                       bucket_bytes, self.weight_device)
        self.proc.metrics.observe("weight_broadcast_s", time.perf_counter() - t0)
        self.update_bytes = out["bytes"]
        return {**out, "s": time.perf_counter() - t0}

    def save(self, path: str, state: dict, hf_weights: bool = True) -> None:
        self.learner.save(path, state, hf_weights)

    def load(self, path: str) -> None:
        self.learner.load(path)


class LearnerGroup:
    """N LearnerWorker actors forming one torch.distributed group (none for N = 1)."""

    def __init__(self, actor_cls, n: int, options: dict, tag: str = "", placement: list[dict] | None = None,
                 **worker_kwargs):
        self.tag = tag
        placement = placement or [{}] * n  # per rank: its bundle of the group's placement group
        self.workers = [actor_cls.options(name=f"learner-{r}@{tag}" if tag else f"learner-{r}", **options,
                                          **placement[r]).remote(rank=r, world_size=n, **worker_kwargs)
                        for r in range(n)]
        master, port = ray.get(self.workers[0].host_store.remote("train", n)) if n > 1 else (None, None)
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

    def train(self, batch: pa.RecordBatch, loss_agg: str, beta: float | None = None) -> dict:
        """One step of every rank on its shard, at KL weight `beta` (None: rl.beta). `kl` is
        the KL per sequence (mean over usable rows of the summed per-token estimate);
        `kl_sum`, `tokens`, `usable_rows` are the sums over ranks it comes from."""
        # usable rows only: a row whose reward could not be read is out of the loss and its denominators
        num_tokens, num_seqs = loss_normalisers(batch.column("response_token_ids").to_pylist(),
                                                batch.column("reward_ok").to_pylist())
        shards = self.shard(batch, len(self.workers))
        outs = ray.get([w.train_step.remote(s, num_tokens, num_seqs, beta) for w, s in zip(self.workers, shards)])
        tot = {k: sum(o[k] for o in outs) for k in ("loss_sum", "pg_loss_sum", "value_loss_sum", "kl_sum",
                                                     "ratio_sum", "tokens", "ratio_clipped", "usable_rows")}
        return {"loss": tot["loss_sum"], "pg_loss": tot["pg_loss_sum"], "value_loss": tot["value_loss_sum"],
                "kl_sum": tot["kl_sum"], "tokens": tot["tokens"], "usable_rows": tot["usable_rows"],
                "kl": tot["kl_sum"] / max(tot["usable_rows"], 1), "ratio_mean": tot["ratio_sum"] / max(tot["tokens"], 1),
                "ratio_clipped_frac": tot["ratio_clipped"] / max(tot["tokens"], 1),
                "grad_norm": outs[0]["grad_norm"], "learner_busy_s": outs[0]["busy_s"]}

    def weights(self, dtype: str = "float32"):
        """A reference to rank 0's weights in `dtype` (every rank takes part in the gathers)."""
        refs = [w.get_weights.remote(dtype) for w in self.workers]
        return refs[0]

    def save(self, path: str, state: dict, hf_weights: bool = True) -> None:
        """Every rank takes part (a collective); rank 0 writes, or with more than one rank each
        its DCP shard (`hf_weights`: also the full weights for from_pretrained)."""
        ray.get([w.save.remote(path, state, hf_weights) for w in self.workers])

    def load(self, path: str) -> None:
        ray.get([w.load.remote(path) for w in self.workers])
