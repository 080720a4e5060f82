"""RolloutGenerator: samples responses for a prompt batch with the current policy weights.

Runs as a threaded Ray actor (max_concurrency=2) so that a weight update can be received
while a batch is being generated: `set_weights` only stages the new weights, and the next
`generate` call installs them under the generation lock. Every rollout is tagged with the
policy version that actually produced it.
"""
from __future__ import annotations

import os
import threading
import time
import warnings

import pyarrow as pa

from rlaif_ray import lm, schemas, weight_sync
from rlaif_ray.metrics import RoleMetrics
from rlaif_ray.models import trim_heap


class HFBackend:
    """transformers generate on CPU or GPU."""

    def __init__(self, model_name: str, dtype: str, device: str):
        import torch

        from rlaif_ray.models import load_model, load_tokenizer

        self.tok = load_tokenizer(model_name)
        self.model = load_model(model_name, dtype).to(device).eval()
        self.device = device
        self.torch = torch

    def generate(self, prompts: list[list[int]], *, temperature, top_p, top_k, max_new_tokens, seed):
        return lm.sample(self.model, prompts, self.tok.pad_token_id, self.tok.eos_token_id,
                         temperature=temperature, top_p=top_p, top_k=top_k,
                         max_new_tokens=max_new_tokens, seed=seed)

    def load_weights(self, weights: dict) -> None:
        params = dict(self.model.named_parameters())
        missing = [k for k in params if k not in weights and not _tied(k, self.model)]
        if missing:
            raise ValueError(f"weight update lacks {len(missing)} parameters, e.g. {missing[:3]}")
        with self.torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arrays from the object store are read-only
            for name, arr in weights.items():
                params[name].copy_(self.torch.as_tensor(arr))  # numpy (object store) or torch (broadcast)

    def continuation_logprobs(self, prompt: list[int], continuation: list[int]) -> list[float]:
        with self.torch.no_grad():
            logp, _, _ = lm.response_logprobs(self.model, [prompt], [continuation], self.tok.pad_token_id, 1.0)
        return logp[0].tolist()

    def digest(self) -> float:
        """A cheap fingerprint of the weights (tests check that a sync changed them)."""
        with self.torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))


def _tied(name: str, model) -> bool:
    return name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


BACKENDS = {"hf": HFBackend}


def _backend(name: str):
    if name == "vllm":
        from actors.vllm_engine import VLLMBackend  # imported only when asked for

        return VLLMBackend
    return BACKENDS[name]


class RolloutGenerator:
    def __init__(self, name: str, model_name: str, dtype: str, generation: dict, torch_threads: int,
                 device: str = "cpu"):
        import torch

        torch.set_num_threads(torch_threads)
        self.name, self.gen, self.device = name, generation, device
        self.backend = _backend(generation["backend"])(model_name, dtype, device)
        self.version = 0
        self._staged = None  # (weights, version) received but not yet installed
        self._lock = threading.Lock()
        self.busy_s = 0.0
        self.last_install_s = 0.0  # time of the last weight install
        self.metrics = RoleMetrics("generator", name)

    def info(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "version": self.version, "busy_s": self.busy_s,
                "last_install_s": self.last_install_s, "backend": self.gen["backend"],
                "prefix_caching": getattr(self.backend, "prefix_caching", False)}

    def set_weights(self, weights: dict, version: int) -> int:
        """Stage a new policy version; returns at once (the actor may be mid-generation).
        Returns the newest version this actor holds: the driver checks it is `version`."""
        newest = max(self.version, self._staged[1] if self._staged else -1)
        if version < newest:
            return newest  # an old update arriving late never replaces a newer one
        self._staged = (weights, version)
        return version

    def join_weight_group(self, master: str, port: int, rank: int, world: int, backend: str, spec: list,
                          timeout_s: float) -> int:
        self.weight_group = weight_sync.open_group(master, port, rank, world, backend, timeout_s)
        self.weight_spec, self.weight_device = spec, "cuda" if backend == "nccl" else "cpu"
        return rank

    def receive_weights(self, version: int) -> int:
        """The broadcast path: receive rank 0's tensors (into this actor's device) and
        stage them like set_weights."""
        weights = weight_sync.receive(self.weight_group, self.weight_spec, version, self.name, self.weight_device)
        return self.set_weights(weights, version)

    def _install_staged(self) -> None:
        if self._staged is not None:
            weights, version = self._staged
            self._staged = None
            if version > self.version:
                t0 = time.perf_counter()
                self.backend.load_weights(weights)
                self.last_install_s = time.perf_counter() - t0
                self.version = version

    def continuation_logprobs(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """log p(continuation | prompt) at temperature 1 under the installed weights."""
        with self._lock:
            self._install_staged()
            return self.backend.continuation_logprobs(prompt, continuation)

    def digest(self) -> tuple[int, float]:
        with self._lock:
            self._install_staged()
            return self.version, self.backend.digest()

    def generate(self, prompts: pa.RecordBatch, batch_index: int, samples_per_prompt: int, seed: int,
                 temperature: float | None = None) -> pa.RecordBatch:
        schemas.check(prompts, schemas.PROMPT, f"{self.name}.generate input")
        with self._lock:
            self._install_staged()
            t0 = time.perf_counter()
            rows = prompts.to_pylist()
            expanded = [(r, k) for r in rows for k in range(samples_per_prompt)]
            tokens, logps, truncated = self.backend.generate(
                [r["prompt_token_ids"] for r, _ in expanded],
                temperature=temperature or self.gen["temperature"], top_p=self.gen["top_p"],
                top_k=self.gen["top_k"], max_new_tokens=self.gen["max_new_tokens"], seed=seed)
            texts = [self.backend.tok.decode(t, skip_special_tokens=True) for t in tokens]
            if self.gen.get("strip_trailing"):
                texts = [t.strip().rstrip(". ").strip() or t.strip() for t in texts]
            cols = {name: [r[name] for r, _ in expanded] for name in schemas.PROMPT.names}
            cols.update({
                "rollout_id": [f"b{batch_index}:{r['prompt_id']}:{k}" for r, k in expanded],
                "batch_index": [batch_index] * len(expanded),
                "sample_index": [k for _, k in expanded],
                "response_text": texts,
                "response_token_ids": tokens,
                "behaviour_logprobs": logps,
                "policy_version": [self.version] * len(expanded),
                "truncated": truncated,
                "generator": [self.name] * len(expanded),
            })
            out = schemas.make_batch(schemas.ROLLOUT, cols)
            trim_heap()
            dt = time.perf_counter() - t0
            self.busy_s += dt
            n_tokens = sum(len(t) for t in tokens)
            self.metrics.inc("tokens_generated", n_tokens)
            self.metrics.set("tokens_per_s", n_tokens / max(dt, 1e-9))
            self.metrics.observe("batch_s", dt)
            return out
