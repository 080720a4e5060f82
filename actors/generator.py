"""RolloutGenerator: samples responses for a prompt batch with the current policy weights.

A Ray actor with two threads: `set_weights` and `info` run in their own "control" thread, so
a weight update is received while a batch is being generated (`set_weights` only stages the
new weights; the next compute call installs them under the generation lock). Every compute
call (generate, continuation_logprobs, digest, receive_weights, join_weight_group) runs in the
one thread of the default group. Why not a plain threaded actor (max_concurrency=2): its two threads take the
calls as they come, so back-to-back batches computed on both, each thread starting its own
OpenMP team; with more OpenMP threads than cores, libgomp stops spinning at its barriers and
sleeps at each one (BENCHMARKS.md, "Generator threads": back-to-back quickstart batches on
two teams against one). Every rollout is tagged with the policy version that produced it.
"""
from __future__ import annotations

import threading
import time

import pyarrow as pa
import ray

from rlaif_ray.data import schemas
from rlaif_ray.engines import weight_sync
from rlaif_ray.engines.backends import load_engine
from rlaif_ray.engines.devices import dtype_name
from rlaif_ray.engines.hf import HFEngine
from rlaif_ray.run.memory import PeakRSS

from .process import ActorProcess, exit_if_engine_dead, watch_engine


class RolloutGenerator:
    def __init__(self, name: str, model_name: str, dtype: str, generation: dict, torch_threads: int,
                 device: str = "cpu", vllm: dict | None = None, lora: dict | None = None):
        self.proc = ActorProcess("generator", name, torch_threads, device)
        self.name, self.gen, self.device = name, generation, device
        # lora (model.lora): the policy is the base model plus an adapter, which each sync replaces
        self.backend = load_engine(generation["backend"], model_name, device, dtype, vllm=vllm, lora=lora)
        if isinstance(self.backend, HFEngine):
            self.proc.tune(self.backend.model)
        watch_engine(name, self.backend)  # vLLM in processes of its own: a dead one ends this actor
        self.weight_dtype = dtype_name(self.backend.dtype)  # what the learner casts weights to
        self.version = 0
        self._staged = None  # (weights, version) received but not yet installed
        self._stage_lock = threading.Lock()  # set_weights (control thread) against the install
        self._lock = threading.Lock()  # one compute call at a time
        self._compute_threads: set[int] = set()  # threads that ran compute calls (1 expected)
        self.last_install_s = 0.0  # time of the last weight install
        self.last_install_extra_mb = 0.0  # peak memory it added (broadcast: about one bucket)

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        return self.proc.info(version=self.version, compute_threads=len(self._compute_threads),
                              last_install_s=self.last_install_s, last_install_extra_mb=self.last_install_extra_mb,
                              backend=self.gen["backend"], prefix_caching=self.backend.prefix_caching,
                              weight_dtype=self.weight_dtype, weight_ranks=self.backend.weight_ranks)

    @ray.method(concurrency_group="control")
    def set_weights(self, weights: dict, version: int) -> int:
        """Stage a new policy version (a weight_sync.pack payload, of the full weights or with
        model.lora of the adapter, or {name: tensor}); returns
        at once (the actor may be mid-generation).
        Returns the newest version this actor holds: the driver checks it is `version`."""
        with self._stage_lock:
            newest = max(self.version, self._staged[1] if self._staged else -1)
            if version < newest:
                return newest  # an old update arriving late never replaces a newer one
            self._staged = (weights, version)
            return version

    def join_weight_group(self, master: str, port: int, first_rank: int, world: int, backend: str, spec: list,
                          timeout_s: float, bucket_bytes: int) -> int:
        """Join the learner's weight group as ranks first_rank.. (one per engine worker)."""
        self.backend.join_weight_group(master, port, first_rank, world, backend, timeout_s)
        self.weight_spec, self.bucket_bytes = spec, bucket_bytes
        return first_rank

    def receive_weights(self, version: int) -> int:
        """The broadcast path: rank 0's buckets are loaded into the engine as they arrive (no
        staged copy of the model), so this waits for a batch being generated to finish."""
        with self._lock, PeakRSS() as mem, exit_if_engine_dead(self.name):
            self._compute_threads.add(threading.get_ident())
            t0 = time.perf_counter()
            self.backend.receive_weights(self.weight_spec, version, self.name, self.bucket_bytes)
            self.last_install_s = time.perf_counter() - t0
            with self._stage_lock:
                self.version, self._staged = version, None
        self.last_install_extra_mb = max(mem.extra_mb, mem.cuda_extra_mb)
        return version

    def _install_staged(self) -> None:
        """Under self._lock, at the start of every compute call."""
        self._compute_threads.add(threading.get_ident())
        with self._stage_lock:  # taken and cleared at once: a version staged meanwhile is kept
            staged, self._staged = self._staged, None
        if staged is not None:
            weights, version = staged
            if version > self.version:
                t0 = time.perf_counter()
                with PeakRSS() as mem:  # (the staged payload itself is already resident: a model copy)
                    tensors = weight_sync.unpack(weights) if "arrays" in weights else weights
                    if weights.get("adapter"):  # model.lora: the adapter alone (weight_sync.pack)
                        self.backend.load_adapter(tensors, version)
                    else:
                        self.backend.load_weights(tensors)
                self.last_install_s = time.perf_counter() - t0
                self.last_install_extra_mb = max(mem.extra_mb, mem.cuda_extra_mb)
                self.version = version

    def continuation_logprobs(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """log p(continuation | prompt) at temperature 1 under the installed weights."""
        with self._lock, exit_if_engine_dead(self.name):
            self._install_staged()
            return self.backend.continuation_logprobs(prompt, continuation)

    def digest(self) -> tuple[int, float]:
        with self._lock, exit_if_engine_dead(self.name):
            self._install_staged()
            return self.version, self.backend.digest()

    def generate(self, prompts: pa.RecordBatch, batch_index: int, samples_per_prompt: int, seed: int,
                 temperature: float | None = None) -> pa.RecordBatch:
        schemas.check(prompts, schemas.PROMPT, f"{self.name}.generate input")
        with self._lock, self.proc.busy():
            self._install_staged()
            t0 = time.perf_counter()
            rows = prompts.to_pylist()
            expanded = [(r, k) for r in rows for k in range(samples_per_prompt)]
            # a prompt can repeat in one batch (an epoch boundary): its repeats get their own ids
            seen: dict = {}
            keys = []
            for r in rows:
                j = seen[r["prompt_id"]] = seen.get(r["prompt_id"], -1) + 1
                keys.append(r["prompt_id"] if j == 0 else f"{r['prompt_id']}~{j}")
            tokens, logps, truncated = self.backend.generate(
                [r["prompt_token_ids"] for r, _ in expanded],
                temperature=temperature or self.gen["temperature"], top_p=self.gen["top_p"],
                top_k=self.gen["top_k"], max_new_tokens=self.gen["max_new_tokens"], seed=seed)
            texts = [self.backend.tok.decode(t, skip_special_tokens=True) for t in tokens]
            if self.gen.get("strip_trailing"):
                texts = [t.strip().rstrip(". ").strip() or t.strip() for t in texts]
            cols = {name: [r[name] for r, _ in expanded] for name in schemas.PROMPT.names}
            cols.update({
                "rollout_id": [f"b{batch_index}:{key}:{k}" for key in keys for k in range(samples_per_prompt)],
                "batch_index": [batch_index] * len(expanded),
                "sample_index": [k for _, k in expanded],
                "response_text": texts,
                "response_token_ids": tokens,
                "behaviour_logprobs": logps,
                "policy_version": [self.version] * len(expanded),
                "truncated": truncated,
                "generator": [self.name] * len(expanded),
            })
            n_tokens = sum(len(t) for t in tokens)
            self.proc.metrics.inc("tokens_generated", n_tokens)
            self.proc.metrics.set("tokens_per_s", n_tokens / max(time.perf_counter() - t0, 1e-9))
            return schemas.make_batch(schemas.ROLLOUT, cols)


def generator_actor():
    """The Ray actor class of RolloutGenerator, with its "control" thread (module docstring).
    Start it with `.options(...)`; `max_concurrency` is the default group's and stays 1."""
    return ray.remote(concurrency_groups={"control": 1})(RolloutGenerator)
