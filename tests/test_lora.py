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


# ---- FSDP: 2 gloo ranks ---------------------------------------------------------------------


def _fsdp_rank(rank: int, world: int, port: int, model: str, out: str) -> None:
    import datetime
    from pathlib import Path

    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    learner = _learner(model, baseline="value")  # reference=True: the base through the sharded policy
    assert learner.sharded and type(next(learner.policy.parameters())).__name__ == "DTensor"
    rows = _rows()
    shards = [[r for r in rows if r["prompt_id"] == p] for p in ("p0", "p1")]
    stats = [learner.step(shards[rank], 10, 4) for _ in range(2)]
    weights = {k: v.numpy().copy() for k, v in learner.state_for_sync("float32")}  # a gather on every rank
    ref = learner.logprobs(PROMPT, RESPONSE, reference=True)
    learner.save(Path(out) / "ckpt", {"step": 2})
    if rank == 0:
        np.savez(Path(out) / "weights.npz", **weights)
        Path(out, "ref.json").write_text(json.dumps(ref))
    Path(out, f"stats{rank}.json").write_text(json.dumps(stats))
    dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes
def test_two_fsdp_ranks_match_one_rank_and_resume_on_one(tiny_model_path, tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from rlaif_ray.engines import lm
    from rlaif_ray.engines.models import load_model

    server = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    mp.start_processes(_fsdp_rank, args=(2, server.port, tiny_model_path, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    sharded = [json.loads((tmp_path / f"stats{r}.json").read_text()) for r in range(2)]
    one = _learner(tiny_model_path, baseline="value")
    single = [one.step(_rows(), 10, 4) for _ in range(2)]
    for step in range(2):
        assert sum(s[step]["loss_sum"] for s in sharded) == pytest.approx(single[step]["loss_sum"], abs=1e-5)
        assert sharded[0][step]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-4)
    got = dict(np.load(tmp_path / "weights.npz"))
    want = {k: v.numpy() for k, v in one.state_for_sync("float32")}
    assert got.keys() == want.keys() and all(".lora_" in k for k in got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)
    with torch.no_grad():  # the sharded reference: the base model
        base, _, _ = lm.response_logprobs(load_model(tiny_model_path), PROMPT, RESPONSE, one.pad, 0.9)
    for r, b, n in zip(json.loads((tmp_path / "ref.json").read_text()), base.tolist(), (3, 2)):
        np.testing.assert_allclose(r, b[:n], atol=1e-5)
    ckpt = tmp_path / "ckpt"  # the adapter gathered to rank 0, in PEFT's format; no DCP shards, no base weights
    assert {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.safetensors",
        "trainer_state.json"}
    resumed = _learner(tiny_model_path, baseline="value")
    resumed.load(ckpt)
    a, b = resumed.step(_rows(), 10, 4), one.step(_rows(), 10, 4)
    assert a["loss_sum"] == pytest.approx(b["loss_sum"], abs=1e-5)


# ---- vLLM: the adapter as a LoRARequest -----------------------------------------------------


@pytest.mark.slow  # a vLLM engine on the bundled model
def test_vllm_engine_loads_each_version_as_an_adapter_and_matches_the_learner(tokenizer):
    from rlaif_ray.engines import weight_sync
    from rlaif_ray.engines.vllm_engine import VLLMEngine

    name, lora = "smollm2-135m-instruct", dict(LORA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    learner = _learner(name, lora=lora)
    learner.temperature = 1.0  # continuation_logprobs is at T = 1
    engine = VLLMEngine(name, dtype="float32", device="cpu", max_model_len=128, kv_sequences=4,
                        weight_dtype="float32", lora=lora)
    prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    cont = tokenizer(" Paris, and the capital of Italy is Rome.", add_special_tokens=False)["input_ids"]
    base = np.array(engine.continuation_logprobs(prompt, cont))
    np.testing.assert_allclose(base, learner.logprobs([prompt], [cont])[0], atol=2e-3)  # B = 0: the base model
    folders = []
    for version in (1, 2):
        with torch.no_grad():  # as if trained: every adapter tensor moves
            for _, p in learner.named_weights():
                p.add_(torch.randn_like(p) * 0.05)
        engine.load_adapter(weight_sync.unpack(weight_sync.pack(learner.state_for_sync("float32"), "float32",
                                                                adapter=True)), version)
        folders.append(engine._adapter[1])
        got = np.array(engine.continuation_logprobs(prompt, cont))
        np.testing.assert_allclose(got, learner.logprobs([prompt], [cont])[0], atol=2e-3)
        assert np.abs(got - base).max() > 1e-2
        assert engine.llm.llm_engine.list_loras() == {engine._adapter[0].lora_int_id}  # the old one dropped
    import os

    assert not os.path.exists(folders[0]) and os.path.isfile(os.path.join(folders[1], "adapter_model.safetensors"))
    tokens, logps, _ = engine.generate([prompt, prompt], temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6, seed=1)
    want = learner.logprobs([prompt, prompt], tokens)
    for lp, w in zip(logps, want):
        np.testing.assert_allclose(lp, w, atol=2e-3)  # behaviour log-probs under the adapter: ratio 1
    engine.close_adapter()
    assert not os.path.exists(folders[1])


# ---- the real pipeline, 2 steps ---------------------------------------------------------------


def _assert_lora_run(run, steps: int = 2) -> dict:
    from rlaif_ray.run.folder import read_metrics

    metrics = read_metrics(run)
    assert [m["policy_version"] for m in metrics] == list(range(1, steps + 1))
    ckpt = run / "checkpoints" / f"step_{steps:06d}"
    assert (ckpt / "adapter" / "adapter_config.json").is_file() and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()  # no full-weights copy under LoRA
    return {"metrics": metrics, "summary": json.loads((run / "summary.json").read_text())}


@pytest.mark.slow
def test_two_step_run_with_lora_and_the_hf_generator(ray_local, tiny_model_path, tmp_path):
    """On-policy (staleness 0): the generator samples from exactly the learner's policy (base
    plus adapter), so the importance ratio is 1; the learner's reference is its own base."""
    from test_pipeline import tiny_cfg

    from rlaif_ray.commands.train import train

    cfg = tiny_cfg(tiny_model_path, tmp_path, model={"lora": LORA},
                   rl={"max_staleness": 0, "steps": 2, "lr": 1e-2, "reference": "learner"},
                   eval={"num_prompts": 2, "signal_posts": 0, "win_rate": False})
    run = train(cfg, tmp_path / "run", log=lambda *_: None)
    out = _assert_lora_run(run)
    assert all(abs(m["ratio_mean"] - 1) < 1e-3 for m in out["metrics"])
    assert out["metrics"][1]["kl"] != 0  # step 2's policy is off the base (the reference)
    assert "heldout_after" in out["summary"]

    # the run's adapter leaves as merged HF weights: the same logits as base + adapter in PEFT
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlaif_ray.commands.cli import main

    assert main(["export", str(run), "--to", str(tmp_path / "exported")]) == 0
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        base_logits = base(ids).logits
        peft = PeftModel.from_pretrained(base, run / "checkpoints" / "step_000002" / "adapter")
        torch.testing.assert_close(merged(ids).logits, peft(ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(merged(ids).logits, base_logits, atol=1e-4)


@pytest.mark.slow  # a vLLM engine in its own process
def test_two_step_run_with_lora_and_the_vllm_generator(ray_local, tmp_path):
    from pathlib import Path

    from rlaif_ray.commands.train import train
    from rlaif_ray.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "quickstart-vllm.yaml", [
        "rl.steps=2", "rl.prompts_per_step=2", "rl.samples_per_prompt=2", "generation.max_new_tokens=12",
        "eval.num_prompts=0", "eval.signal_posts=0", "pipeline.learner.num_cpus=0.5", "rl.max_staleness=0",
        f"run.out_dir={tmp_path}", "pipeline.generators.vllm.engine_process=true", "pipeline.generators.vllm.dtype=float32",
        "model.lora.r=4", "rl.lr=1e-2"])
    out = _assert_lora_run(train(cfg, tmp_path / "run", log=lambda *_: None))
    assert all(abs(m["ratio_mean"] - 1) < 1e-2 for m in out["metrics"])  # vLLM + adapter sampled the learner's policy


def test_eval_and_the_chain_say_a_lora_checkpoint_needs_an_export(tiny_model_path, tmp_path):
    from rlaif_ray.config import ConfigError, load_config
    from rlaif_ray.run.preflight import _policy, preflight

    ckpt = tmp_path / "step_000002"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text("{}")
    cfg = load_config(None, [f"model.name={tiny_model_path}", "model.lora.r=4"])
    with pytest.raises(ConfigError, match="rlaif-ray export"):
        _policy(str(ckpt), cfg)
    with pytest.raises(ConfigError, match="rlaif-ray export"):
        preflight(cfg, "run", tmp_path / "chain")


@pytest.mark.slow
def test_a_lora_run_resumes_from_its_adapter_checkpoint_like_an_uninterrupted_one(ray_local, tiny_model_path, tmp_path):
    """A 4-step LoRA run, and a copy of it set back to its step-2 checkpoint (as a driver dead
    after step 3 leaves it) resumed: steps 3 and 4 train again from the adapter and its AdamW
    state and give the uninterrupted run's numbers (on-policy, same seeds)."""
    import shutil

    from test_pipeline import tiny_cfg

    from rlaif_ray.commands.train import train
    from rlaif_ray.run.folder import read_metrics

    cfg = tiny_cfg(tiny_model_path, tmp_path, model={"lora": LORA},
                   rl={"max_staleness": 0, "steps": 4, "lr": 1e-2, "reference": "learner"},
                   eval={"num_prompts": 0, "signal_posts": 0}, run={"checkpoint_every": 2})
    full = train(cfg, tmp_path / "full", log=lambda *_: None)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000004")
    (cut / "checkpoints" / "latest").write_text("step_000002\n")
    resumed = train(cfg, log=lambda *_: None, resume=cut)
    a, b = read_metrics(full), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a[2:], b[2:]):
        for key in ("reward_mean", "loss", "kl", "response_len"):
            assert mb[key] == pytest.approx(ma[key], abs=1e-4), (ma["step"], key)
    _assert_lora_run(resumed, steps=4)
