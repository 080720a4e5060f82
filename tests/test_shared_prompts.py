"""Shared-prompt computation (rl.shared_prompts, lm.PromptGroups): each prompt through the
model once for all its samples gives the log-probs, values and the updated weights of one
full sequence per sample, to float rounding."""
import numpy as np
import pytest
import torch

from rlaif_ray.engines import lm


def _rows(seed: int = 0, lengths=(7, 3, 9, 1, 5, 8, 2)):
    """Two prompts of different lengths with 4 and 3 samples of mixed lengths, interleaved (the
    groups need not be contiguous), plus a prompt with one sample."""
    g = torch.Generator().manual_seed(seed)
    p1, p2, p3 = (torch.randint(100, 5000, (n,), generator=g).tolist() for n in (23, 11, 6))
    prompts = [p1, p2, p1, p2, p1, p3, p1, p2][:len(lengths) + 1]
    responses = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in lengths + (4,)]
    return prompts, responses


def test_groups_layout():
    grp = lm.PromptGroups([[1, 2, 3], [9], [1, 2, 3]], [[4, 5], [8, 7, 6], [6]], pad_id=0, device="cpu")
    assert grp.num_groups == 2
    assert grp.ids.tolist() == [[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 0, 0]]
    # each response's positions continue from its prompt's end
    assert grp.positions[0].tolist() == [0, 1, 2, 3, 4, 3]
    # token 0 of a response is predicted from the prompt's last token, the others from their own previous token
    assert grp.keep[0].tolist() == [2, 3, 2]
    assert grp.targets[0].tolist() == [4, 5, 6]
    see = grp.attention[0, 0]
    assert see[5].tolist() == [True, True, True, False, False, True]  # the second response does not see the first
    assert see[4].tolist() == [True, True, True, True, True, False]
    assert grp.rows(torch.arange(6.0).reshape(2, 3)).tolist() == [[0, 1, 0], [3, 4, 5], [2, 0, 0]]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_gqa_cpu"])
@pytest.mark.parametrize("sampling", [dict(), dict(top_k=20, top_p=0.8)])
def test_same_logprobs_and_gradients_as_full_sequences(tiny_model_path, attn, sampling):
    from transformers import AutoModelForCausalLM

    from rlaif_ray.cpu import attention

    attention.register()  # the CPU GQA path load_model picks (rlaif_ray/cpu/attention.py)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=attn)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    scorer = lm.ResponseScorer(model, head)
    prompts, responses = _rows()
    out = []
    for fn in (lm.response_logprobs, lm.grouped_logprobs):
        scorer.zero_grad()
        kw = dict(top_k=sampling.get("top_k", 0), top_p=sampling.get("top_p", 1.0))
        logp, mask, values = fn(scorer, prompts, responses, 0, 0.9, **kw)
        (logp.sum() + values.pow(2).mul(mask).sum()).backward()
        out.append((logp.detach(), mask, values.detach(), {k: p.grad.clone() for k, p in scorer.named_parameters()}))
    (a, ma, va, ga), (b, mb, vb, gb) = out
    assert torch.equal(ma, mb)
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(vb * mb, va * ma, atol=2e-5, rtol=1e-5)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-4, rtol=1e-3, msg=k)


def _scored(prompts, responses):
    rewards = [0.7, -0.2, 0.1, -0.6, 0.4, 0.3, -0.1, 0.2]
    ids = {}
    return [{"prompt_id": f"p{ids.setdefault(tuple(p), len(ids))}", "prompt_token_ids": p, "response_token_ids": r,
             "behaviour_logprobs": [-2.0] * len(r), "reward": rewards[i], "reward_ok": i != 3,
             "rollout_id": f"b0:{i}", "batch_index": 0} for i, (p, r) in enumerate(zip(prompts, responses))]


@pytest.mark.parametrize("checkpointing,baseline", [(False, "group_mean"), (True, "group_mean"), (False, "value")])
def test_the_same_update_as_full_sequences(tiny_model_path, checkpointing, baseline):
    """Two learner steps (the second with AdamW state) give the same weights and stats."""
    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner, loss_normalisers

    rows = _scored(*_rows())
    norm = loss_normalisers([r["response_token_ids"] for r in rows], [r["reward_ok"] for r in rows])
    out = []
    for shared in (False, True):
        cfg = RLConfig(lr=1e-3, shared_prompts=shared, gradient_checkpointing=checkpointing, baseline=baseline,
                       kl_estimator="k3")
        learner = PolicyLearner(tiny_model_path, cfg, 0.9)
        stats = [learner.step(rows, *norm) for _ in range(2)]
        out.append((stats, {k: v.detach().numpy().copy() for k, v in learner.state_for_sync("float32")}))
    (s0, w0), (s1, w1) = out
    for key in ("loss_sum", "kl_sum", "adv_sum", "return_sum"):
        assert [s[key] for s in s1] == pytest.approx([s[key] for s in s0], abs=1e-5, rel=1e-4), key
    for k in w0:
        np.testing.assert_allclose(w1[k], w0[k], atol=1e-6, rtol=1e-5, err_msg=k)
    untrained = {k: v.detach().numpy() for k, v in PolicyLearner(tiny_model_path, RLConfig(), 0.9).state_for_sync("float32")}
    assert any(not np.allclose(w1[k], v) for k, v in untrained.items())  # it trained


def test_reference_logprobs_from_the_batch_are_used(tiny_model_path):
    """A batch that carries reference log-probs (computed off the learner) gives the update
    the learner's own reference forward gives."""
    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner, loss_normalisers

    prompts, responses = _rows()
    rows = _scored(prompts, responses)
    norm = loss_normalisers(responses, [r["reward_ok"] for r in rows])
    plain = PolicyLearner(tiny_model_path, RLConfig(lr=1e-3), 0.9)
    ref = plain.logprobs(prompts, responses, reference=True)
    carried = PolicyLearner(tiny_model_path, RLConfig(lr=1e-3), 0.9)
    a = plain.step(rows, *norm)
    b = carried.step([dict(r, reference_logprobs=lp) for r, lp in zip(rows, ref)], *norm)
    assert b["kl_sum"] == pytest.approx(a["kl_sum"], abs=1e-5)
    assert b["loss_sum"] == pytest.approx(a["loss_sum"], abs=1e-6)


def test_generation_prefills_each_prompt_once(tiny_model, tokenizer):
    """The k samples of a prompt share one prefill (lm.prefill_shared): the same tokens and
    behaviour log-probs as one prefill per row, with the same seed."""
    prompts, _ = _rows()
    assert lm.prefill_shared(tiny_model, [prompts[0], prompts[1]], tokenizer.pad_token_id) is None  # nothing repeats
    seen = []  # the LM head's input: one position per distinct prompt, not every prompt token
    hook = tiny_model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    try:
        cache = lm.prefill_shared(tiny_model, prompts, tokenizer.pad_token_id)
    finally:
        hook.remove()
    assert seen == [(len(set(map(tuple, prompts))), 1, tiny_model.config.hidden_size)]
    assert cache.get_seq_length() == max(len(p) for p in prompts) - 1
    kw = dict(temperature=0.9, top_p=1.0, top_k=0, max_new_tokens=12, seed=5)
    a = lm.sample(tiny_model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, share_prompts=False, **kw)
    b = lm.sample(tiny_model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, share_prompts=True, **kw)
    assert b[0] == a[0] and b[2] == a[2]
    for x, y in zip(a[1], b[1]):
        np.testing.assert_allclose(y, x, atol=1e-4)


def test_the_direct_scorer_runs_the_post_once_for_its_samples(tiny_model, tokenizer):
    """d-RLAIF scoring of k samples of one post: the post (the prompts' shared prefix) goes
    through the model once, then each sample's tail (HFEngine._shared), with the label
    log-probs of one row at a time."""
    from rlaif_ray.data.tasks import load_tldr, post_block
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.feedback.scoring import scorer_prompt
    from rlaif_ray.rubrics import SCORERS

    post = post_block(load_tldr()[0])
    summaries = ["I lost my job and my dog ran away.", "A story about a long week.",
                 "My landlord raised the rent again and I do not know what to do.", "Too long."]
    texts = [scorer_prompt(SCORERS["score10_chat"], post, s, tokenizer) for s in summaries]
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    engine = HFEngine(tiny_model, tokenizer, prefix_sharing="on")
    engine._root = None
    seen = []
    hook = engine.model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).numel()),
        with_kwargs=True)
    try:
        shared = engine.label_logprobs(seqs, [tokenizer.convert_tokens_to_ids("1")], 2)
    finally:
        hook.remove()
    plain = engine._padded(seqs, 2, torch.tensor([tokenizer.convert_tokens_to_ids("1")]))
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-4)
    prefix = min(next(i for i, (x, y) in enumerate(zip(seqs[0], s)) if x != y) for s in seqs[1:])
    assert prefix > 0.7 * len(seqs[0])  # the post is most of each prompt
    tails = sum(len(s) - prefix for s in seqs)
    assert sum(seen) <= prefix + tails + 4 * len(summaries)  # not sum(len(s)): the post ran once


def test_the_labeler_computes_the_reference_logprobs_the_learner_would(ray_local, tiny_model_path, tmp_path):
    """rl.reference: labeler (auto with a labeler holding the policy's model): training batches arrive with a reference_logprobs column equal to the learner's
    own reference forward; evaluation batches without it; the learner then loads no reference."""
    import ray

    from actors.pipeline import Pipeline, Rollouts
    from rlaif_ray.config import ConfigError, config_from_dict, reference_on_labelers
    from rlaif_ray.data.tasks import build_prompts, load_tldr
    from rlaif_ray.engines.models import load_tokenizer
    from rlaif_ray.rl.learner import PolicyLearner
    from tests.test_pipeline import tiny_cfg

    cfg = tiny_cfg(tiny_model_path, tmp_path)
    assert reference_on_labelers(cfg)  # auto: hf labeler on the policy's model, overlapped or not
    assert reference_on_labelers(tiny_cfg(tiny_model_path, tmp_path, rl={"max_staleness": 0}))
    assert not reference_on_labelers(tiny_cfg(tiny_model_path, tmp_path, rl={"reference": "learner"}))
    with pytest.raises((ConfigError, ValueError), match="rl.reference=labeler"):
        config_from_dict({"rl": {"reference": "labeler"}, "reward": {"backend": "vllm"}})
    pipe = Pipeline(cfg, "refcol")
    try:
        items = build_prompts(load_tldr()[:200], load_tokenizer(tiny_model_path), cfg.task).train[:2]
        batch = Rollouts(pipe, items, 0, 2, 0, "direct").get(120)
        heldout = Rollouts(pipe, items, -1, 1, 0, "direct").get(120)
        assert heldout.column("reference_logprobs").null_count == heldout.num_rows
        got = batch.column("reference_logprobs").to_pylist()
        prompts = batch.column("prompt_token_ids").to_pylist()
        responses = batch.column("response_token_ids").to_pylist()
        want = PolicyLearner(tiny_model_path, cfg.rl, cfg.generation.temperature).logprobs(prompts, responses, True)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-4)
        assert not ray.get(pipe.learner.workers[0].__ray_call__.remote(lambda w: w.learner._ref is not None))
        pipe.train(batch)  # trains from the column, without loading a reference
        assert not ray.get(pipe.learner.workers[0].__ray_call__.remote(lambda w: w.learner._ref is not None))
    finally:
        pipe.kill()


FAMILIES = {  # tiny models of families whose layers are not all full attention
    "mistral_sliding": ("MistralConfig", dict(sliding_window=4)),
    "gemma2_sliding": ("Gemma2Config", dict(sliding_window=4, query_pre_attn_scalar=16)),
    "cohere2_sliding": ("Cohere2Config", dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "lfm2_conv": ("Lfm2Config", dict(layer_types=["conv", "full_attention"])),
    "qwen3_next_linear": ("Qwen3NextConfig", dict(layer_types=["linear_attention", "full_attention"], num_experts=0,
                                                  linear_num_value_heads=2, linear_num_key_heads=1,
                                                  linear_key_head_dim=16, linear_value_head_dim=16)),
    "jamba_mamba": ("JambaConfig", dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=100,
                                        num_experts=1, mamba_d_state=4, mamba_expand=2)),
    "falcon_h1_hybrid": ("FalconH1Config", dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=4)),
    "granite4_hybrid": ("GraniteMoeHybridConfig", dict(layer_types=["mamba", "attention"], num_local_experts=0,
                                                       mamba_d_state=4, mamba_n_heads=4, mamba_d_head=16)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_models_that_are_not_all_full_attention_run_one_sequence_per_sample(family):
    """A block mask is exact only when every layer is full attention: on sliding-window layers
    (window 4 here, shorter than the prompts) and recurrent, convolution or linear-attention
    layers the packed pass gives other log-probs. Such models are not packed: the log-probs the
    learner and the labeler compute (shared_prompt_logprobs) are one sequence per sample's."""
    import transformers
    from transformers import AutoModelForCausalLM

    name, extra = FAMILIES[family]
    cfg = getattr(transformers, name)(**{**dict(vocab_size=5000, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=16, max_position_embeddings=512, pad_token_id=0,
                                                bos_token_id=1, eos_token_id=2, initializer_range=0.3), **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prompts, responses = _rows()
    assert not lm.full_attention_only(model.config) and not lm.supports_shared_prompts(model)
    with torch.no_grad():
        one_each, _, _ = lm.response_logprobs(model, prompts, responses, 0)
        used, _, _ = lm.shared_prompt_logprobs(model, prompts, responses, 0, share=True)
        packed, _, _ = lm.grouped_logprobs(model, prompts, responses, 0)
    torch.testing.assert_close(used, one_each, rtol=0, atol=0)
    assert float((packed - one_each).abs().max()) > 1e-3  # what packing would have computed instead


def test_full_attention_models_are_packed():
    from transformers import LlamaConfig, Qwen2Config

    assert lm.full_attention_only(LlamaConfig())
    assert lm.full_attention_only(Qwen2Config(sliding_window=4096, use_sliding_window=False))  # Qwen2.5's hub config
    assert not lm.full_attention_only(Qwen2Config(sliding_window=4096, use_sliding_window=True, max_window_layers=0))
