"""Grouped-query attention without copies on CPU: transformers' SDPA path with `enable_gqa`.

transformers' own "sdpa" attention passes `enable_gqa=True` to torch only when there is no
attention mask (CUDA's fast kernels take no mask with GQA). With a mask (a left-padded
generation batch, the learner's shared-prompt block mask) it first copies every key and
value head `num_attention_heads / num_key_value_heads` times (`repeat_kv`): for
SmolLM2-135M (9 query heads, 3 KV heads) that is 3x the KV cache copied at every decoding
step. torch's CPU flash-attention kernel takes the mask and the grouped heads together
(same result, to the bit in the forward pass; tests/test_attention.py), so on CPU this
implementation skips the copies; on any other device it is transformers' "sdpa" unchanged.
BENCHMARKS.md ("Attention"): the quickstart's generation batch 1.17x faster with it; the
learner's forward and backward 0.94x, so only generators and labelers switch (at their
actor's start-up: actors/process.py).
"""
from __future__ import annotations

import torch

NAME = "sdpa_gqa_cpu"  # the name it is registered under with transformers


def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers' attention-function contract (AttentionInterface): query [B, H, Q, D],
    key/value [B, H_kv, K, D]; returns ([B, Q, H, D], None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.device.type != "cpu" or groups == 1 or kwargs.get("position_bias") is not None \
            or kwargs.get("cache") is not None or kwargs.get("output_attentions"):
        # imported here, off the CPU path that runs per layer and decoding step
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_len = query.shape[2]
    # as transformers decides it: the causal flag only without a mask and beyond one query token
    is_causal = q_len > 1 and attention_mask is None and (is_causal if is_causal is not None
                                                          else getattr(module, "is_causal", True))
    if is_causal and key.shape[2] > q_len:  # an empty static cache's prefill: the real keys come first
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make NAME known to transformers (idempotent): the attention function, and SDPA's
    boolean masks for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from rlaif_ray.engines import lm

    AttentionInterface.register(NAME, sdpa_gqa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    lm.SDPA_IMPLEMENTATIONS.add(NAME)  # it takes SDPA's boolean masks (the learner's block mask)


def use_cpu_gqa(model):
    """Switch a loaded model from "sdpa" to NAME when it has grouped KV heads; else unchanged.
    Safe to keep after a move to another device (the function falls back per call)."""
    cfg = model.config
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or not heads or not kv or kv >= heads:
        return model
    register()
    model.set_attn_implementation(NAME)
    return model
