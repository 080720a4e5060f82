"""The labeler's forward paths (rlaif_ray.engines.hf.HFEngine) read the same label
log-probs as one sequence per plain forward pass: the right-padded batch, and the
prefix-shared path with its root KV cache kept across calls."""
import copy

import torch

from rlaif_ray.engines import lm
from rlaif_ray.feedback import prompts


def _seqs(tokenizer, shots: int, n: int, extra: str | None = None):
    from rlaif_ray.feedback.pairs import exemplar_pairs, load_pairs

    rows, task = load_pairs("hh_helpful", n)
    ex = exemplar_pairs("hh_helpful", shots)
    texts = [prompts.build(task, r["context"], x, y, exemplars=ex)
             for r in rows for x, y in ((r["response_a"], r["response_b"]), (r["response_b"], r["response_a"]))]
    if extra:
        texts.append(extra)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _all(model):
    return torch.arange(model.config.vocab_size)


def _one_by_one(model, seqs, pad, lookback):
    return torch.cat([lm.next_token_logprobs(model, [s], pad, lookback) for s in seqs])


def test_right_padded_batch_matches_single_rows(tiny_model, tokenizer):
    from rlaif_ray.engines.hf import HFEngine

    seqs = _seqs(tokenizer, 0, 3, extra="An unrelated short prompt =")
    pad = tokenizer.pad_token_id
    ref = _one_by_one(tiny_model, seqs, pad, 2)
    got = HFEngine(tiny_model, tokenizer, prefix_sharing="off")._padded(seqs, 2, _all(tiny_model))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # the left-padded batch (lm.next_token_logprobs) agrees too
    torch.testing.assert_close(lm.next_token_logprobs(tiny_model, seqs, pad, 2), ref, atol=1e-4, rtol=0)


def test_shared_root_cache_across_calls(tiny_model, tokenizer):
    from rlaif_ray.engines.hf import HFEngine

    pad = tokenizer.pad_token_id
    eng = HFEngine(tiny_model, tokenizer, prefix_sharing="on")
    two_shot = _seqs(tokenizer, 2, 4)
    batches = [two_shot[:4], two_shot[4:],  # the same exemplars: the second call reuses the root
               _seqs(tokenizer, 0, 2),  # another root: the cached one is cut back to their common prefix
               _seqs(tokenizer, 1, 2, extra="An unrelated short prompt ="),  # no common root at all
               two_shot[2:6]]
    for seqs in batches:
        torch.testing.assert_close(eng._shared(seqs, 2, _all(tiny_model)), _one_by_one(tiny_model, seqs, pad, 2), atol=1e-4, rtol=0)
        assert eng._root[1].get_seq_length() == len(eng._root[0])


def test_shared_root_cache_follows_weight_updates(tiny_model, tokenizer):
    from rlaif_ray.engines.hf import HFEngine

    model = copy.deepcopy(tiny_model)
    pad = tokenizer.pad_token_id
    eng = HFEngine(model, tokenizer, prefix_sharing="on")
    seqs = _seqs(tokenizer, 1, 2)
    eng._shared(seqs, 1, _all(model))
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # in place, as load_state_dict does
    ref = _one_by_one(model, seqs, pad, 1)
    torch.testing.assert_close(eng._shared(seqs, 1, _all(model)), ref, atol=1e-4, rtol=0)
    with torch.no_grad():
        model.load_state_dict(tiny_model.state_dict())
    torch.testing.assert_close(eng._shared(seqs, 1, _all(model)), _one_by_one(model, seqs, pad, 1), atol=1e-4, rtol=0)
