import pytest
import torch

from rlaif_ray.engines import lm


def test_left_pad_positions():
    ids, mask, pos = lm.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [1, 1, 0]]


def test_learner_logprobs_match_behaviour_logprobs(tiny_model, tokenizer):
    """What the generator records while sampling equals what the learner recomputes for
    the same weights: the importance ratio of an on-policy batch is 1."""
    prompts = [tokenizer("Hello there, friend")["input_ids"], tokenizer("A")["input_ids"]]
    tokens, logps, truncated = lm.sample(tiny_model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                         temperature=0.9, top_p=1.0, top_k=0, max_new_tokens=12, seed=1)
    assert all(len(t) == len(l) for t, l in zip(tokens, logps))
    with torch.no_grad():
        logp, mask, _ = lm.response_logprobs(tiny_model, prompts, tokens, tokenizer.pad_token_id, temperature=0.9)
    for i, l in enumerate(logps):
        assert torch.allclose(logp[i, :len(l)], torch.tensor(l), atol=1e-4)
        assert mask[i].sum() == len(l)
    again, _, _ = lm.sample(tiny_model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id,
                            temperature=0.9, top_p=1.0, top_k=0, max_new_tokens=12, seed=1)
    assert again == tokens  # seeded sampling is reproducible


CHUNK_PROBE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from rlaif_ray.engines import lm

torch.set_num_threads(1)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=150_000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
model = AutoModelForCausalLM.from_config(cfg)
scorer = lm.ResponseScorer(model, logprob_chunk=int(sys.argv[1]))
assert lm.head_is_plain(model)  # a Llama's logits are its head's output (checked once, before the step)
prompts, responses = [[5, 6, 7, 8]] * 4, [list(range(10, 266))] * 4  # 4 x 256 = 1024 response positions
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
    logp, mask, _ = lm.response_logprobs(scorer, prompts, responses, 0, 0.9, top_k=50)
    logp.sum().backward()
# bytes torch's CPU allocator handed out and took back, in time order (each op's own, and the
# frees outside any op): the peak of what the step held, whatever malloc keeps or returns
live = peak = 0
for _, nbytes in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
    live += nbytes
    peak = max(peak, live)
print(json.dumps({"peak_mb": peak / 2**20, "logp": logp.detach().sum().item(),
                  "grad": model.model.embed_tokens.weight.grad.norm().item()}))
"""


def test_chunked_logprobs_hold_a_quarter_of_the_memory_at_a_150k_vocabulary():
    """The learner's log-probs (forward and backward) at a 150k vocabulary and 1024 response
    positions, whose fp32 logits alone are 0.6 GB: the LM head in chunks of 64 positions (each
    recomputed in the backward) against all at once, each in a fresh process, the peak of
    what torch allocated over the step (its profiler's memory records). Same log-probs and
    gradient; at most a quarter of the memory. What a chunk holds scales with its positions,
    not with the batch's (lm.LOGPROB_CHUNK in a run)."""
    import json
    import subprocess
    import sys

    def run(chunk: int) -> dict:
        out = subprocess.run([sys.executable, "-c", CHUNK_PROBE, str(chunk)], capture_output=True, text=True,
                             timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    whole, chunked = run(0), run(64)
    assert chunked["logp"] == pytest.approx(whole["logp"], rel=1e-5)
    assert chunked["grad"] == pytest.approx(whole["grad"], rel=1e-4)
    assert whole["peak_mb"] > 1500, (chunked, whole)  # several [positions, vocab] fp32 copies of 0.6 GB
    assert chunked["peak_mb"] <= whole["peak_mb"] / 4, (chunked, whole)
