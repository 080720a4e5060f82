"""A vLLM worker extension (`worker_extension_cls`) that receives policy weights from the
learner over a process group of its own and loads them as they arrive: the pattern vLLM
documents for RL trainers (examples/offline_inference/rlhf.py). It runs inside each vLLM
worker process (every tensor-parallel rank of an engine is a member of the group) and, with
the in-process engine the CPU build uses, inside the actor's own process.

Bounded memory: buckets (rlaif_ray.engines.weight_sync.receive_buckets) feed `reload_weights` as an
iterator; vLLM's layerwise reload processes each layer once its tensors are in, so a worker
holds at most one bucket beyond its model. Imported by vLLM by qualified name only.
"""
from __future__ import annotations

from rlaif_ray.engines import weight_sync
from rlaif_ray.engines.devices import collective_device


class WeightReceiver:
    """Mixed into vLLM's Worker: `self.device` and `self.model_runner` are the worker's."""

    def rlaif_join_weight_group(self, master: str, port: int, first_rank: int, world: int, backend: str,
                                timeout_s: float) -> int:
        """Join the weight group as rank first_rank + this worker's rank in its engine."""
        rank = first_rank + int(getattr(self, "rank", 0))
        self._rlaif_group = weight_sync.open_group(master, port, rank, world, backend, timeout_s)
        self._rlaif_device = collective_device(backend)
        return rank

    def rlaif_receive_weights(self, tensor_spec: list, version: int, who: str, bucket_bytes: int,
                              tied_lm_head: bool) -> int:
        """Receive one policy version bucket by bucket and reload it in place."""
        def load(stream):  # the version is checked before this starts: a refused one never touches the model
            self.model_runner.reload_weights(weights_iterator=with_tied_head(stream, tied_lm_head),
                                             is_checkpoint_format=True)

        weight_sync.receive_into(load, self._rlaif_group, tensor_spec, version, who, bucket_bytes, self._rlaif_device)
        return version


    def rlaif_seed(self, seed: int) -> None:
        """The sampler's generator for the next batch (requests without a seed of their own
        draw from torch's default generator of the worker's device)."""
        import torch

        torch.manual_seed(seed)  # the CPU's and every CUDA device's

    def rlaif_load_weights_file(self, path: str, tied_lm_head: bool) -> None:
        """The object-store path into vLLM's engine process: stream the safetensors file the
        engine wrote (rlaif_ray.engines.vllm_engine.write_shared_weights) into the model, one
        tensor at a time onto this worker's device."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(getattr(self, "device", "cpu"))) as f:
            stream = ((name, f.get_tensor(name)) for name in f.keys())
            self.model_runner.reload_weights(weights_iterator=with_tied_head(stream, tied_lm_head),
                                             is_checkpoint_format=True)


def with_tied_head(stream, tied: bool):
    """The learner sends a tied LM head once (as the embedding); vLLM's loader may ask for it
    by its own name too."""
    for name, t in stream:
        yield name, t
        if tied and name == "model.embed_tokens.weight":
            yield "lm_head.weight", t
