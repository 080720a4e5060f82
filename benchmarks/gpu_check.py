"""`make gpu-check`: the Ray-free core on one device, as a bare CUDA machine can run it (torch,
transformers, safetensors, pyarrow; Ray and vLLM only if importable). Prints one JSON line
of results and exits non-zero when any part fails. `make gpu-check DEVICE=cpu` runs the
same on CPU (the test suite does, so it cannot rot).

    python -m benchmarks.gpu_check --device cuda --model PATH_OR_NAME
    python -m benchmarks.gpu_check --save-model DIR   # a small random model with the real
                                                      # tokenizer (~15 MB in bf16): carry it
                                                      # to a GPU box that has no model files

Parts: learner (bf16 mixed-precision PolicyLearner steps: finite loss, weights move, fp32
master weights and optimizer state, peak memory), parity (HF generation vs the learner's
log-probs of the same tokens after a weight sync: on-policy ratio ~1), labels (label scoring,
padded vs prefix-shared paths), fsdp (world size 1 on NCCL/gloo vs unsharded), checkpoint
(save, from_pretrained, exact resume), device_guard (no tensor without a device), and ray /
vllm when those import.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch


def _batch(learner, gen, tok, n_prompts: int = 2, k: int = 2, seed: int = 0) -> list[dict]:
    """Scored rollouts sampled by `gen` (rewards are a fixed function of length: the check
    is the machinery, not learning)."""
    texts = ["Summarize: the cat sat on the mat and refused to move all day.",
             "Summarize: a long walk in the rain ended at a warm cafe with friends."][:n_prompts]
    prompts = [tok(t)["input_ids"] for t in texts]
    expanded = [(i, j) for i in range(len(prompts)) for j in range(k)]
    tokens, logps, _ = gen.generate([prompts[i] for i, _ in expanded], temperature=learner.temperature, top_p=1.0,
                                    top_k=0, max_new_tokens=12, seed=seed)
    return [{"prompt_id": f"p{i}", "prompt_token_ids": prompts[i], "response_token_ids": t or [tok.eos_token_id],
             "behaviour_logprobs": lp or [0.0], "reward": (sum(t) % 7) / 7 - 0.5, "reward_ok": True,
             "rollout_id": f"b0:p{i}:{j}", "batch_index": 0}
            for (i, j), t, lp in zip(expanded, tokens, logps)]


def _counts(rows):
    from rlaif_ray.rl.learner import loss_normalisers

    return loss_normalisers([r["response_token_ids"] for r in rows], [r["reward_ok"] for r in rows])


def _peak(device) -> float:
    """Peak memory in GiB: CUDA allocator peak, or this process's peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def part_learner(ctx) -> dict:
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.rl.learner import PolicyLearner

    dev = ctx["device"]
    if torch.device(dev).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    learner = PolicyLearner(ctx["model"], dict(lr=1e-4, gradient_checkpointing=True, samples_per_prompt=2), 0.9,
                            dev, ctx["dtype"])
    gen = HFEngine(ctx["model"], device=dev, dtype=ctx["dtype"])
    ctx.update(learner=learner, gen=gen, tok=gen.tok)
    before = {k: v.detach().float().clone() for k, v in learner.named_weights()}
    rows = _batch(learner, gen, gen.tok)
    t0 = time.perf_counter()
    stats = [learner.step(rows, *_counts(rows)) for _ in range(3)]
    step_s = (time.perf_counter() - t0) / 3
    moved = max(float((v.detach().float() - before[k]).abs().max()) for k, v in learner.named_weights())
    master = {str(p.dtype) for p in learner.policy.parameters()}
    opt_state = {str(v.dtype) for st in learner.opt.state.values() for k, v in st.items() if k != "step"}
    out = {"compute_dtype": str(learner.compute), "master_dtypes": sorted(master), "optimizer_dtypes": sorted(opt_state),
           "reference_dtype": str(next(learner.ref.parameters()).dtype), "losses": [s["loss_sum"] for s in stats],
           "grad_norms": [s["grad_norm"] for s in stats], "max_weight_change": moved, "step_s": round(step_s, 3),
           "peak_gib": round(_peak(dev), 3), "fused_adamw": bool(learner.opt.defaults.get("fused"))}
    assert all(map(lambda x: x == x and abs(x) != float("inf"), out["losses"])), "non-finite loss"
    assert moved > 0, "weights did not change"
    assert master == {"torch.float32"} and opt_state <= {"torch.float32"}, "master weights / AdamW state not fp32"
    return out


def part_parity(ctx) -> dict:
    """After the steps, sync the learner's weights into the generator (in its dtype), sample,
    and compare the generator's behaviour log-probs with the learner's for the same tokens."""
    from rlaif_ray.engines.devices import dtype_name

    learner, gen = ctx["learner"], ctx["gen"]
    gen.load_weights(dict(learner.state_for_sync(dtype_name(gen.dtype))))
    rows = _batch(learner, gen, ctx["tok"], seed=7)
    mine = learner.logprobs([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows])
    diffs = [a - b for r, m in zip(rows, mine) for a, b in zip(m, r["behaviour_logprobs"])]
    ratio = sum(pow(2.718281828459045, d) for d in diffs) / len(diffs)
    max_abs = max(abs(d) for d in diffs)
    tol = 1e-3 if learner.compute == torch.float32 else 0.1  # bf16: ~3 significant digits per logit
    out = {"tokens": len(diffs), "mean_ratio": round(ratio, 5), "max_abs_logp_diff": round(max_abs, 5),
           "mean_abs_logp_diff": round(sum(abs(d) for d in diffs) / len(diffs), 5), "tolerance": tol}
    assert abs(ratio - 1) < tol, f"on-policy ratio {ratio:.4f} not within {tol} of 1"
    return out


def part_labels(ctx) -> dict:
    from rlaif_ray.config import PairwiseConfig
    from rlaif_ray.engines.hf import HFEngine
    from rlaif_ray.feedback.labeling import Judge

    gen = ctx["gen"]
    ctxs = ["Post: my landlord raised the rent twice this year and I do not know what to do. " * 2] * 2
    a, b = ["Rent went up twice.", "Landlord raised rent."], ["I like turtles.", "Cats are nice."]
    out = {}
    for sharing in ("off", "on"):
        judge = Judge.of_model(HFEngine(gen.model, gen.tok, prefix_sharing=sharing), gen.tok, "yesno_about_chat")
        rewards, _, _ = judge.score(ctxs + ctxs, a + b)
        p_a = judge.prefer(ctxs, a, b, PairwiseConfig()).p_a
        out[sharing] = {"rewards": [round(x, 4) for x in rewards], "p_a": [round(x, 4) for x in p_a]}
    diff = max(abs(x - y) for k in ("rewards", "p_a") for x, y in zip(out["off"][k], out["on"][k]))
    out["max_abs_diff_padded_vs_shared"] = round(diff, 5)
    assert all(-1 <= x <= 1 for x in out["off"]["rewards"]) and all(0 <= p <= 1 for p in out["off"]["p_a"])
    assert diff < (1e-4 if gen.dtype == torch.float32 else 0.05), f"padded vs shared label paths differ by {diff}"
    return out


def _group(device):
    """A one-rank process group (NCCL on CUDA, gloo on CPU) on a store at an OS-picked port."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo", store=store, rank=0,
                            world_size=1)
    return store


def part_fsdp(ctx) -> dict:
    import torch.distributed as dist

    from rlaif_ray.rl.learner import PolicyLearner

    dev, learner = ctx["device"], ctx["learner"]
    rows = _batch(learner, ctx["gen"], ctx["tok"], seed=11)
    cfg = dict(lr=1e-4, samples_per_prompt=2)
    plain = PolicyLearner(ctx["model"], cfg, 0.9, dev, ctx["dtype"])
    a = plain.step(rows, *_counts(rows))
    del plain
    store = _group(dev)
    try:
        sharded = PolicyLearner(ctx["model"], cfg, 0.9, dev, ctx["dtype"], shard_model=True)
        assert type(next(sharded.policy.parameters())).__name__ == "DTensor"
        b = sharded.step(rows, *_counts(rows))
        n = sum(1 for _ in sharded.state_for_sync("bfloat16"))  # gathers work
    finally:
        dist.destroy_process_group()
        del store
    tol = 1e-4 if ctx["learner"].compute == torch.float32 else 2e-2
    out = {"backend": "nccl" if torch.device(dev).type == "cuda" else "gloo", "loss_unsharded": a["loss_sum"],
           "loss_fsdp": b["loss_sum"], "grad_norm_unsharded": a["grad_norm"], "grad_norm_fsdp": b["grad_norm"],
           "tensors_gathered": n}
    assert abs(a["loss_sum"] - b["loss_sum"]) <= tol * max(1.0, abs(a["loss_sum"])), "FSDP loss differs"
    return out


def part_checkpoint(ctx) -> dict:
    from transformers import AutoModelForCausalLM

    from rlaif_ray.rl.learner import PolicyLearner

    learner, dev = ctx["learner"], ctx["device"]
    rows = _batch(learner, ctx["gen"], ctx["tok"], seed=13)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        learner.save(d, {"step": 3})
        save_s = time.perf_counter() - t0
        loaded = AutoModelForCausalLM.from_pretrained(d, use_safetensors=True)
        mine = {k: v.detach().float().cpu() for k, v in learner.named_weights()}
        hf_diff = max(float((p.detach().float() - mine[k]).abs().max()) for k, p in loaded.named_parameters()
                      if k in mine)
        resumed = PolicyLearner(ctx["model"], learner.rl, learner.temperature, dev, ctx["dtype"])
        resumed.load(d)
        a, b = learner.step(rows, *_counts(rows)), resumed.step(rows, *_counts(rows))
    out = {"save_s": round(save_s, 2), "from_pretrained_max_diff": hf_diff, "loss_after": a["loss_sum"],
           "loss_resumed": b["loss_sum"]}
    assert hf_diff == 0.0, "from_pretrained weights differ from the learner's"
    tol = 1e-5 if learner.compute == torch.float32 else 1e-3  # bf16 kernels may reduce in another order
    assert abs(a["loss_sum"] - b["loss_sum"]) < tol * max(1.0, abs(a["loss_sum"])), "resume is not exact"
    return out


def part_device_guard(ctx) -> dict:
    from rlaif_ray.engines.devices import DeviceGuard
    from rlaif_ray.feedback.labeling import Judge

    learner, gen = ctx["learner"], ctx["gen"]
    rows = _batch(learner, gen, ctx["tok"], seed=17)
    with DeviceGuard() as guard:
        learner.step(rows, *_counts(rows))
        gen.generate([[1, 2, 3]], temperature=0.9, top_p=1.0, top_k=0, max_new_tokens=3, seed=0)
        Judge.of_model(gen, gen.tok, "score10_chat").score(["a post"], ["a summary"])
    assert not guard.violations, guard.violations
    return {"violations": guard.violations}


def part_ray(ctx) -> dict:
    """A LearnerWorker actor on a local Ray: one step on an Arrow batch, weights out in bf16."""
    import pyarrow as pa
    import ray

    from actors.learner import LearnerWorker
    from rlaif_ray.data import schemas
    from rlaif_ray.engines import weight_sync

    rows = _batch(ctx["learner"], ctx["gen"], ctx["tok"], seed=19)
    full = [{**r, "prompt_text": "", "reference": None, "context": "", "sample_index": 0, "response_text": "",
             "policy_version": 0, "truncated": False, "generator": "g", "raw_score": 0.0, "reward_meta": "{}"}
            for r in rows]
    batch = pa.RecordBatch.from_pylist(full, schema=schemas.SCORED)
    cuda = torch.device(ctx["device"]).type == "cuda"
    ray.init(num_cpus=2, num_gpus=1 if cuda else 0, include_dashboard=False)
    try:
        w = ray.remote(LearnerWorker).options(num_cpus=0, num_gpus=1 if cuda else 0).remote(
            0, 1, ctx["model"], ctx["dtype"], dict(samples_per_prompt=2), 0.9, 1, ctx["device"])
        ray.get(w.setup.remote())
        stats = ray.get(w.train_step.remote(batch, *_counts(rows)))
        weights = weight_sync.unpack(ray.get(w.get_weights.remote("bfloat16")))
    finally:
        ray.shutdown()
    dtypes = {str(t.dtype) for t in weights.values()}
    assert dtypes == {"torch.bfloat16"} and stats["loss_sum"] == stats["loss_sum"]
    return {"loss": stats["loss_sum"], "weights": len(weights), "weight_dtypes": sorted(dtypes)}


def part_vllm(ctx) -> dict:
    """A vLLM engine on the device: sample, then install the learner's weights in bf16."""
    from rlaif_ray.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(ctx["model"], device=ctx["device"], max_model_len=512, kv_cache_gib=0.25)
    before = eng.digest()
    eng.load_weights(dict(ctx["learner"].state_for_sync("bfloat16")))
    after = eng.digest()
    tokens, logps, _ = eng.generate([[1, 2, 3]], temperature=0.9, top_p=1.0, top_k=0, max_new_tokens=4, seed=0)
    assert before != after, "vLLM weights did not change after load_weights"
    return {"digest_before": before, "digest_after": after, "sampled_tokens": len(tokens[0])}


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def save_tiny_model(path: str) -> str:
    """A small random Llama (hidden 128, 4 layers) with the bundled tokenizer, in bf16."""
    from transformers import AutoModelForCausalLM

    from rlaif_ray.engines.models import make_tiny_model

    make_tiny_model(path, hidden=128, layers=4)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    m.save_pretrained(path, safe_serialization=True)
    return path


PARTS = [("learner", part_learner), ("parity", part_parity), ("labels", part_labels), ("fsdp", part_fsdp),
         ("checkpoint", part_checkpoint), ("device_guard", part_device_guard), ("ray", part_ray), ("vllm", part_vllm)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a model folder or the embedded default")
    ap.add_argument("--dtype", default="auto", help="compute precision: auto (bf16 on CUDA), float32, bfloat16")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out")
    ap.add_argument("--save-model", help="write a small random model folder here and exit")
    args = ap.parse_args(argv)
    if args.save_model:
        print(save_tiny_model(args.save_model))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    missing = [m for m in ("transformers", "safetensors", "pyarrow", "pydantic", "yaml") if not _importable(m)]
    if missing:  # the core's own dependencies (the config is pydantic, YAML-loaded)
        print(json.dumps({"ok": False, "error": f"missing packages: {missing} (pip install them, or carry their wheels)"}))
        return 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "--device cuda but torch.cuda.is_available() is False"}))
        return 1
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device).index or 0)
    import transformers

    ctx = {"device": args.device, "model": args.model, "dtype": args.dtype}
    result = {"device": args.device, "name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
              "model": args.model, "parts": {}}
    skip = set(filter(None, args.skip.split(",")))
    t_all = time.perf_counter()
    for name, fn in PARTS:
        if name in skip or (name in ("ray", "vllm") and not _importable(name)):
            result["parts"][name] = {"ok": None, "skipped": "asked" if name in skip else f"{name} is not installed"}
            continue
        if name != "learner" and "learner" not in ctx:
            result["parts"][name] = {"ok": False, "error": "the learner part failed"}
            continue
        t0 = time.perf_counter()
        try:
            result["parts"][name] = {"ok": True, **fn(ctx)}
        except Exception as e:  # noqa: BLE001 - every part reports, the exit code says it failed
            result["parts"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                     "where": traceback.format_exc(limit=-3)}
        result["parts"][name]["s"] = round(time.perf_counter() - t0, 2)
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    result["ok"] = all(p["ok"] is not False for p in result["parts"].values())
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
