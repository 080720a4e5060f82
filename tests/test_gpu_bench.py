"""`make gpu-bench` on CPU at a tiny shape (the CUDA run is the same code at Qwen2.5 shapes),
and its arithmetic: parameter counts against the real models built on the meta device, the
model FLOPs of a step against a count by hand."""
import json

import pytest
import torch

from benchmarks import gpu_bench


@pytest.mark.parametrize("name, billions", [("qwen2.5-1.5b", 1.544), ("qwen2.5-7b", 7.616), ("tiny", None)])
def test_parameter_counts_match_the_models_transformers_builds(name, billions):
    from transformers import AutoModelForCausalLM

    cfg = gpu_bench.qwen2_config(gpu_bench.SHAPES[name])
    with torch.device("meta"):  # shapes only: no memory for 7B parameters
        model = AutoModelForCausalLM.from_config(cfg)
    counted = gpu_bench.count_params(cfg)
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    assert counted["trunk"] == sum(p.numel() for n, p in model.named_parameters()
                                   if "embed_tokens" not in n and "lm_head" not in n)
    if billions:
        assert counted["total"] / 1e9 == pytest.approx(billions, abs=0.001)  # the published sizes


def test_step_flops_by_hand():
    """One prompt of 4 tokens with two responses of 2 and 3: the trunk sees 4 + 5 tokens, the
    head 5, attention 4^2 + (2*4*2 + 2^2) + (2*4*3 + 3^2) token pairs."""
    cfg = gpu_bench.qwen2_config(gpu_bench.SHAPES["tiny"])
    rows = [{"prompt_id": "p", "prompt_token_ids": [5] * 4, "response_token_ids": [6] * n} for n in (2, 3)]
    trunk, d, L, V = gpu_bench.count_params(cfg)["trunk"], cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    fwd = 2 * trunk * 9 + 2 * d * V * 5 + 2 * L * d * (16 + 20 + 33)
    assert gpu_bench.step_flops(cfg, rows) == 3 * fwd


def test_gpu_bench_runs_on_cpu_at_a_tiny_shape(capsys):
    code = gpu_bench.main(["--device", "cpu", "--shapes", "tiny", "--prompts", "4", "--samples", "2",
                           "--prompt-len", "48", "--response-len", "24", "--micro-batch-tokens", "100", "--steps", "1",
                           "--gen-batch", "4", "--gen-tokens", "8"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # one JSON line
    assert code == 0 and out["ok"] and out["peak_bf16_flops"] is None
    shape = out["shapes"][0]
    learner, generation = shape["learner"], shape["generation"]
    # 4 groups of 2 x (48 + 24) = 144 tokens, each over the 100-token budget: a micro-batch each
    assert learner["tokens_per_step"] == 576 and learner["micro_batches"] == 4 and learner["loss_finite"]
    assert learner["tokens_per_s"] > 0 and learner["mfu"] is None  # no peak to compare with on a CPU
    assert generation["new_tokens"] > 0 and generation["tokens_per_s"] > 0


def test_a_shape_too_large_for_the_device_is_reported_not_stepped(monkeypatch):
    monkeypatch.setattr(gpu_bench, "_device_gib", lambda device: 80.0)
    why = gpu_bench.learner_fits(gpu_bench.qwen2_config(gpu_bench.SHAPES["qwen2.5-7b"]), "cuda")
    assert why.startswith("weights, gradients and AdamW state need 113 GiB") and "at least 3 GPUs" in why
    assert gpu_bench.learner_fits(gpu_bench.qwen2_config(gpu_bench.SHAPES["qwen2.5-1.5b"]), "cuda") is None


def test_an_unknown_shape_is_one_error_line(capsys):
    assert gpu_bench.main(["--device", "cpu", "--shapes", "qwen9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --shapes: unknown ['qwen9']")
