"""The memory plan of a GPU layout by arithmetic, per GPU of each pool: what `rlaif-ray check`
prints for a config whose pools hold GPUs, so a layout is balanced before a cluster starts.

Learner rank (FSDP over the pool's ranks): fp32 master weights, fp32 gradients and two fp32
AdamW moments (16 bytes a parameter) divided over the ranks; the reference policy in the
compute dtype when the learner holds it (rl.reference); activations of one micro-batch
(rl.micro_batch_tokens, else the rank's whole shard at the longest sequence): with gradient
checkpointing each layer's bf16 input kept plus one layer recomputed, else every layer's;
the LM head's log-probs in chunks (rlaif_ray.engines.lm.LOGPROB_CHUNK positions, about four
fp32 [chunk, vocabulary] tensors alive at once). vLLM engine (generators, labelers): bf16
weights over its tensor-parallel GPUs and the KV cache the engine's share of the GPU leaves
after them (vllm.gpu_memory_utilization; ~2 GiB of activations and CUDA graphs set aside),
against what one call needs: each of the engine's sequences at its longest.

Estimates, not measurements: `make gpu-bench` measures the learner's peak on a GPU.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlaif_ray.config import Config

GIB = 2**30
ENGINE_RESERVE_GIB = 2.0  # a vLLM engine's activations, sampler and CUDA graphs beside weights and KV
# the shipped GPU configs' models (their published config.json), for a check on a machine
# that has not downloaded them; any other model's config is read from its folder or the cache
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-1.5B-Instruct": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     tie_word_embeddings=False),
    "Qwen/Qwen2.5-72B-Instruct": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                                      tie_word_embeddings=False),
}


def model_shape(name: str) -> dict | None:
    """hidden_size, intermediate_size, layers, heads, KV heads, vocabulary, tied head: from the
    model's config where it is on this machine, else KNOWN_SHAPES, else None."""
    shape = KNOWN_SHAPES.get(name.removesuffix("-Instruct") + "-Instruct")  # a base model has its shape
    try:
        from rlaif_ray.engines.models import model_config

        c = model_config(name)
        shape = {k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "vocab_size")}
        shape["num_key_value_heads"] = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        shape["tie_word_embeddings"] = bool(getattr(c, "tie_word_embeddings", False))
    except Exception:  # noqa: BLE001 - not downloaded (offline): the known shape, or no plan
        pass
    return shape


def param_count(s: dict) -> int:
    """Parameters of a decoder (Llama/Qwen-style attention and gated MLP; biases ignored)."""
    d, f, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = d // s["num_attention_heads"] * s["num_key_value_heads"]
    return L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d + V * d * (1 if s["tie_word_embeddings"] else 2)


def kv_bytes_per_token(s: dict, itemsize: int = 2) -> int:
    return 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * (s["hidden_size"] // s["num_attention_heads"]) \
        * itemsize


def learner_gib(s: dict, ranks: int, tokens: int, checkpointing: bool, reference: bool, chunk: int) -> dict:
    """Per learner rank (see the module docstring), in GiB."""
    from rlaif_ray.engines.lm import LOGPROB_CHUNK

    P, d, f, L, V = param_count(s), s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    layer_acts = tokens * (10 * d + 3 * f) * 2  # one layer's saved bf16 activations: attention and gated MLP
    acts = tokens * d * 2 * L + layer_acts if checkpointing else layer_acts * L
    parts = {"state": 16 * P / ranks, "reference": 2 * P / ranks if reference else 0.0, "activations": acts,
             "logits": 4 * (chunk or LOGPROB_CHUNK) * V * 4}
    return {k: v / GIB for k, v in parts.items()}


def engine_gib(s: dict, gpu_gib: float, share: float, tp: int, sequences: int, max_len: int) -> dict:
    """One vLLM engine per GPU of its tensor-parallel group, in GiB: weights, the KV cache the
    share leaves, and the KV one call of `sequences` at `max_len` tokens needs."""
    weights = 2 * param_count(s) / tp / GIB
    room = max(0.0, share * gpu_gib - weights - ENGINE_RESERVE_GIB)
    need = sequences * max_len * kv_bytes_per_token(s) / tp / GIB
    return {"weights": weights, "kv_room": room, "kv_needed": need}


def gpu_plan(cfg: "Config", gpu_gib: float = 80.0) -> list[str]:
    """Lines of the per-GPU plan for each pool on GPUs (none on a CPU layout)."""
    from rlaif_ray.config import reference_on_labelers

    p, rl, lines = cfg.pipeline, cfg.rl, []
    seq_len = cfg.task.max_prompt_tokens + cfg.generation.max_new_tokens
    rows = rl.prompts_per_step * rl.samples_per_prompt
    if p.learner.num_gpus > 0 and (s := model_shape(cfg.model.name)):
        ranks = p.learner.num_actors
        tokens = min(rl.micro_batch_tokens or math.inf, rows / ranks * seq_len)
        m = learner_gib(s, ranks, int(tokens), rl.gradient_checkpointing, not reference_on_labelers(cfg), 0)
        lines.append(_line("learner", ranks, m, gpu_gib,
                           f"{param_count(s) / 1e9:.2f}B parameters, FSDP over {ranks}, {int(tokens)} tokens "
                           f"a micro-batch"))
    pools = [("generators", p.generators, cfg.model.name, rows / p.generators.num_actors,
              p.generators.vllm.max_model_len or seq_len, cfg.generation.backend)]
    pools.append(("labelers", p.labelers, cfg.reward.model or cfg.model.name, cfg.reward.batch_size,
                  p.labelers.vllm.max_model_len or seq_len, cfg.reward.backend))
    for name, role, model, sequences, max_len, backend in pools:
        if role.num_gpus <= 0 or backend != "vllm" or not (s := model_shape(model)):
            continue
        tp = role.vllm.tensor_parallel_size
        share = role.vllm.gpu_memory_utilization
        e = engine_gib(s, gpu_gib, share, tp, int(sequences), int(max_len))
        lines.append(f"{name}: {role.num_actors} x {tp} GPU(s), per GPU {e['weights']:.1f} GiB of bf16 weights "
                     f"({model}), KV room {e['kv_room']:.1f} GiB at gpu_memory_utilization {share:g}; one call "
                     f"of {int(sequences)} sequences x {int(max_len)} tokens needs {e['kv_needed']:.2f} GiB "
                     f"({e['kv_needed'] / max(e['kv_room'], 1e-9):.0%} of it)")
    return lines


def _line(name: str, n: int, parts: dict, gpu_gib: float, what: str) -> str:
    total = sum(parts.values())
    shown = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if v)
    return (f"{name}: {n} GPU(s), per GPU {total:.1f} GiB of {gpu_gib:g} ({total / gpu_gib:.0%}): {shown} GiB "
            f"({what})")
