"""`make gpu-bench`: the learner step and HF generation at real model shapes on a bare CUDA
machine (torch and transformers only: no downloaded weights, no Ray, no vLLM). Each shape is
a random-weight model built from the model's published config (a few numbers, below); prints
one JSON line. `--device cpu --shapes tiny` runs the same code at a tiny shape (the suite does).

    python -m benchmarks.gpu_bench --device cuda --shapes qwen2.5-1.5b,qwen2.5-7b

Learner: `PolicyLearner.step` as a run calls it (fp32 master weights, bf16 compute on CUDA,
gradient checkpointing, each prompt's samples packed into one sequence, micro-batches of
`--micro-batch-tokens`, fused AdamW), the reference log-probs in the batch as the labelers
send them. Reported: tokens/s (prompt + response tokens of the batch), the model FLOPs
utilisation (6 x non-embedding parameters per token through the trunk, the LM head at the
response positions only, causal attention; recomputation not counted) against the GPU's
dense bf16 peak, and the allocator's peak. A shape whose weights, gradients and AdamW state
(16 bytes per parameter) do not fit the device is not stepped: the record says how many GPUs
FSDP needs for it. Generation: `lm.sample` (the HF generator's path) on the bf16 model.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

import torch

from rlaif_ray.run.gpu_memory import KNOWN_SHAPES

# the published configs' shapes (Qwen/Qwen2.5-1.5B and -7B config.json: the project's plan keeps them)
SHAPES = {
    "qwen2.5-1.5b": KNOWN_SHAPES["Qwen/Qwen2.5-1.5B-Instruct"],
    "qwen2.5-7b": KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"],
    # the suite's CPU run: the same code, a shape that steps in seconds
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
}
# dense bf16 peak FLOP/s by device name (NVIDIA data sheets; SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
ADAM_BYTES = 16  # per parameter: fp32 weight, fp32 gradient, two fp32 AdamW moments


def qwen2_config(shape: dict):
    from transformers import Qwen2Config

    return Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def count_params(cfg) -> dict:
    """Parameters of a Qwen2 decoder: the trunk (attention with q/k/v biases, the MLP, norms)
    and the embedding and LM head."""
    d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = d // cfg.num_attention_heads * cfg.num_key_value_heads
    layer = d * d + d + 2 * (d * kv + kv) + d * d + 3 * d * f + 2 * d
    embed = V * d * (1 if cfg.tie_word_embeddings else 2)
    return {"trunk": L * layer + d, "embedding": embed, "total": L * layer + d + embed}


def step_flops(cfg, rows: list[dict]) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) on `rows`, each
    prompt once for its samples (packed): 2 x trunk parameters per token, 2 x d x V per
    response token at the LM head, causal attention 2 x d x S^2 per layer per sequence."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], [len(r["prompt_token_ids"]), []])[1].append(len(r["response_token_ids"]))
    trunk = count_params(cfg)["trunk"]
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    fwd = 0.0
    for prompt, responses in groups.values():
        tokens = prompt + sum(responses)
        fwd += 2 * trunk * tokens + 2 * d * V * sum(responses)
        fwd += 2 * L * d * (prompt ** 2 + sum(2 * prompt * r + r ** 2 for r in responses))
    return 3 * fwd


def random_rows(cfg, prompts: int, samples: int, prompt_len: int, response_len: int, seed: int = 0) -> list[dict]:
    """A scored batch of random tokens in the SCORED fields the learner reads (behaviour and
    reference log-probs included, as the generators and labelers send them)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()

    rows = []
    for p in range(prompts):
        prompt = ids(prompt_len)
        for k in range(samples):
            rows.append({"prompt_id": f"p{p}", "rollout_id": f"b0:p{p}:{k}", "batch_index": 0,
                         "prompt_token_ids": prompt, "response_token_ids": ids(response_len),
                         "behaviour_logprobs": [-2.0] * response_len, "reference_logprobs": [-2.0] * response_len,
                         "reward": float(k % 2) - 0.5, "reward_ok": True})
    return rows


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _device_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
    import psutil

    return psutil.virtual_memory().total / 2**30


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def learner_fits(cfg, device: str) -> str | None:
    """None when the shape's weights, gradients and AdamW state fit one device, else why not."""
    params = count_params(cfg)
    need, have = params["total"] * ADAM_BYTES / 2**30, _device_gib(device)
    if need <= 0.9 * have:
        return None
    return (f"weights, gradients and AdamW state need {need:.0f} GiB ({ADAM_BYTES} bytes x "
            f"{params['total'] / 1e9:.2f}B parameters) against {have:.0f} GiB: shard it over at least "
            f"{math.ceil(need / (0.6 * have))} GPUs (FSDP, pipeline.learner.num_actors)")


def bench_learner(cfg, folder: str, args) -> dict:
    """`args.steps` PolicyLearner steps after one warm-up step: tokens/s, MFU, peak memory."""
    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner, loss_normalisers

    rl = RLConfig(samples_per_prompt=args.samples, gradient_checkpointing=True, reference="labeler",
                  micro_batch_tokens=args.micro_batch_tokens)
    learner = PolicyLearner(folder, rl, 1.0, device=args.device, reference=False)
    rows = random_rows(cfg, args.prompts, args.samples, args.prompt_len, args.response_len)
    counts = loss_normalisers([r["response_token_ids"] for r in rows], [True] * len(rows))
    stats = learner.step(rows, *counts)  # warm-up: allocator, kernels, AdamW state
    _reset_peak(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        stats = learner.step(rows, *counts)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = sum(len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in rows)
    peak, flops = peak_flops(args.device), step_flops(cfg, rows)
    return {"step_s": round(dt, 3), "tokens_per_step": tokens, "tokens_per_s": round(tokens / dt, 1),
            "model_tflops_per_s": round(flops / dt / 1e12, 3),
            "mfu": round(flops / dt / peak, 3) if peak else None, "peak_gib": _peak_gib(args.device),
            "micro_batches": stats["micro_batches"], "loss_finite": math.isfinite(stats["loss_sum"])}


def bench_generation(model, cfg, args) -> dict:
    """HF sampling (lm.sample, the hf generator's path) of `args.gen_batch` prompts: new tokens/s."""
    from rlaif_ray.engines import lm

    rows = random_rows(cfg, args.gen_batch, 1, args.prompt_len, 1, seed=1)
    prompts = [r["prompt_token_ids"] for r in rows]
    kw = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.gen_tokens, share_prompts=False)
    eos = cfg.vocab_size - 1  # a random model draws it about once in V tokens: rows run to the end
    with torch.no_grad():
        lm.sample(model, prompts[:2], 0, eos, seed=0, **{**kw, "max_new_tokens": 4})  # warm-up
        _reset_peak(args.device)
        t0 = time.perf_counter()
        tokens, _, _ = lm.sample(model, prompts, 0, eos, seed=0, **kw)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    new = sum(len(t) for t in tokens)
    return {"new_tokens": new, "tokens_per_s": round(new / dt, 1), "s": round(dt, 2),
            "peak_gib": _peak_gib(args.device)}


def bench_shape(name: str, args) -> dict:
    """The shape's random model: generation in the compute dtype, then (saved in it for the
    learner to load, as a checkpoint would be) the learner steps."""
    from transformers import AutoModelForCausalLM

    cfg = qwen2_config(SHAPES[name])
    params = count_params(cfg)
    out = {"shape": name, "params": params["total"], "trunk_params": params["trunk"]}
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.pad_token_id = 0
    out["generation"] = bench_generation(model.eval(), cfg, args)
    why = learner_fits(cfg, args.device)
    if why:
        out["learner"] = {"skipped": why}
        return out
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        out["learner"] = bench_learner(cfg, folder, args)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-7b", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per learner step")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt (packed with their prompt)")
    ap.add_argument("--prompt-len", type=int, default=320)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--micro-batch-tokens", type=int, default=8192, help="rl.micro_batch_tokens (0: one pass)")
    ap.add_argument("--steps", type=int, default=3, help="timed learner steps (after one warm-up step)")
    ap.add_argument("--gen-batch", type=int, default=64, help="prompts sampled at once")
    ap.add_argument("--gen-tokens", type=int, default=128, help="new tokens per prompt")
    args = ap.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        print(f"error: --shapes: unknown {unknown} (one of {', '.join(SHAPES)})", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "--device cuda but torch.cuda.is_available() is False"}))
        return 1
    import transformers

    result = {"device": args.device, "name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "peak_bf16_flops": peak_flops(args.device), "torch": torch.__version__,
              "transformers": transformers.__version__, "settings": {k: v for k, v in vars(args).items() if k != "shapes"},
              "shapes": []}
    for name in args.shapes.split(","):
        try:
            result["shapes"].append(bench_shape(name, args))
        except Exception as e:  # noqa: BLE001 - each shape reports; the exit code says one failed
            result["shapes"].append({"shape": name, "error": f"{type(e).__name__}: {e}"})
    result["ok"] = all("error" not in s for s in result["shapes"])
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
