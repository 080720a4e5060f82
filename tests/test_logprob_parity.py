"""The learner evaluates exactly the distribution the generator sampled from, through the
model's own forward (issue 19, items 2 and 8).

- On-policy ratio exp(learner log-prob - behaviour log-prob) = 1 for every sampling setting
  the config accepts (temperature, top_k, top_p and their combinations), on the HF backend
  with tiny random models on the SmolLM2 tokenizer: a flat one, and a peaked one whose
  generation_config.json sets repetition_penalty and min_p (which must not apply); on the
  vLLM backend (slow) for top-k and top-p.
- Log-probs come from the model's own forward: on a tiny Gemma-2 with final logit
  soft-capping, learner, sampler and label scorer equal log_softmax of the model's logits.
"""
import numpy as np
import pytest
import torch

from rlaif_ray.engines import lm

# (temperature, top_k, top_p): every kind of setting generation.* accepts (T > 0, top_k >= 0
# with 0 = off, 0 < top_p <= 1), alone and combined; top_k 1 is greedy, 200 / 0.97 barely cut
SETTINGS = [(t, k, p) for t in (0.5, 1.0, 1.5) for k in (0, 1, 8) for p in (1.0, 0.7, 0.2)] + \
    [(1.0, 200, 1.0), (0.8, 200, 0.97), (1.2, 0, 0.97)]


def _tiny(path, tok, scale: float, config_cls=None, hub_sampling: dict | None = None, **config):
    """A random tiny causal LM on the SmolLM2 tokenizer, weights exactly representable in
    bfloat16 (so a bf16 engine holds the same weights). `scale` multiplies the output
    embeddings: logits of a trained LM's spread (a few units), not a random init's ~0.1.
    `hub_sampling`: sampling settings written to its generation_config.json."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    cfg = (config_cls or LlamaConfig)(**{
        **dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, tie_word_embeddings=True,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        **config})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, **(hub_sampling or {}))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


# what a hub model's generation_config.json may hold: processors the sampler must not apply
HUB_SAMPLING = dict(do_sample=True, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.3, min_p=0.05)


@pytest.fixture(scope="module")
def peaked_path(tmp_path_factory, tokenizer):
    """Logits spread like a trained LM's (an untied head: a most likely token around p 0.5, a
    70% nucleus of a few tokens, 8 tokens holding ~0.85); generation_config.json with
    repetition_penalty, min_p, top_k and top_p."""
    return _tiny(tmp_path_factory.mktemp("peaked") / "model", tokenizer, 35.0, hub_sampling=HUB_SAMPLING,
                 tie_word_embeddings=False)


@pytest.fixture(scope="module")
def gemma2_path(tmp_path_factory, tokenizer):
    """A tiny Gemma-2 whose final logits are soft-capped hard (cap 2 on logits of a few units)."""
    from transformers import Gemma2Config

    return _tiny(tmp_path_factory.mktemp("gemma2") / "model", tokenizer, 15.0, Gemma2Config,
                 final_logit_softcapping=2.0, attn_logit_softcapping=None, query_pre_attn_scalar=32,
                 sliding_window=64)


def _prompts(tok):
    texts = ["Hello there, friend", "A", "Summarize this post about a cat that", "The weather today"]
    return [tok(t)["input_ids"] for t in texts]


def _ratios(learner_logps, behaviour_logps) -> np.ndarray:
    assert [len(a) for a in learner_logps] == [len(b) for b in behaviour_logps]
    return np.exp(np.concatenate([np.subtract(a, b) for a, b in zip(learner_logps, behaviour_logps)]))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["flat", "peaked"])
def test_on_policy_ratio_is_one_for_every_sampling_setting_hf(model, tiny_model_path, peaked_path, tokenizer):
    """The generator's behaviour log-probs (HFEngine.generate, what the generator actor
    records) against the learner's (PolicyLearner.logprobs, what its step sees): ratio 1 to
    float tolerance per token, for every setting; on the peaked model the hub
    generation_config's repetition_penalty / min_p are not applied by the sampler."""
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.rl.learner import PolicyLearner

    path = tiny_model_path if model == "flat" else peaked_path
    engine = HFEngine(path)
    prompts = _prompts(tokenizer)
    worst = {}
    for i, (t, k, p) in enumerate(SETTINGS):
        tokens, behaviour, _ = engine.generate(prompts, temperature=t, top_p=p, top_k=k, max_new_tokens=16, seed=i)
        learner = PolicyLearner(path, {}, t, top_k=k, top_p=p)
        ratios = _ratios(learner.logprobs(prompts, tokens), behaviour)
        worst[(t, k, p)] = float(np.abs(ratios - 1).max())
        np.testing.assert_allclose(ratios, 1.0, atol=1e-4, err_msg=f"T={t} top_k={k} top_p={p}")
    if model == "peaked":  # the model's own generation config is left as it was
        assert engine.model.generation_config.repetition_penalty == 1.3
    print(f"{model}: max |ratio - 1| over {len(SETTINGS)} settings: {max(worst.values()):.2e}")


def test_sampling_support_is_the_rule_of_transformers_warpers():
    """The learner's top-k/top-p set equals what transformers' own warpers keep (temperature,
    then top-k, then top-p on the renormalised top-k distribution), ties and all."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=g) * 3
    logits[:8, 100:140] = logits[:8, 100:101]  # ties, at the boundary for some settings
    for t, k, p in SETTINGS:
        warpers = LogitsProcessorList([TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k else []) +
                                      ([TopPLogitsWarper(p)] if p < 1 else []))
        want = torch.isfinite(warpers(None, logits.clone()))
        got = lm.sampling_support(logits / t, k, p)
        assert torch.equal(got, want), (t, k, p)
        # and the log-probs of every kept token are the warped distribution's
        tokens = torch.multinomial(want.float(), 1, generator=g).squeeze(1)
        expect = warpers(None, logits.clone()).log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(lm.sampled_logprobs(logits, tokens, t, k, p), expect)


def test_a_token_at_the_boundary_keeps_its_probability():
    """A sampled token the learner's set would drop (its logits differ from the sampler's by
    rounding) is kept: a finite log-prob, never -inf (NaN gradients)."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]], requires_grad=True)
    logp = lm.sampled_logprobs(logits, torch.tensor([2]), 1.0, top_k=2)
    assert torch.isfinite(logp).all()
    logp.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_the_reference_evaluates_the_full_distribution_at_t(peaked_path, tokenizer):
    """The reference (the KL's other side) stays softmax(logits / T) over every token: cut to
    its own top-k it would give probability 0 to tokens the trained policy samples."""
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.rl.learner import PolicyLearner

    prompts = _prompts(tokenizer)
    tokens, _, _ = HFEngine(peaked_path).generate(prompts, temperature=0.8, top_p=0.7, top_k=8, max_new_tokens=12,
                                                  seed=0)
    learner = PolicyLearner(peaked_path, {}, 0.8, top_k=8, top_p=0.7)
    ref = learner.logprobs(prompts, tokens, reference=True)
    with torch.no_grad():
        plain, _, _ = lm.response_logprobs(learner.ref.model, prompts, tokens, tokenizer.pad_token_id, 0.8)
    for r, row, toks in zip(ref, plain, tokens):
        np.testing.assert_allclose(r, row[:len(toks)].numpy(), atol=1e-5)
    policy = learner.logprobs(prompts, tokens)
    assert all(a >= b - 1e-6 for pr, rr in zip(policy, ref) for a, b in zip(pr, rr))  # the cut renormalises up


def _own_logprobs(model, prompts, responses, pad, temperature):
    """log_softmax(model(ids).logits / T) at the response positions: the model's own forward."""
    ids, mask, rmask, P = lm.response_inputs(prompts, responses, pad, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=lm.positions(mask)).logits
    logp = (logits[:, P - 1:-1].float() / temperature).log_softmax(-1)
    return logp.gather(2, ids[:, P:, None]).squeeze(-1) * rmask


def test_logprobs_go_through_the_models_own_forward_gemma2_softcapping(gemma2_path, tokenizer):
    """Gemma-2's final logit soft-capping runs in the model's forward, after its LM head: the
    learner (policy and reference, with a value head), the sampler's behaviour log-probs and
    both label-scoring paths equal log_softmax of the model's own logits."""
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.engines.models import load_model
    from rlaif_ray.rl.learner import PolicyLearner

    pad = tokenizer.pad_token_id
    model = load_model(gemma2_path)
    assert model.config.final_logit_softcapping == 2.0
    prompts = _prompts(tokenizer)
    responses = [tokenizer(" a reply of some length")["input_ids"], [5, 6], tokenizer(" yes")["input_ids"], [7]]
    own = _own_logprobs(model, prompts, responses, pad, 0.9)

    # what bypassing the forward (trunk + lm_head) gives: far off, so the checks below bite
    ids, mask, rmask, P = lm.response_inputs(prompts, responses, pad, "cpu")
    with torch.no_grad():
        h = model.model(input_ids=ids, attention_mask=mask, position_ids=lm.positions(mask)).last_hidden_state
        bypass = (model.lm_head(h[:, P - 1:-1]) / 0.9).log_softmax(-1).gather(2, ids[:, P:, None]).squeeze(-1) * rmask
    assert (bypass - own).abs().max() > 0.5

    with torch.no_grad():
        got, _, _ = lm.response_logprobs(model, prompts, responses, pad, 0.9)
    torch.testing.assert_close(got, own, atol=1e-5, rtol=0)
    learner = PolicyLearner(gemma2_path, dict(baseline="value"), 0.9)
    for reference in (False, True):
        for row, want, r in zip(learner.logprobs(prompts, responses, reference=reference), own, responses):
            np.testing.assert_allclose(row, want[:len(r)].numpy(), atol=1e-5)

    # the sampler (HF generate runs the model's forward) agrees with the learner: ratio 1
    engine = HFEngine(gemma2_path)
    tokens, behaviour, _ = engine.generate(prompts, temperature=0.9, top_p=0.8, top_k=0, max_new_tokens=12, seed=0)
    learner = PolicyLearner(gemma2_path, {}, 0.9, top_p=0.8)
    np.testing.assert_allclose(_ratios(learner.logprobs(prompts, tokens), behaviour), 1.0, atol=1e-4)

    # label scoring (prefix-shared and padded paths) and the plain next-token reference
    seqs = [prompts[2] + [11, 12, 13], prompts[2] + [11, 12, 14, 15], prompts[0], prompts[3] + [9]]
    pick = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" Yes", " No", "1", "2")]
    with torch.no_grad():
        full = [model(input_ids=torch.tensor([s], device="cpu")).logits[0, -2:].float().log_softmax(-1)[:, pick]
                for s in seqs]
    want = torch.stack(full)
    for sharing in ("on", "off"):
        got = HFEngine(model, tokenizer, prefix_sharing=sharing).label_logprobs(seqs, pick, lookback=2)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    nxt = lm.next_token_logprobs(model, seqs, pad, lookback=2)[..., pick]
    torch.testing.assert_close(nxt, want, atol=1e-5, rtol=0)


def test_hub_generation_config_adds_no_processor_to_the_completions_endpoint(peaked_path, tokenizer):
    """The completions endpoint's HF path: top_k 0 is off (not transformers' default 50) and
    the hub's repetition_penalty / min_p do not apply: a greedy decode is the argmax of the
    model's own logits at every step."""
    from rlaif_ray.engines.hf import HFEngine

    engine = HFEngine(peaked_path)
    prompt = _prompts(tokenizer)[2]
    out = engine.complete([prompt], 10, 0.0, 0, 0)[0]
    seq = list(prompt)
    with torch.no_grad():
        for t in out:
            assert t == int(engine.model(input_ids=torch.tensor([seq], device="cpu")).logits[0, -1].argmax())
            seq.append(t)


# ---- vLLM (the CPU build here): one engine, several settings ------------------------------

# the engine (bf16 where the CPU computes bf16 fast, else fp32: rlaif_ray.engines.devices.vllm_dtype)
# against the fp32 learner, the same weights: rounding of the activations. Bounds of bf16 size
# (top_k 1 is left out here: logits tied in bf16 are two top-1 tokens to the engine, one to
# the fp32 learner, a ratio of 2 on those tokens that only the precision gap causes)
VLLM_TOL = {"mean": 0.02, "mean_abs": 0.04, "ratio": 0.02}
VLLM_SETTINGS = [(1.0, 0, 1.0), (1.0, 8, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.7), (1.3, 0, 0.85), (1.0, 20, 0.8),
                 (0.8, 200, 0.5)]


@pytest.mark.slow
def test_on_policy_ratio_is_one_with_vllm_generators(ray_local, peaked_path, tokenizer):
    """vLLM's behaviour log-probs (processed: after temperature, top-k, top-p) against the
    learner's, on the peaked model (its hub generation_config not applied either). The engine
    runs in bfloat16 or float32 (vllm_dtype; the weights are the same, bf16-representable), the
    learner in float32: the per-token gap is rounding, far below what the truncation used to cost."""
    import ray

    from rlaif_ray.engines.vllm_engine import VLLMEngine
    from rlaif_ray.rl.learner import PolicyLearner

    engine = ray.remote(VLLMEngine).options(num_cpus=1).remote(peaked_path, kv_cache_gib=0.25)
    try:
        prompts = _prompts(tokenizer)
        stats = {}
        for i, (t, k, p) in enumerate(VLLM_SETTINGS):
            tokens, behaviour, _ = ray.get(engine.generate.remote(prompts, temperature=t, top_p=p, top_k=k,
                                                                  max_new_tokens=24, seed=i))
            learner = PolicyLearner(peaked_path, {}, t, top_k=k, top_p=p)
            now = np.log(_ratios(learner.logprobs(prompts, tokens), behaviour))
            with torch.no_grad():  # what the old learner evaluated: plain softmax(logits / T)
                plain, _, _ = lm.response_logprobs(learner.policy.model, prompts, tokens, tokenizer.pad_token_id, t)
            old = np.log(_ratios([r[:len(x)].tolist() for r, x in zip(plain, tokens)], behaviour))
            stats[(t, k, p)] = {key: round(float(v), 4) for key, v in dict(
                ratio=np.exp(now).mean(), old_ratio=np.exp(old).mean(), mean=now.mean(), old_mean=old.mean(),
                mean_abs=np.abs(now).mean(), max_abs=np.abs(now).max(), tokens=len(now)).items()}
        for key, st in stats.items():
            print("vLLM", key, st)
        for (t, k, p), st in stats.items():
            # no systematic gap left (the rounding is symmetric), a per-token spread of bf16 size
            assert abs(st["mean"]) < VLLM_TOL["mean"] and st["mean_abs"] < VLLM_TOL["mean_abs"], (t, k, p, st)
            assert abs(st["ratio"] - 1) < VLLM_TOL["ratio"], (t, k, p, st)
            if (k, p) != (0, 1.0):  # the truncation was a systematic gap, far above the rounding
                assert st["old_mean"] < -4 * VLLM_TOL["mean"], (t, k, p, st)
        # the rule itself: vLLM's own top-k/top-p function keeps the tokens the learner keeps
        # (up to which of several tied logits at the top-p boundary: vLLM sorts the unmasked
        # logits, transformers the masked ones; the kept distributions are the same)
        logits = torch.randn(32, 700, generator=torch.Generator().manual_seed(1), device="cpu") * 3
        logits[:4, 100:140] = logits[:4, 100:101]  # ties
        settings = VLLM_SETTINGS + SETTINGS

        def vllm_support(logits, settings):  # in a Ray worker: vLLM is not imported in this process
            from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

            n, out = logits.shape[0], []
            for t, k, p in settings:
                kk = torch.full((n,), k, dtype=torch.long, device="cpu") if k else None
                pp = torch.full((n,), p, dtype=torch.float32, device="cpu") if p < 1 else None
                out.append(torch.isfinite(apply_top_k_top_p(logits / t, kk, pp)))
            return out

        wants = ray.get(ray.remote(num_cpus=0.5)(vllm_support).remote(logits, settings))
        for (t, k, p), want in zip(settings, wants):
            got = lm.sampling_support(logits / t, k, p)
            assert torch.equal(got.sum(-1), want.sum(-1)), (t, k, p)
            for z, g, w in zip(logits, got, want):
                assert torch.equal(z[g].sort().values, z[w].sort().values), (t, k, p)
            assert torch.equal(got[4:], want[4:]), (t, k, p)  # the rows without ties: the same tokens
    finally:
        ray.kill(engine)



@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dropout_is_off_in_the_learner(family, tmp_path, tokenizer):
    """A model with dropout 0.1 (GPT-2: nn.Dropout modules and attention dropout; Llama: the
    attention dropout of its config): the learner's log-probs (in train mode, for gradient
    checkpointing) equal the generator's (eval mode), so the on-policy ratio is 1."""
    from transformers import GPT2Config

    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.rl.learner import PolicyLearner

    if family == "gpt2":
        path = _tiny(tmp_path / "m", tokenizer, 1.0, GPT2Config, n_embd=64, n_layer=2, n_head=2, n_positions=2048,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    else:
        path = _tiny(tmp_path / "m", tokenizer, 1.0, attention_dropout=0.1)
    prompts = _prompts(tokenizer)
    tokens, behaviour, _ = HFEngine(path).generate(prompts, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12,
                                                   seed=0)
    learner = PolicyLearner(path, {"gradient_checkpointing": True}, 1.0)
    assert learner.policy.training  # train mode, as a step runs
    np.testing.assert_allclose(_ratios(learner.logprobs(prompts, tokens), behaviour), 1.0, atol=1e-4)
