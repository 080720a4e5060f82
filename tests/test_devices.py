"""Device discipline, checked on CPU: every tensor the project builds during a learner step,
generation, label scoring and SFT/RM losses names its device (rlaif_ray.engines.devices.DeviceGuard;
its docstring says what this can and cannot catch). `make gpu-check` runs the same on CUDA."""
import importlib.util
from pathlib import Path

import pytest
import torch
from test_learner import _batch


def test_the_guard_flags_a_tensor_built_without_a_device(tmp_path):
    from rlaif_ray.engines.devices import DeviceGuard

    (tmp_path / "rlaif_ray").mkdir()
    src = tmp_path / "rlaif_ray" / "bad.py"
    src.write_text("import torch\n\ndef build(x):\n    return torch.zeros(2), torch.zeros(2, device=x.device), "
                   "torch.as_tensor(x)\n")
    spec = importlib.util.spec_from_file_location("bad", src)
    bad = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bad)
    with DeviceGuard() as guard:
        bad.build(torch.ones(1))
    assert len(guard.violations) == 1 and "bad.py:4: torch.zeros without device=" in guard.violations[0]


@pytest.mark.parametrize("baseline", ["group_mean", "value"])
def test_learner_step_builds_every_tensor_on_its_device(tiny_model_path, baseline):
    from rlaif_ray.engines.devices import DeviceGuard
    from rlaif_ray.rl.learner import PolicyLearner

    learner = PolicyLearner(tiny_model_path, dict(baseline=baseline, samples_per_prompt=2), 0.9)
    with DeviceGuard() as guard:
        learner.step(_batch().to_pylist(), 10, 4)
        learner.logprobs([[1, 2, 3]], [[4, 5]])
        list(learner.state_for_sync("bfloat16"))
    assert guard.violations == []


def test_engines_judge_and_supervised_losses_build_every_tensor_on_their_device(tiny_model_path):
    from rlaif_ray.config import PairwiseConfig
    from rlaif_ray.engines.devices import DeviceGuard
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.feedback.labeling import Judge
    from rlaif_ray.rl import supervised as rm

    with DeviceGuard() as guard:
        for sharing in ("on", "off"):
            eng = HFEngine(tiny_model_path, prefix_sharing=sharing)
            eng.generate([[1, 2, 3], [4, 5]], temperature=0.9, top_p=1.0, top_k=0, max_new_tokens=4, seed=0)
            judge = Judge.of_model(eng, eng.tok, "yesno_about_chat")
            judge.score(["a post about cats", "a post about dogs"], ["cats", "dogs"])
            judge.score(["a post about cats"], ["cats"], scorer="score10_chat")
            judge.prefer(["a long post " * 12, "another long post " * 12], ["a", "b"], ["c", "d"], PairwiseConfig())
        eng.complete([[1, 2, 3]], 3, 0.0, 0, 0)
        eng.sample_with_logprobs([[1, 2, 3]], 3, 0.0, 1.0, 0, 2, 0)
        eng.continuation_logprobs([1, 2], [3, 4])
        rm.sft_loss_sum(eng.model, [rm.sft_example([1, 2], [3, 4], 5)], 0)
        rm.pad_right([[1, 2], [3]], 0)
    assert guard.violations == []


def test_vllm_dtype_is_bf16_only_where_the_cpu_computes_it_fast():
    from rlaif_ray.engines.devices import vllm_dtype

    avx2 = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
    assert vllm_dtype("auto", "cpu", avx2) == "float32"  # bf16 emulated: 3.1x slower here (BENCHMARKS.md)
    assert vllm_dtype("float32", "cpu", avx2) == "float32"
    assert vllm_dtype("bfloat16", "cpu", avx2) == "bfloat16"  # asked for: honoured
    for fast in ({**avx2, "avx512_f": True}, {**avx2, "avx512_f": True, "avx512_bf16": True}, {**avx2, "amx_bf16": True},
                 {"architecture": "aarch64", "bf16": True}):
        assert vllm_dtype("auto", "cpu", fast) == "bfloat16"
    assert vllm_dtype("auto", "cpu", {"architecture": "aarch64"}) == "float32"
    assert vllm_dtype("auto", "cpu", {}) == "float32"  # torch cannot say: no claim of fast bf16
    assert vllm_dtype("float32", "cuda", avx2) == vllm_dtype("auto", "cuda", {}) == "bfloat16"
    with pytest.raises(ValueError, match="model.dtype"):
        vllm_dtype("fp16", "cpu", avx2)
    # a pool's vllm.dtype overrides the rule, either way, on any device
    assert vllm_dtype("auto", "cpu", avx2, choice="bfloat16") == "bfloat16"
    assert vllm_dtype("auto", "cpu", {**avx2, "avx512_bf16": True}, choice="float32") == "float32"
    assert vllm_dtype("float32", "cuda", {}, choice="float32") == "float32"
    with pytest.raises(ValueError, match="vllm.dtype"):
        vllm_dtype("auto", "cpu", avx2, choice="float16")


def test_a_pools_vllm_dtype_is_validated():
    from rlaif_ray.config import ConfigError, load_config

    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart-vllm.yaml"
    cfg = load_config(config, ["pipeline.generators.vllm.dtype=float32"])
    assert cfg.pipeline.generators.vllm.dtype == "float32" and cfg.pipeline.labelers.vllm.dtype == "auto"
    with pytest.raises(ConfigError, match=r"pipeline\.generators\.vllm\.dtype"):
        load_config(config, ["pipeline.generators.vllm.dtype=fp8"])


def test_vllm_kv_cache_is_sized_to_a_steps_rollouts(tiny_model_path):
    from actors.pipeline import generator_engine
    from rlaif_ray.config import Config, VLLMConfig
    from rlaif_ray.engines.vllm_engine import kv_cache_bytes, kv_token_bytes

    # SmolLM2-135M: 30 layers x K,V x 3 KV heads x 64 dims (vLLM's log: 0.5 GiB holds 11,648 fp32 tokens)
    assert kv_token_bytes("smollm2-135m-instruct", "float32") == 30 * 2 * 3 * 64 * 4
    assert kv_token_bytes("smollm2-135m-instruct", "bfloat16") == 30 * 2 * 3 * 64 * 2
    assert kv_token_bytes(tiny_model_path, "float32") == 2 * 2 * 1 * 16 * 4
    assert kv_cache_bytes(0.5, 1000, 448, 8) == 2**29  # a number is taken as it is
    assert kv_cache_bytes("auto", 1000, 448, 0) == 2**30  # no count (labelers, the endpoint): 1 GiB
    assert kv_cache_bytes("auto", 1000, 448, 8) == int(1000 * 448 * 8 * 1.1)
    cfg = Config.model_validate({"task": {"max_prompt_tokens": 400}, "generation": {"max_new_tokens": 48},
                                 "rl": {"prompts_per_step": 4, "samples_per_prompt": 2}})
    v = generator_engine(cfg)
    assert (v["max_model_len"], v["kv_sequences"], v["kv_cache_gib"]) == (448, 8, "auto")
    cfg.pipeline.generators.vllm.max_model_len = 4096  # set: kept
    assert generator_engine(cfg)["max_model_len"] == 4096
    with pytest.raises(ValueError, match="auto or a number"):
        VLLMConfig(kv_cache_gib=0)
