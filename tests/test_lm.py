import torch

from rlaif_ray import lm


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


def test_the_reserved_cache_gives_the_dynamic_caches_logits(tiny_model, tokenizer):
    """lm.reserved_cache writes keys and values into room kept ahead (no torch.cat per step):
    the same scores, bit for bit, and the same tokens as transformers' DynamicCache, also
    when the room runs out (reserve 3 < 9 new tokens) and after a batch reorder."""
    from transformers import DynamicCache

    prompts = [tokenizer.encode(t) for t in ("The cat sat on", "A summary of the post:", "Hello")]
    ids, mask, _ = lm.left_pad(prompts, tokenizer.pad_token_id)
    runs = []
    for cache in (DynamicCache(), lm.reserved_cache(tiny_model, 3)):
        out = lm.generate(tiny_model, input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=9,
                          pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True,
                          past_key_values=cache)
        runs.append((out.sequences, torch.stack(out.scores), cache))
    (seq_a, scores_a, _), (seq_b, scores_b, cache) = runs
    assert torch.equal(seq_a, seq_b) and torch.equal(scores_a, scores_b)
    layer = cache.layers[0]
    assert layer.keys.data_ptr() == layer._room[0].data_ptr()  # a view of the room, not a copy
    assert layer.get_seq_length() == ids.shape[1] + 8 and layer._room[0].shape[-2] >= layer.get_seq_length()
    # a batch reorder (prefill_shared repeats rows) makes new tensors: the next update moves them to a new room
    layer.batch_select_indices(torch.tensor([2, 0]))
    before = layer.keys.clone()
    k, v = layer.update(torch.ones(2, *layer.keys.shape[1:2], 1, layer.keys.shape[-1]),
                        torch.ones(2, *layer.values.shape[1:2], 1, layer.values.shape[-1]))
    assert k.shape[0] == 2 and torch.equal(k[:, :, -1], torch.ones_like(k[:, :, -1]))
    assert torch.equal(k[:, :, :-1], before) and k.data_ptr() == layer._room[0].data_ptr()
    assert layer._room[0].shape[-2] == before.shape[-2] + 1 + 3  # the reserve again, not a doubling
    layer.reset()
    assert layer.get_seq_length() == 0 and getattr(layer, "_room", None) is None


def test_shared_prefill_keeps_the_reserve_for_the_repeated_rows(tiny_model, tokenizer):
    """prefill_shared repeats each prompt's cache for its samples: the repeated rows get room
    for the new tokens (one allocation for the whole generation), not a doubled prompt."""
    prompts = [tokenizer.encode("A post about cats and dogs, summarised:")] * 3
    cache = lm.prefill_shared(tiny_model, prompts, tokenizer.pad_token_id, reserve=10)
    layer = cache.layers[0]
    n = layer.get_seq_length()
    assert layer.keys.shape[0] == 3 and n == len(prompts[0]) - 1
    layer.update(layer.keys[:, :, :1] * 0, layer.values[:, :, :1] * 0)  # generate's first step: the last prompt token
    assert layer._room[0].shape[0] == 3 and layer._room[0].shape[-2] == n + 1 + 11
