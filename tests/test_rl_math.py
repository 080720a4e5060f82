import math

import pytest
import torch

from rlaif_ray.rl import losses as rl


def test_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(rl.kl_per_token(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    # k3 = exp(ref - logp) - 1 - (ref - logp)
    expect = torch.tensor([[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]])
    assert torch.allclose(rl.kl_per_token(logp, ref, "k3"), expect)
    assert (rl.kl_per_token(logp, ref, "k3") >= 0).all()


def test_returns_to_go_hand_computed():
    reward = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    z = rl.returns_to_go(reward, kl, mask, beta=0.05)
    # row 0: 0.95*1 - 0.05*[0.6, 0.5, 0.3]; row 1: -0.95 - 0.05*[1.0, 0.5], padding ignored
    assert torch.allclose(z[0], torch.tensor([0.95 - 0.03, 0.95 - 0.025, 0.95 - 0.015]))
    assert torch.allclose(z[1], torch.tensor([-0.95 - 0.05, -0.95 - 0.025, 0.0]))


def test_group_mean_baseline_leave_one_out():
    v = torch.tensor([1.0, 3.0, 10.0, 5.0])
    b = rl.group_mean_baseline(v, ["a", "a", "b", "lone"])
    assert torch.allclose(b, torch.tensor([3.0, 1.0, 0.0, 0.0]))
    b3 = rl.group_mean_baseline(torch.tensor([1.0, 2.0, 6.0]), ["g", "g", "g"])
    assert torch.allclose(b3, torch.tensor([4.0, 3.5, 1.5]))


def test_advantages_value_and_group():
    z = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    v = torch.tensor([[0.5, 0.25], [0.1, 0.7]], requires_grad=True)
    a = rl.advantages(z, mask, "value", v, None)
    assert torch.allclose(a, torch.tensor([[0.5, 0.75], [-0.1, 0.0]])) and not a.requires_grad
    g = rl.advantages(z, mask, "group_mean", None, ["p", "p"])
    assert torch.allclose(g, torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))


def test_truncated_ratio():
    logp = torch.tensor([[0.0, -1.0, -3.0]], requires_grad=True)
    beh = torch.tensor([[0.0, -2.0, -1.0]])
    r = rl.truncated_ratio(logp, beh, clip=2.0)
    assert torch.allclose(r, torch.tensor([[1.0, 2.0, math.exp(-2.0)]]))  # e^1 clipped to 2
    assert not r.requires_grad


def test_policy_loss_gradient_direction_and_value_loss():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss = rl.aggregate(rl.policy_loss(logp, adv, torch.ones(1, 2), mask), mask, "token_mean", 2, 1)
    loss.backward()
    # gradient descent raises log-prob of positive-advantage tokens, lowers negative ones
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]
    vals = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(rl.value_loss(vals, torch.tensor([[1.0, 1.0]]), mask), torch.tensor([[1.0, 0.0]]))


def test_aggregate_global_normalisation():
    per = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert rl.aggregate(per, mask, "token_mean", num_tokens=6, num_seqs=4) == 1.0
    assert rl.aggregate(per, mask, "sequence_sum", num_tokens=6, num_seqs=4) == 1.5


def test_group_mean_baseline_skips_unusable_rows():
    """An unusable row (reward not read) is in no one's baseline, and gets none itself."""
    v = torch.tensor([1.0, 0.0, 3.0, 7.0, 0.0])
    usable = torch.tensor([True, False, True, True, False])
    b = rl.group_mean_baseline(v, ["a", "a", "a", "b", "b"], usable)
    # a: rows 0 and 2 see only each other (not row 1's 0); b: row 3 has no usable partner
    assert torch.allclose(b, torch.tensor([3.0, 2.0, 1.0, 0.0, 7.0]))
    z = torch.tensor([[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]) * usable[:3, None]
    a = rl.advantages(z, mask, "group_mean", None, ["a", "a", "a"], usable[:3])
    assert torch.allclose(a, torch.tensor([[-2.0, -2.0], [0.0, 0.0], [2.0, 0.0]]))


def test_surrogate_leaves_unusable_rows_out():
    """A row with reward_ok false changes neither the loss nor its gradient nor the metrics'
    tensors of the other rows (given the usable counts as normalisers)."""
    torch.manual_seed(0)
    logp = -torch.rand(3, 4) - 0.1
    ref = logp + 0.1 * torch.randn(3, 4)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    reward = torch.tensor([0.5, float("nan"), -0.3])
    usable = torch.tensor([True, False, True])
    kw = dict(beta=0.1, estimator="k3", baseline="group_mean", how="token_mean", num_tokens=5.0, num_seqs=2)
    x = logp.clone().requires_grad_(True)
    out = rl.surrogate(x, ref, logp, reward, mask, usable=usable, group_ids=["p"] * 3, **kw)
    out["loss"].backward()
    keep = [0, 2]
    y = logp[keep].clone().requires_grad_(True)
    ref2 = rl.surrogate(y, ref[keep], logp[keep], reward[keep], mask[keep], group_ids=["p"] * 2, **kw)
    ref2["loss"].backward()
    assert torch.allclose(out["loss"], ref2["loss"])
    assert torch.allclose(x.grad[keep], y.grad) and (x.grad[1] == 0).all()
    assert torch.allclose(out["kl"][keep], ref2["kl"]) and (out["kl"][1] == 0).all()
    assert float(out["mask"].sum()) == 5.0


def test_surrogate_k3_has_a_pathwise_term_k1_none():
    """k3 enters the loss as beta * k3 (gradient through log pi) besides the return; k1's
    pathwise term has zero expectation and is left out. No baseline: A = Z."""
    logp = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.2, -0.4]])
    mask = torch.ones(1, 2)
    kw = dict(beta=0.1, baseline="none", how="sequence_sum", num_tokens=2, num_seqs=1)
    k1 = rl.surrogate(logp, ref, logp.detach(), torch.tensor([1.0]), mask, estimator="k1", **kw)
    k3 = rl.surrogate(logp, ref, logp.detach(), torch.tensor([1.0]), mask, estimator="k3", **kw)
    assert float(k1["kl_loss"]) == 0.0
    k3_tokens = rl.kl_per_token(logp.detach(), ref, "k3")
    assert float(k3["kl_loss"].detach()) == pytest.approx(0.1 * float(k3_tokens.sum()))
    assert torch.allclose(k3["advantages"], k3["returns"])  # baseline none
    (g,) = torch.autograd.grad(k3["kl_loss"], logp)
    # d/dlogp of beta * (q - 1 - log q), q = ref / pi: beta * (1 - q)
    assert torch.allclose(g, 0.1 * (1 - torch.exp(ref - logp.detach())))
