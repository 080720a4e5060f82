"""The learner rank on its own (no Ray): memory options leave the update unchanged."""
import os

import numpy as np
import pyarrow as pa
import pytest


def _batch():
    from rlaif_ray.data import schemas

    rows = []
    for k, (resp, reward) in enumerate([([4, 5, 6], 0.7), ([7, 8], -0.2), ([9, 10, 11, 12], 0.1), ([13], -0.6)]):
        rows.append({"prompt_id": f"p{k // 2}", "prompt_text": "x", "prompt_token_ids": [1, 2, 3, 17 + k],
                     "reference": None, "context": "c", "rollout_id": f"b0:p{k // 2}:{k % 2}", "batch_index": 0,
                     "sample_index": k % 2, "response_text": "y", "response_token_ids": resp,
                     "behaviour_logprobs": [-2.0] * len(resp), "policy_version": 0, "truncated": False,
                     "generator": "g", "reward": reward, "raw_score": 0.0, "reward_meta": "{}", "reward_ok": True})
    return pa.RecordBatch.from_pylist(rows, schema=schemas.SCORED)


def _weights(learner) -> dict:
    return {k: v.detach().numpy().copy() for k, v in learner.state_for_sync("float32")}


def test_gradient_checkpointing_gives_the_same_update(tiny_model_path):
    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner

    out = []
    for checkpointing in (False, True):
        cfg = RLConfig(lr=1e-3, gradient_checkpointing=checkpointing, samples_per_prompt=2)
        learner = PolicyLearner(tiny_model_path, cfg, 0.9)
        stats = [learner.step(_batch().to_pylist(), 10, 4) for _ in range(2)]  # the second step uses AdamW state
        out.append((stats, _weights(learner)))
        assert all(p.grad is None for p in learner.policy.parameters())  # gradients are not held between steps
    (s0, w0), (s1, w1) = out
    assert [s["loss_sum"] for s in s0] == pytest.approx([s["loss_sum"] for s in s1], abs=1e-6)
    for k in w0:
        np.testing.assert_allclose(w0[k], w1[k], atol=1e-6, err_msg=k)
    untrained = _weights(PolicyLearner(tiny_model_path, RLConfig(), 0.9))
    assert any(not np.allclose(w0[k], v) for k, v in untrained.items())  # it trained


def test_the_learner_actor_gets_the_malloc_settings_and_the_job_env(ray_local, tiny_model_path, tmp_path):
    """The learner's own env vars are merged with the job's (HF_HUB_OFFLINE stays set); the
    malloc settings follow rl.release_memory."""
    import ray

    from actors.pipeline import start_learner
    from actors.ray_session import release
    from rlaif_ray.config import config_from_dict
    from rlaif_ray.cpu.allocator import bundled_jemalloc

    jemalloc = bundled_jemalloc()  # Ray's Linux wheels ship one: the learner runs on it
    names = ["LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "HF_HUB_OFFLINE", "OMP_NUM_THREADS"]
    for release_memory in (True, False):
        cfg = config_from_dict({"model": {"name": tiny_model_path},
                                "rl": {"prompts_per_step": 2, "release_memory": release_memory},
                                "pipeline": {"learner": {"num_cpus": 0.25, "torch_threads": 2}}})
        learner = start_learner(cfg, "malloc")
        try:
            env = ray.get(learner.workers[0].env.remote(names))
            info = ray.get(learner.workers[0].info.remote())
            # OpenMP gets the role's torch threads (Ray would give a 0.25-CPU actor 1)
            assert env["HF_HUB_OFFLINE"] == "1" and env["OMP_NUM_THREADS"] == "2"
            if not release_memory:  # glibc's defaults
                assert env["LD_PRELOAD"] is None and env["MALLOC_MMAP_THRESHOLD_"] is None
                assert info["allocator"] == "system"
            elif jemalloc and "LD_PRELOAD" not in os.environ:
                assert env["LD_PRELOAD"] == jemalloc and info["allocator"] == "jemalloc"
            else:  # the glibc fallback
                assert env["MALLOC_MMAP_THRESHOLD_"] == "65536"
        finally:
            ray.kill(learner.workers[0])
            release("malloc", ["learner"])


def test_release_heap_purges_jemalloc_in_a_learner_process(tmp_path):
    """Under the preloaded jemalloc, release_heap hands a freed 400 MB back to the OS (glibc's
    malloc_trim would not reach jemalloc's arenas)."""
    import subprocess
    import sys

    from rlaif_ray.cpu.allocator import bundled_jemalloc

    jemalloc = bundled_jemalloc()
    if jemalloc is None:
        pytest.skip("this Ray ships no jemalloc (not Linux)")
    code = ("import psutil, torch\n"
            "from rlaif_ray.cpu.allocator import allocator, release_heap\n"
            "rss = lambda: psutil.Process().memory_info().rss / 2**20\n"
            "xs = [torch.ones(1 << 20) for _ in range(100)]\n"  # 100 x 4 MiB, under jemalloc's huge size
            "held = rss(); del xs\n"
            "before = rss(); release_heap(); after = rss()\n"
            "print(allocator(), round(held), round(before), round(after))\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LD_PRELOAD": jemalloc},
                         capture_output=True, text=True, check=True).stdout.split()
    name, held, before, after = out[0], *map(int, out[1:])
    assert name == "jemalloc"
    assert after < held - 300, (held, before, after)


def _with_unusable_row(rows: list[dict]) -> list[dict]:
    """`rows` plus a third sample of p0 whose label could not be read (its reward is junk)."""
    bad = dict(rows[0], rollout_id="b0:p0:2", sample_index=2, response_token_ids=[14, 15], reward=5.0,
               behaviour_logprobs=[-2.0, -2.0], reward_ok=False)
    return rows[:2] + [bad] + rows[2:]


@pytest.mark.parametrize("baseline", ["group_mean", "value"])
def test_an_unusable_row_changes_nothing(tiny_model_path, baseline):
    """A row with reward_ok false is out of the baseline, the loss, every denominator and the
    metrics: the update equals the one without it (normalisers from loss_normalisers)."""
    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner, loss_normalisers

    rows = _batch().to_pylist()
    out = []
    for batch in (rows, _with_unusable_row(rows)):
        learner = PolicyLearner(tiny_model_path, RLConfig(lr=1e-3, baseline=baseline, kl_estimator="k3"), 0.9)
        counts = loss_normalisers([r["response_token_ids"] for r in batch], [r["reward_ok"] for r in batch])
        stats = [learner.step(batch, *counts) for _ in range(2)]  # the second step has a nonzero KL
        out.append((counts, stats, _weights(learner)))
    (c0, s0, w0), (c1, s1, w1) = out
    assert c0 == c1 == (10, 4)
    for a, b in zip(s0, s1):
        for key in ("loss_sum", "pg_loss_sum", "kl_loss_sum", "value_loss_sum", "kl_sum", "tokens", "usable_rows",
                    "adv_sum", "adv_sq_sum", "ratio_sum", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        assert b["rows"] == 5 and b["usable_rows"] == 4
    assert s1[1]["kl_sum"] != 0
    for k in w0:
        np.testing.assert_allclose(w0[k], w1[k], atol=1e-6, err_msg=k)


def test_the_value_head_has_its_own_lr_and_starts_at_the_mean_return(tiny_model_path, tmp_path):
    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner, loss_normalisers

    cfg = RLConfig(lr=1e-5, value_lr=1e-2, baseline="value", beta=0.1)
    learner = PolicyLearner(tiny_model_path, cfg, 0.9)
    trunk_group, head_group = learner.opt.param_groups
    assert (trunk_group["lr"], head_group["lr"]) == (1e-5, 1e-2)
    assert [id(p) for p in head_group["params"]] == [id(p) for p in learner.policy.value_head.parameters()]
    assert not {id(p) for p in head_group["params"]} & {id(p) for p in trunk_group["params"]}
    assert len(trunk_group["params"]) + 2 == len(list(learner.policy.parameters()))

    rows = _with_unusable_row(_batch().to_pylist())
    # step 0: the policy is the reference (KL 0), so the mean return over the usable tokens is
    # (1 - beta) * their token-weighted mean reward; the junk reward of the unusable row is out
    ok = [r for r in rows if r["reward_ok"]]
    z = [(1 - 0.1) * r["reward"] for r in ok for _ in r["response_token_ids"]]
    mean = sum(z) / len(z)
    head = learner.policy.value_head
    w_before = head.weight.detach().clone()
    trunk_before = {k: v.detach().clone() for k, v in learner.named_weights()}
    stats = learner.step(rows, *loss_normalisers([r["response_token_ids"] for r in rows],
                                                 [r["reward_ok"] for r in rows]))
    # the value loss of this first forward already sees V = mean return (the weight is 0)
    assert stats["value_loss_sum"] == pytest.approx(sum((x - mean) ** 2 for x in z) / len(z), rel=1e-4)
    # then one AdamW step: the bias stays at the mean (its gradient is 0 there), the head's
    # weights move by value_lr, the trunk by at most lr
    assert float(head.bias.detach()) == pytest.approx(mean, abs=1e-6)
    assert float((head.weight.detach() - w_before).abs().max()) == pytest.approx(1e-2, rel=1e-2)
    trunk_moved = max(float((v.detach() - trunk_before[k]).abs().max()) for k, v in learner.named_weights())
    assert 0 < trunk_moved <= 1.01e-5
    # a later batch does not restart it
    shifted = [dict(r, reward=r["reward"] - 0.5) for r in rows]
    bias1 = float(head.bias.detach())
    learner.step(shifted, 10, 4)
    assert abs(float(head.bias.detach()) - bias1) <= 1.01e-2
    # a resumed learner keeps the saved head, with both param groups' lrs
    learner.save(tmp_path / "c", {"step": 2})
    resumed = PolicyLearner(tiny_model_path, cfg, 0.9)
    resumed.load(tmp_path / "c")
    assert resumed.value_started and float(resumed.policy.value_head.bias.detach()) == float(head.bias.detach())
    assert [g["lr"] for g in resumed.opt.param_groups] == [1e-5, 1e-2]


def test_a_detached_value_trunk_takes_no_gradient_from_the_value_loss(tiny_model_path):
    """rl.value_trunk: shared, the value loss's gradient reaches the policy's trunk; detached,
    the trunk's gradient is the policy loss's alone (the same as with no value loss at all)."""
    import torch

    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner

    rows = _batch().to_pylist()
    grads = {}
    for trunk, coef in (("shared", 0.5), ("detached", 0.5), ("detached", 0.0)):
        learner = PolicyLearner(tiny_model_path, RLConfig(baseline="value", value_trunk=trunk, value_coef=coef), 0.9)
        learner.value_started = True  # skip the bias start: the head's weights stay as built (0)
        torch.nn.init.normal_(learner.policy.value_head.weight, std=0.5)  # a head that passes gradient back
        learner._accumulate(rows, 10, 4, 0.05, None)
        grads[(trunk, coef)] = {n: p.grad.clone() for n, p in learner.policy.model.named_parameters()
                                if p.grad is not None}
    shared, detached, no_value = grads[("shared", 0.5)], grads[("detached", 0.5)], grads[("detached", 0.0)]
    assert max(float((shared[n] - no_value[n]).abs().max()) for n in shared) > 1e-6
    for n in detached:
        torch.testing.assert_close(detached[n], no_value[n], rtol=0, atol=0)


def test_the_update_runs_the_fused_adamw_kernel_which_matches_the_single_tensor_loop(tiny_model_path):
    """The fused kernel (one pass, no temporaries) updates the weights as the single-tensor
    loop does, to float rounding, over two steps (the second with AdamW state)."""
    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner

    out = []
    for kernel in (None, dict(fused=None, foreach=False)):
        learner = PolicyLearner(tiny_model_path, RLConfig(lr=1e-3, samples_per_prompt=2), 0.9)
        assert all(g["fused"] is True and g["foreach"] is False for g in learner.opt.param_groups)
        for g in learner.opt.param_groups if kernel else []:
            g.update(kernel)  # the loop the learner ran before on CPU
        for _ in range(2):
            learner.step(_batch().to_pylist(), 10, 4)
        out.append(_weights(learner))
        assert any(s["exp_avg"].abs().sum() > 0 for s in learner.opt.state.values())
    for k in out[0]:
        np.testing.assert_allclose(out[0][k], out[1][k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_a_checkpoint_saved_with_another_adamw_kernel_resumes_on_the_fused_one(tiny_model_path, tmp_path):
    """The kernel is the process's choice: a checkpoint whose optimizer groups name the
    single-tensor loop (written before the fused kernel) resumes with its state on the fused one."""
    import json

    import torch

    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner

    cfg = RLConfig(lr=1e-3, samples_per_prompt=2)
    learner = PolicyLearner(tiny_model_path, cfg, 0.9)
    learner.step(_batch().to_pylist(), 10, 4)
    learner.save(tmp_path / "ck", {"step": 1})
    meta_file = tmp_path / "ck" / "trainer_state.json"
    meta = json.loads(meta_file.read_text())
    for g in meta["optimizer_meta"]["param_groups"]:
        g.update(fused=None, foreach=False)
    meta_file.write_text(json.dumps(meta))
    resumed = PolicyLearner(tiny_model_path, cfg, 0.9)
    resumed.load(tmp_path / "ck")
    assert all(g["fused"] is True and g["foreach"] is False for g in resumed.opt.param_groups)
    mine = dict(learner.policy.named_parameters())
    for name, p in resumed.policy.named_parameters():
        assert torch.equal(resumed.opt.state[p]["exp_avg_sq"], learner.opt.state[mine[name]]["exp_avg_sq"]), name
    resumed.step(_batch().to_pylist(), 10, 4)
    learner.step(_batch().to_pylist(), 10, 4)
    theirs = _weights(resumed)
    for k, v in _weights(learner).items():
        np.testing.assert_array_equal(theirs[k], v, err_msg=k)


def _batch4() -> list[dict]:
    """_batch's two prompts and two more (q0, q1) whose responses are twice as long: groups of
    13, 13, 18 and 18 tokens (prompt + response of each row)."""
    rows = _batch().to_pylist()
    more = [dict(r, prompt_id=r["prompt_id"].replace("p", "q"), rollout_id=r["rollout_id"].replace(":p", ":q"),
                 response_token_ids=r["response_token_ids"] * 2, behaviour_logprobs=r["behaviour_logprobs"] * 2)
            for r in rows]
    return rows + more


def test_micro_batches_keep_prompt_groups_within_the_token_budget():
    from rlaif_ray.rl.learner import plan_micro_batches

    rows = _batch4()

    def groups(plan):
        return [sorted({rows[i]["prompt_id"] for i in mb}) for mb in plan]

    assert plan_micro_batches(rows, 0) == [list(range(8))]  # 0: one pass
    plan = plan_micro_batches(rows, 31)  # the fewest within 31 tokens: a long group with a short one
    assert groups(plan) == [["p0", "q0"], ["p1", "q1"]]
    assert sorted(i for mb in plan for i in mb) == list(range(8))
    assert all(sum(len(rows[i]["prompt_token_ids"]) + len(rows[i]["response_token_ids"]) for i in mb) <= 31
               for mb in plan)
    assert groups(plan_micro_batches(rows, 1)) == [["q0"], ["q1"], ["p0"], ["p1"]]  # over the budget: one group each
    assert len(plan_micro_batches(rows, 0, count=3)) == 3  # as many as another rank needs
    assert len(plan_micro_batches(rows, 0, count=9)) == 4  # never more than one per group
    assert plan_micro_batches([], 16) == [[]]


@pytest.mark.parametrize("baseline", ["group_mean", "value"])
def test_micro_batches_give_the_update_of_one_pass(tiny_model_path, baseline):
    """rl.micro_batch_tokens: the shard in 2 or 4 forward/backward passes whose gradients add up
    gives the one-pass update (two steps: the second uses AdamW state and a nonzero KL; with
    the value baseline the head starts at the whole batch's mean return)."""
    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner

    rows = _batch4()
    counts = (sum(len(r["response_token_ids"]) for r in rows), len(rows))
    runs = {}
    for budget in (0, 31, 1):
        learner = PolicyLearner(tiny_model_path, RLConfig(lr=1e-3, samples_per_prompt=2, baseline=baseline,
                                                          micro_batch_tokens=budget), 0.9)
        runs[budget] = ([learner.step(rows, *counts) for _ in range(2)], _weights(learner))
    (one, w1) = runs[0]
    for budget, passes in ((31, 2), (1, 4)):
        stats, w = runs[budget]
        assert [s["micro_batches"] for s in stats] == [passes, passes] and one[0]["micro_batches"] == 1
        for key in ("loss_sum", "pg_loss_sum", "value_loss_sum", "kl_sum", "tokens", "return_sum"):
            assert [s[key] for s in stats] == pytest.approx([s[key] for s in one], abs=1e-5), (budget, key)
        assert [s["grad_norm"] for s in stats] == pytest.approx([s["grad_norm"] for s in one], rel=1e-4)
        for k in w1:
            np.testing.assert_allclose(w[k], w1[k], atol=1e-6, err_msg=f"{budget} {k}")
