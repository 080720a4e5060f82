"""LoRA / PEFT policy training (model.lora): config errors before Ray; the learner trains the
adapters alone, its reference is the base model with the adapters off (no second copy); the
sync payload is the adapter alone and the HF and vLLM generators apply it to match the
learner's policy; checkpoints hold the adapter in PEFT's format and resume; 2 FSDP ranks; and
short runs of the real pipeline with the HF and the vLLM generator."""
import json

import numpy as np
import pytest
import torch
from test_learner import _batch

LORA = dict(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
RL = dict(lr=1e-2, samples_per_prompt=2, seed=3)
PROMPT, RESPONSE = [[1, 2, 3, 17], [1, 2, 3, 18]], [[4, 5, 6], [7, 8]]


def _rows():
    return _batch().to_pylist()


def _learner(model: str, lora=LORA, **rl):
    from rlaif_ray.rl.learner import PolicyLearner

    return PolicyLearner(model, {**RL, **rl}, 0.9, lora=lora)


def _state(learner) -> dict:
    return {n: p.detach().clone() for n, p in learner.policy.named_parameters()}


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("override, words", [
    ("model.lora.r=0", "model.lora.r"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=1", "model.lora.dropout"),
    ("model.lora.target_modules=[]", "model.lora.target_modules"),
])
def test_config_refuses_bad_lora_values_in_one_line(override, words):
    from rlaif_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.lora.r=8", override])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_config_defaults_and_sync_choice():
    from rlaif_ray.config import ConfigError, broadcasts_weights, load_config

    cfg = load_config(None, ["model.lora.r=8"])
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and cfg.model.lora.alpha == 32
    assert load_config(None, []).model.lora is None  # full fine-tuning by default
    assert load_config(None, ["model.lora.target_modules=all-linear"]).model.lora.target_modules == "all-linear"
    gpus = ["pipeline.learner.num_gpus=1", "pipeline.generators.num_gpus=1"]
    assert broadcasts_weights(load_config(None, gpus).pipeline)
    lora = load_config(None, gpus + ["model.lora.r=8"])
    assert not broadcasts_weights(lora.pipeline, lora.model.lora is not None)  # auto: the object store
    with pytest.raises(ConfigError, match="weight_sync=broadcast"):
        load_config(None, ["model.lora.r=8", "pipeline.weight_sync=broadcast"])


def test_preflight_refuses_an_unknown_target_module(tiny_model_path, capsys):
    from rlaif_ray.config import ConfigError, load_config
    from rlaif_ray.run.preflight import check_lora_targets

    cfg = load_config(None, [f"model.name={tiny_model_path}", "model.lora.r=4", "model.lora.target_modules=[q_proj,qkv]"])
    with pytest.raises(ConfigError) as e:
        check_lora_targets(cfg)
    assert "model.lora.target_modules" in str(e.value) and "qkv" in str(e.value) and "q_proj" in str(e.value)
    check_lora_targets(load_config(None, [f"model.name={tiny_model_path}", "model.lora.r=4"]))  # the defaults match


def test_cli_prints_one_error_line_before_ray(tiny_model_path, tmp_path):
    import subprocess
    import sys

    for override in ("model.lora.r=0", "model.lora.target_modules=[nope_proj]"):
        out = subprocess.run([sys.executable, "-m", "rlaif_ray.commands.cli", "train", "configs/quickstart.yaml",
                              "--set", f"model.name={tiny_model_path}", "--set", override, "--out",
                              str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
        errors = [ln for ln in out.stderr.splitlines() + out.stdout.splitlines() if ln.startswith("error:")]
        assert out.returncode != 0 and len(errors) == 1, (out.stdout[-500:], out.stderr[-1500:])
        assert "model.lora" in errors[0] and "ray" not in out.stderr.lower().split("error:")[0][-200:]


# ---- the learner ----------------------------------------------------------------------------


def test_reference_is_the_base_model_with_no_second_copy(tiny_model_path):
    from rlaif_ray.engines import lm
    from rlaif_ray.engines.models import load_model
    from rlaif_ray.rl import learner as learner_module

    reads, load = [], learner_module.load_model
    learner_module.load_model = lambda *a, **kw: (reads.append(a[0]), load(*a, **kw))[1]
    try:
        learner = _learner(tiny_model_path)  # reference=True: the learner computes log pi_ref
    finally:
        learner_module.load_model = load
    assert len(reads) == 1  # the policy only: the reference is the same weights with the adapters off
    assert isinstance(learner.ref, learner_module.BaseModelScorer)
    learner.step(_rows(), 10, 4)  # the adapters move off the identity
    base = load_model(tiny_model_path)
    with torch.no_grad():
        want, _, _ = lm.response_logprobs(base, PROMPT, RESPONSE, learner.pad, 0.9)
    ref = learner.logprobs(PROMPT, RESPONSE, reference=True)
    pol = learner.logprobs(PROMPT, RESPONSE)
    for r, w, p, n in zip(ref, want.tolist(), pol, (3, 2)):
        np.testing.assert_allclose(r, w[:n], atol=1e-5)
        assert np.abs(np.array(p) - np.array(w[:n])).max() > 1e-4  # the policy itself has moved
    assert all(p.requires_grad == adapters_only for n, p in learner.policy.named_parameters()
               for adapters_only in [".lora_" in n])  # the adapters train again after the reference's forward


def test_only_the_adapters_change_and_the_sync_payload_is_small(tiny_model_path):
    from rlaif_ray.engines import weight_sync

    learner = _learner(tiny_model_path)
    trainable = {n for n, p in learner.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {id(p) for g in learner.opt.param_groups for p in g["params"]} == \
        {id(p) for n, p in learner.policy.named_parameters() if n in trainable}
    before = _state(learner)
    for _ in range(2):
        learner.step(_rows(), 10, 4)
    after = _state(learner)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable and any("lora_B" in n for n in changed)

    payload = weight_sync.pack(learner.state_for_sync("float32"), "float32", adapter=True)
    assert payload["adapter"] and all(k.startswith("base_model.model.") and ".lora_" in k and ".default" not in k
                                      for k in payload["arrays"])
    sent = sum(a.nbytes for a in payload["arrays"].values())
    full = sum(p.numel() * 4 for p in learner.policy.parameters())
    # r=4 on q and v of 2 layers of hidden 32: 4 * (32 + 32) + 4 * (32 + 16) floats per layer
    assert sent == 2 * (4 * 64 + 4 * 48) * 4 and sent < 0.01 * full, (sent, full)
    assert learner.weight_spec("float32") == [(k, list(a.shape), "float32") for k, a in payload["arrays"].items()]


def test_hf_generator_after_sync_matches_the_learner(tiny_model_path):
    from rlaif_ray.engines import lm, weight_sync
    from rlaif_ray.engines.backends import load_engine

    learner = _learner(tiny_model_path)
    for _ in range(2):
        learner.step(_rows(), 10, 4)
    engine = load_engine("hf", tiny_model_path, dtype="float32", lora=LORA)
    base = [engine.continuation_logprobs(p, r) for p, r in zip(PROMPT, RESPONSE)]
    digest = engine.digest()
    engine.load_adapter(weight_sync.unpack(weight_sync.pack(learner.state_for_sync("float32"), "float32",
                                                            adapter=True)), 1)
    assert engine.digest() != digest
    with torch.no_grad():
        got, _, _ = lm.response_logprobs(engine.model, PROMPT, RESPONSE, engine.pad, 0.9)
    want = learner.logprobs(PROMPT, RESPONSE)
    for g, w, n in zip(got.tolist(), want, (3, 2)):
        np.testing.assert_allclose(g[:n], w, atol=1e-5)
    assert any(np.abs(np.array(engine.continuation_logprobs(p, r)) - np.array(b)).max() > 1e-4
               for p, r, b in zip(PROMPT, RESPONSE, base))
    with pytest.raises(ValueError, match="adapter update does not match"):
        engine.load_adapter({"base_model.model.x.lora_A.weight": torch.zeros(1)}, 2)


def test_checkpoint_holds_the_adapter_in_peft_format_and_resumes(tiny_model_path, tmp_path):
    from peft import PeftModel

    from rlaif_ray.engines import lm
    from rlaif_ray.engines.models import load_model

    learner = _learner(tiny_model_path, baseline="value")
    for _ in range(2):
        learner.step(_rows(), 10, 4)
    ckpt = tmp_path / "checkpoints" / "2"
    learner.save(ckpt, {"step": 2})
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert files == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.safetensors",
                     "trainer_state.json"}, files
    config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    # PEFT loads it onto the base model: the learner's policy
    merged = PeftModel.from_pretrained(load_model(tiny_model_path), str(ckpt / "adapter")).eval()
    with torch.no_grad():
        got, _, _ = lm.response_logprobs(merged, PROMPT, RESPONSE, learner.pad, 0.9)
    for g, w, n in zip(got.tolist(), learner.logprobs(PROMPT, RESPONSE), (3, 2)):
        np.testing.assert_allclose(g[:n], w, atol=1e-5)

    resumed = _learner(tiny_model_path, baseline="value")
    resumed.load(ckpt)
    assert resumed.steps == 2
    a, b = resumed.step(_rows(), 10, 4), learner.step(_rows(), 10, 4)
    assert a["loss_sum"] == pytest.approx(b["loss_sum"], abs=1e-6)
    for (k, x), (_, y) in zip(resumed.state_for_sync("float32"), learner.state_for_sync("float32")):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=k)
    with pytest.raises(RuntimeError, match="does not match the model"):  # another rank: refused whole
        _learner(tiny_model_path, lora=dict(LORA, r=8), baseline="value").load(ckpt)
