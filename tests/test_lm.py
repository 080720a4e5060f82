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
