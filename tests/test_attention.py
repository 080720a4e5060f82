"""rlaif_ray/cpu/attention.py: grouped-query attention without copying KV heads on CPU computes
what transformers' own SDPA path computes (forward to the bit, gradients to float rounding),
and load_model picks it only where it applies."""
import pytest
import torch

from rlaif_ray.cpu import attention
from rlaif_ray.engines import lm


def _prompts(seed: int = 0, lengths=(9, 4, 13, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 5000, (n,), generator=g).tolist() for n in lengths]


def test_cpu_actors_switch_to_it_for_grouped_heads_and_the_learner_does_not(tiny_model_path):
    """A CPU generator or labeler switches at its start-up (actors/process.py); load_model, which
    the learner uses (0.94x with it), keeps transformers' SDPA."""
    from actors.process import ActorProcess
    from rlaif_ray.engines.models import load_model

    plain = load_model(tiny_model_path)
    assert plain.config.num_key_value_heads < plain.config.num_attention_heads  # the tiny model has GQA
    assert plain.config._attn_implementation == "sdpa"
    tiny_model = ActorProcess("generator", "g", torch.get_num_threads(), "cpu").tune(load_model(tiny_model_path))
    assert tiny_model.config._attn_implementation == attention.NAME
    assert ActorProcess("generator", "g", torch.get_num_threads(), "cuda").tune(plain) is plain and plain.config._attn_implementation == "sdpa"
    assert lm.is_sdpa(tiny_model) and lm.supports_shared_prompts(tiny_model)
    # the block mask stays boolean, as SDPA takes it
    allowed = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    assert lm.attention_mask_4d(tiny_model, allowed, torch.float32).dtype == torch.bool
    # a checkpoint written from it names no attention implementation: any loader reads it
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        load_model(tiny_model_path).save_pretrained(d)
        assert not any("attn" in k for k in json.loads((Path(d) / "config.json").read_text()))


def test_models_without_grouped_heads_or_sdpa_keep_their_attention(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    mha = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    assert attention.use_cpu_gqa(mha).config._attn_implementation == "sdpa"
    cfg.num_key_value_heads = 1
    eager = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    assert attention.use_cpu_gqa(eager).config._attn_implementation == "eager"


def _both(tiny_model_path):
    from transformers import AutoModelForCausalLM

    attention.register()
    return [AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=a).eval()
            for a in ("sdpa", attention.NAME)]


def test_left_padded_forward_identical_and_gradients_close(tiny_model_path):
    """The masked case transformers copies KV heads for: a left-padded batch."""
    plain, gqa = _both(tiny_model_path)
    ids, mask, pos = lm.left_pad(_prompts(), 0)
    out = []
    for m in (plain, gqa):
        m.zero_grad()
        logits = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        (logits.float().log_softmax(-1)[..., :50] * mask[..., None]).sum().backward()
        out.append((logits.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    (a, ga), (b, gb) = out
    assert torch.equal(a, b)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("share_prompts", [True, False])
def test_sampling_identical(tiny_model_path, share_prompts):
    """The generator's path (lm.sample: the KV cache grows one token a step, a left-padded mask):
    the same tokens and behaviour log-probs with either attention."""
    plain, gqa = _both(tiny_model_path)
    prompts = [p for p in _prompts(1) for _ in range(3)]
    runs = [lm.sample(m, prompts, 0, 2, temperature=0.9, top_p=1.0, top_k=0, max_new_tokens=12, seed=7,
                      share_prompts=share_prompts) for m in (plain, gqa)]
    assert runs[0][0] == runs[1][0] and runs[0][2] == runs[1][2]
    assert runs[0][1] == runs[1][1]
