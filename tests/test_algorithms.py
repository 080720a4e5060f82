"""rl.algorithm: the losses of grpo, ppo and online_dpo as pure functions with exact values
on tiny cases, the learner's epochs of mini-batches, the config's refusals, and a 2-step run
of each algorithm through the real pipeline."""
import json
import math

import pytest
import torch

from rlaif_ray.config import ConfigError, config_from_dict
from rlaif_ray.rl import algorithms as A
from rlaif_ray.rl import losses as rl

# ---- pure functions ----------------------------------------------------------------------


def near(t: torch.Tensor, expected) -> None:
    torch.testing.assert_close(t.float(), torch.as_tensor(expected, dtype=torch.float32))


def test_group_normalised_advantages_use_each_groups_mean_and_std():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 9.0])
    ids = ["a", "a", "a", "b", "b", "c"]
    out = A.group_normalised_advantages(r, ids, eps=0.0)
    # a: mean 2, unbiased std 1; c: alone, nothing to compare with
    assert out[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert out[5] == 0
    out = A.group_normalised_advantages(r, ids)  # eps > 0: a group with no spread gets 0
    assert out[3:].tolist() == [0.0, 0.0, 0.0]
    assert A.group_normalised_advantages(r, ids, scale_std=False)[:3].tolist() == [-1.0, 0.0, 1.0]  # Dr. GRPO
    usable = torch.tensor([True, True, False, True, True, True])  # row 2 out of the stats, advantage 0
    out = A.group_normalised_advantages(r, ids, usable, scale_std=False)
    assert out[:3].tolist() == [-0.5, 0.5, 0.0]


def test_clipped_policy_loss_takes_the_pessimistic_term():
    logp_old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    loss, active = A.clipped_policy_loss(logp, logp_old, adv, torch.ones(1, 3), 0.2, 0.2)
    # rho 1.5, A 1: min(1.5, 1.2) = 1.2 (clipped); A -1: min(-1.5, -1.2) = -1.5; rho 0.5, A 1: min(0.5, 0.8)
    near(loss, [[-1.2, 1.5, -0.5]])
    assert active.tolist() == [[True, False, False]]
    loss.sum().backward()
    # a clipped token has no gradient; the others d(-rho A)/dlogp = -rho A
    near(logp.grad, [[0.0, 1.5, -0.5]])
    loss, _ = A.clipped_policy_loss(logp.detach(), logp_old, adv, torch.ones(1, 3), 0.2, 0.6)  # clip-higher
    assert loss[0, 0] == pytest.approx(-1.5)


def test_on_policy_the_clipped_loss_has_the_reinforce_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([0.8, -0.4])
    out = A.clipped_surrogate(logp, logp.detach(), logp.detach(), adv, mask, algorithm="grpo", beta=0.0,
                              num_tokens=5, num_seqs=2)
    out["loss"].backward()
    near(logp.grad, -adv[:, None] * mask / 5)
    assert out["clipped"] == 0 and float(out["kl_loss"].detach()) == 0


def test_grpo_puts_k3_in_the_loss():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    out = A.clipped_surrogate(logp, logp.detach(), ref, torch.zeros(1), mask, algorithm="grpo", beta=0.1,
                              num_tokens=2, num_seqs=1)
    k3 = rl.kl_per_token(logp.detach(), ref, "k3")
    assert float(out["kl_loss"].detach()) == pytest.approx(0.1 * k3.sum().item() / 2)
    near(out["kl"], k3)


def test_token_rewards_put_the_reward_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = A.token_rewards(torch.tensor([1.0, -1.0]), kl, mask, 0.1)
    near(out, [[-0.01, -0.02 + 0.9, 0.0], [-0.05 - 0.9, 0.0, 0.0]])


def test_gae_exact_and_reduces_to_the_return_to_go():
    r, v = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]])
    adv, ret = A.gae(r, v, torch.ones(1, 2), gamma=1.0, lam=0.5)
    # delta_1 = 1 - 0.2 = 0.8; delta_0 = 0 + 0.2 - 0.5 = -0.3; A_0 = -0.3 + 0.5 * 0.8
    near(adv, [[0.1, 0.8]])
    near(ret, [[0.6, 1.0]])
    adv, _ = A.gae(r, v, torch.ones(1, 2), gamma=0.9, lam=1.0)
    near(adv, [[0.9 * 1.0 - 0.5, 0.8]])  # lam 1: discounted return minus V
    kl, mask = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.1, 0.0]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    reward = torch.tensor([0.7, -0.3])
    adv, _ = A.gae(A.token_rewards(reward, kl, mask, 0.05), torch.zeros(2, 3), mask, 1.0, 1.0)
    near(adv, rl.returns_to_go(reward, kl, mask, 0.05))  # REINFORCE's Z_t


def test_whiten_and_value_clipping_exact():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 99.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    near(A.whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    # moments of more rows than these (another rank's): mean 3, std of [1, 2, 3, 4, 5] (unbiased) sqrt(2.5)
    both = A.whiten_moments(x, mask) + A.whiten_moments(torch.tensor([[4.0, 5.0]]), torch.ones(1, 2))
    assert A.whiten(x, mask, both)[0, :3].tolist() == pytest.approx([(v - 3) / math.sqrt(2.5) for v in (1, 2, 3)])
    v = torch.tensor([[0.5, 0.1]])
    loss = A.clipped_value_loss(v, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    # V 0.5 clipped to 0.2: max(0.25, 0.64) / 2; V 0.1 inside the band: (0.9)^2 / 2
    near(loss, [[0.32, 0.405]])


def test_soft_dpo_loss_and_margins_exact():
    logp = torch.tensor([[-1.0, -1.0], [-3.0, 0.0], [-0.5, -0.5], [-0.2, -0.8]])
    ref = torch.tensor([[-1.5, -1.0], [-2.0, 0.0], [-0.5, -0.5], [-0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    first, second = A.pair_index(["p0", "p0", "p1", "p1"])
    assert (first, second) == ([0, 2], [1, 3])
    h = A.dpo_margins(logp, ref, mask, first, second, 0.1)
    assert h.tolist() == pytest.approx([0.1 * (0.5 - (-1.0)), 0.1 * (0.0 - 0.0)])
    p = torch.tensor([1.0, 0.5])
    loss = A.soft_dpo_loss(h, p)
    assert loss.tolist() == pytest.approx([-math.log(1 / (1 + math.exp(-0.15))), math.log(2)])
    m = torch.tensor([math.log(0.8 / 0.2)], requires_grad=True)  # at h = logit(p) the loss is smallest
    A.soft_dpo_loss(m, torch.tensor([0.8])).backward()
    assert float(m.grad) == pytest.approx(0.0, abs=1e-7)
    assert A.pair_index(["p0", "p0", "p1", "p1"], torch.tensor([True, True, True, False])) == ([0], [1])
    with pytest.raises(ValueError, match="pairs of other than two rows"):
        A.pair_index(["p0", "p0", "p0"])


def test_online_dpo_gradient_raises_the_preferred_response():
    logp = torch.zeros(2, 2, requires_grad=True)
    out = A.online_dpo_surrogate(logp, torch.zeros(2, 2), torch.ones(2, 2), ["x", "x"], torch.tensor([0.9, 0.1]),
                                 dpo_beta=0.1, num_seqs=2)
    assert float(out["loss"]) == pytest.approx(math.log(2))  # h = 0 at the reference
    out["loss"].backward()
    # dL/dh = -(p - sigma(h)) = -0.4, h = 0.1 (sum a - sum b): descent raises a's log-probs, lowers b's
    near(logp.grad, [[-0.04, -0.04], [0.04, 0.04]])


def test_sequence_mean_aggregation():
    per_token = torch.tensor([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(rl.aggregate(per_token, mask, "sequence_mean", 3, 2)) == pytest.approx((2.0 + 4.0) / 2)
    assert float(rl.aggregate(per_token, mask, "token_mean", 3, 2)) == pytest.approx(8 / 3)


def test_mini_batches_keep_groups_and_cover_every_row():
    from rlaif_ray.rl.learner import split_mini_batches

    g = torch.Generator().manual_seed(0)
    parts = split_mini_batches(["a", "a", "b", "b", "c", "c", "d", "d"], 2, g)
    assert sorted(i for p in parts for i in p) == list(range(8)) and [len(p) for p in parts] == [4, 4]
    assert all({i // 2 for i in p} == {i // 2 for i in p if i % 2 == 0} for p in parts)  # pairs together
    parts = split_mini_batches(["a", "a", "a"], 3, g)  # fewer groups than mini-batches: row by row
    assert sorted(map(len, parts)) == [1, 1, 1]


# ---- config --------------------------------------------------------------------------------

@pytest.mark.parametrize("data, words", [
    ({"rl": {"algorithm": "online_dpo", "samples_per_prompt": 3}, "reward": {"source": "direct"}},
     "samples_per_prompt must be even"),
    ({"rl": {"algorithm": "online_dpo"}}, "needs reward.source pairwise"),
    ({"rl": {"algorithm": "reinforce", "epochs": 2}}, "rl.epochs and rl.mini_batches above 1 need"),
    ({"rl": {"algorithm": "grpo", "baseline": "value"}}, "rl.baseline=value is REINFORCE's"),
    ({"rl": {"algorithm": "grpo", "kl_estimator": "k1"}}, "k3"),
    ({"rl": {"algorithm": "grpo", "samples_per_prompt": 1}}, "at least 2"),
    ({"rl": {"algorithm": "ppo", "mini_batches": 9, "prompts_per_step": 2, "samples_per_prompt": 2}},
     "rl.mini_batches=9"),
    ({"rl": {"algorithm": "sac"}}, "rl.algorithm"),
])
def test_algorithm_misconfigurations_are_one_line_errors(data, words):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, "t.yaml")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_ppo_needs_no_second_sample_and_rloo_is_the_leave_one_out_baseline():
    assert config_from_dict({"rl": {"algorithm": "ppo", "samples_per_prompt": 1}}).rl.uses_value_head
    assert not config_from_dict({"rl": {"algorithm": "rloo"}}).rl.uses_value_head
    config_from_dict({"rl": {"algorithm": "online_dpo"}, "reward": {"source": "pairwise"}})


# ---- the learner ---------------------------------------------------------------------------

def _rows(pairwise: bool = False) -> list[dict]:
    rows = []
    for k, (resp, reward) in enumerate([([4, 5, 6], 0.7), ([7, 8], -0.7), ([9, 10, 11, 12], 0.1), ([13], -0.1)]):
        meta = json.dumps({"mode": "pairwise"}) if pairwise else "{}"
        rows.append({"prompt_id": f"p{k // 2}", "prompt_token_ids": [1, 2, 3, 17 + k], "rollout_id": f"b0:p{k // 2}:{k % 2}",
                     "batch_index": 0, "sample_index": k % 2, "response_token_ids": resp,
                     "behaviour_logprobs": [-2.0] * len(resp), "reward": reward, "raw_score": (reward + 1) / 2,
                     "reward_meta": meta, "reward_ok": True})
    return rows


def _on_policy(learner, rows):
    lp = learner.logprobs([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows])
    return [{**r, "behaviour_logprobs": x} for r, x in zip(rows, lp)]


@pytest.mark.parametrize("algorithm, extra, lora", [
    ("grpo", {"epochs": 2, "mini_batches": 2}, None), ("ppo", {"epochs": 2, "mini_batches": 2}, None),
    ("online_dpo", {}, None), ("rloo", {}, None),
    # with LoRA adapters: the reference is the base with them off, the value head trains beside them
    ("ppo", {"epochs": 2, "mini_batches": 2}, {"r": 4}), ("online_dpo", {}, {"r": 4})])
def test_each_algorithm_trains_the_tiny_model(tiny_model_path, algorithm, extra, lora):
    from rlaif_ray.config import LoraConfig, RLConfig
    from rlaif_ray.rl.learner import PolicyLearner

    learner = PolicyLearner(tiny_model_path, RLConfig(algorithm=algorithm, lr=1e-3, **extra), 0.9,
                            lora=LoraConfig(**lora) if lora else None)
    before = {k: v.detach().clone() for k, v in learner.state_for_sync("float32")}
    rows = _on_policy(learner, _rows(pairwise=algorithm == "online_dpo"))
    stats = learner.step(rows, 10, 4)
    assert all(math.isfinite(v) for v in stats.values() if isinstance(v, float))
    after = dict(learner.state_for_sync("float32"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if algorithm in ("grpo", "ppo"):
        assert stats["optimizer_steps"] == 4 and stats["micro_batches"] == 4
        # on-policy, the first mini-batch's ratio is 1; later ones move (the clip counts what left the band)
        assert stats["ratio_sum"] / stats["tokens"] != pytest.approx(1.0, abs=1e-9)
    if algorithm == "ppo":
        assert learner.value_started and stats["value_loss_sum"] > 0
    if algorithm == "online_dpo":  # the first step starts at h = 0: loss log 2 per pair
        assert stats["loss_sum"] == pytest.approx(math.log(2), abs=1e-4)


def test_ppo_targets_are_fixed_before_the_first_update(tiny_model_path):
    """The advantages and value targets come from one pass before any update: with gamma = lam
    = 1 and no whitening they are the REINFORCE returns minus the starting values."""
    from rlaif_ray.config import RLConfig
    from rlaif_ray.rl.learner import PolicyLearner

    cfg = RLConfig(algorithm="ppo", gamma=1.0, gae_lambda=1.0, whiten_advantages=False, beta=0.0)
    learner = PolicyLearner(tiny_model_path, cfg, 0.9)
    rows, shift = learner._ppo_targets(_on_policy(learner, _rows()), beta=0.0)
    assert shift is not None and not learner.value_started  # the bias moves at the first optimizer step
    mean_return = sum(r["reward"] * len(r["response_token_ids"]) for r in rows) / sum(len(r["response_token_ids"]) for r in rows)
    for r in rows:
        assert r["_v_old"] == pytest.approx([mean_return] * len(r["response_token_ids"]), abs=1e-5)
        assert r["_ret"] == pytest.approx([r["reward"]] * len(r["response_token_ids"]), abs=1e-5)
        assert r["_adv"] == pytest.approx([r["reward"] - mean_return] * len(r["response_token_ids"]), abs=1e-5)


# ---- the pipeline ----------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm, rl_extra, reward", [
    ("grpo", {"epochs": 2, "mini_batches": 2, "loss_agg": "sequence_mean"}, {}),
    ("ppo", {"epochs": 2, "mini_batches": 2}, {}),
    ("rloo", {}, {}),
    ("online_dpo", {}, {"source": "pairwise"}),
])
def test_two_steps_of_each_algorithm_through_the_pipeline(ray_local, tiny_model_path, tmp_path, algorithm,
                                                          rl_extra, reward):
    from rlaif_ray.commands.train import train
    from rlaif_ray.run.folder import read_metrics, read_rollouts
    from tests.test_pipeline import tiny_cfg

    cfg = tiny_cfg(tiny_model_path, tmp_path, rl={"algorithm": algorithm, "steps": 2, **rl_extra},
                   reward=reward, eval={"num_prompts": 0, "signal_posts": 0}, run={"checkpoint_every": 2})
    run = train(cfg, tmp_path / "run", log=lambda *_: None)
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert sorted(set(read_rollouts(run).column("step_trained").to_pylist())) == [1, 2]
    assert f"algorithm: {algorithm}" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "step_000002" / "model.safetensors").is_file()
