"""The learner's surrogate loss has the exact expected gradient: on a tiny tabular policy
(vocabulary of 3 with an EOS, responses of at most 3 tokens: 15 sequences in all), the
expectation of grad L over every sequence (or every group of sequences), weighted by its
probability, equals -grad J for J = (1 - beta) E[r] - beta KL(pi || ref), J computed in
closed form. `rl.surrogate` is what PolicyLearner.step differentiates."""
import itertools

import pytest
import torch

from rlaif_ray.rl import losses as rl

V, EOS, T = 3, 2, 3
BETA = 0.3  # large, so that a wrong KL gradient cannot hide behind the reward's


def _sequences() -> list[tuple]:
    """Every response: a run of non-EOS tokens ended by EOS, or T tokens."""
    out = []
    for n in range(T - 1):
        out += [p + (EOS,) for p in itertools.product(range(EOS), repeat=n)]
    out += [p + (t,) for p in itertools.product(range(EOS), repeat=T - 1) for t in range(V)]
    return out


SEQS = _sequences()
PREFIXES = [p for n in range(T) for p in itertools.product(range(EOS), repeat=n)]  # the states
STATE = {p: i for i, p in enumerate(PREFIXES)}


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # the policy a step away from the reference, so that the KL and its gradient are not tiny
    ref = torch.randn(len(PREFIXES), V, generator=g)
    theta = (ref + 0.8 * torch.randn(len(PREFIXES), V, generator=g)).requires_grad_(True)
    reward = {s: float(x) for s, x in zip(SEQS, torch.rand(len(SEQS), generator=g) * 2 - 1)}
    value = torch.randn(len(PREFIXES), generator=g)  # an arbitrary fixed value function
    return theta, ref, reward, value


def _token_logps(table: torch.Tensor, seq: tuple) -> torch.Tensor:
    logp = torch.log_softmax(table, dim=-1)
    return torch.stack([logp[STATE[seq[:t]], seq[t]] for t in range(len(seq))])


def _exact_objective(theta, ref, reward) -> torch.Tensor:
    """J = (1 - beta) sum_y pi(y) r(y) - beta sum_y pi(y) log(pi(y) / ref(y))."""
    j = torch.zeros(())
    for s in SEQS:
        lp, lr = _token_logps(theta, s).sum(), _token_logps(ref, s).sum()
        j = j + lp.exp() * ((1 - BETA) * reward[s] - BETA * (lp - lr))
    return j


def _batch(theta, ref, reward, value, seqs, usable=None, cache=None):
    """The padded [B, T] tensors the learner builds for a batch of responses."""
    cache = {} if cache is None else cache
    for s in seqs:
        if s not in cache:
            cache[s] = (_token_logps(theta, s), _token_logps(ref, s))
    mask = torch.tensor([[1.0] * len(s) + [0.0] * (T - len(s)) for s in seqs])
    pad = lambda rows: torch.stack([torch.cat([r, torch.zeros(T - len(r))]) for r in rows])  # noqa: E731
    logp = pad([cache[s][0] for s in seqs]) * mask
    ref_logp = pad([cache[s][1] for s in seqs]) * mask
    values = None if value is None else torch.tensor(
        [[float(value[STATE[s[:t]]]) for t in range(len(s))] + [0.0] * (T - len(s)) for s in seqs])
    r = torch.tensor([reward[s] for s in seqs])
    ok = None if usable is None else torch.tensor(usable)
    return logp, ref_logp, r, mask, values, ok


def _expected_surrogate_grad(theta, ref, reward, value, estimator, baseline, group=1, usable=None):
    """sum over every group of `group` i.i.d. responses of P(group) * grad L(group)."""
    total, cache = torch.zeros(()), {}
    for seqs in itertools.product(SEQS, repeat=group):
        logp, ref_logp, r, mask, values, ok = _batch(theta, ref, reward, value, seqs, usable, cache)
        n_ok = group if usable is None else sum(usable)
        out = rl.surrogate(logp, ref_logp, logp.detach(), r, mask, usable=ok,
                           values=values if baseline == "value" else None, group_ids=["p"] * group, beta=BETA,
                           estimator=estimator, baseline=baseline, is_clip=2.0, how="sequence_sum",
                           value_coef=0.0, num_tokens=float(mask.sum()), num_seqs=n_ok)
        total = total + logp.sum().detach().exp() * out["loss"]  # P(group) detached: E[grad L]
    (grad,) = torch.autograd.grad(total, theta)
    return grad


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("baseline", ["none", "value"])
def test_expected_gradient_is_minus_grad_j(estimator, baseline):
    theta, ref, reward, value = _setup()
    (grad_j,) = torch.autograd.grad(_exact_objective(theta, ref, reward), theta)
    g = _expected_surrogate_grad(theta, ref, reward, value, estimator, baseline)
    assert grad_j.abs().max() > 0.05
    torch.testing.assert_close(g, -grad_j, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_group_mean_leave_one_out_baseline_is_unbiased(estimator):
    """Over every pair of responses to one prompt (225 pairs): the leave-one-out baseline of
    one sample is independent of it, so the expected gradient is still -grad J."""
    theta, ref, reward, value = _setup(1)
    (grad_j,) = torch.autograd.grad(_exact_objective(theta, ref, reward), theta)
    g = _expected_surrogate_grad(theta, ref, reward, value, estimator, "group_mean", group=2)
    torch.testing.assert_close(g, -grad_j, atol=1e-5, rtol=1e-4)


def test_unusable_rows_leave_the_gradient_exact():
    """A group of 3 whose middle sample has no usable reward: over all 3375 groups the loss
    of the 2 usable ones (normalised by 2 usable rows) still has expected gradient -grad J."""
    theta, ref, reward, value = _setup(2)
    (grad_j,) = torch.autograd.grad(_exact_objective(theta, ref, reward), theta)
    g = _expected_surrogate_grad(theta, ref, reward, value, "k3", "group_mean", group=3,
                                 usable=[True, False, True])
    torch.testing.assert_close(g, -grad_j, atol=1e-5, rtol=1e-4)


def test_k3_needs_both_its_parts():
    """k3 only in the return (the old learner) or only as a loss term (GRPO-style) is biased:
    both miss half of grad KL, and near the reference the first nearly cancels out."""
    theta, ref, reward, _ = _setup()
    zero = {s: 0.0 for s in SEQS}  # the KL's gradient alone
    (grad_kl,) = torch.autograd.grad(-_exact_objective(theta, ref, zero) / BETA, theta)
    parts = {}
    for name in ("return", "loss"):
        total = torch.zeros(())
        for s in SEQS:
            logp, ref_logp, r, mask, _, _ = _batch(theta, ref, zero, None, [s])
            kl = rl.kl_per_token(logp, ref_logp, "k3") * mask
            if name == "return":
                z = rl.returns_to_go(r, kl.detach(), mask, BETA)
                per = rl.policy_loss(logp, z, torch.ones_like(mask), mask)
            else:
                per = rl.kl_loss(kl, torch.ones_like(mask), mask, BETA)
            total = total + logp.sum().detach().exp() * rl.aggregate(per, mask, "sequence_sum", 1.0, 1)
        (parts[name],) = torch.autograd.grad(total, theta)
    torch.testing.assert_close((parts["return"] + parts["loss"]) / BETA, grad_kl, atol=1e-5, rtol=1e-4)
    for part in parts.values():
        assert (part / BETA - grad_kl).norm() > 0.1 * grad_kl.norm()


def _pairwise_expected_grad(k: int, baseline: str, pairs: bool, beta: float) -> torch.Tensor:
    """E[grad L] over every group of k i.i.d. one-token responses (3 arms) whose samples 2i and
    2i+1 are compared: r_a, r_b = pairwise_rewards(P(a better than b)), r_b = -r_a."""
    from rlaif_ray.feedback.scoring import pairwise_rewards

    g = torch.Generator().manual_seed(1)
    theta = torch.randn(3, generator=g).requires_grad_(True)
    ref = torch.randn(3, generator=g)
    pref = torch.rand(3, 3, generator=g)
    pref = (pref + 1 - pref.T) / 2  # P(a better than b): pref[a, b] + pref[b, a] = 1
    total = torch.zeros(())
    for arms in itertools.product(range(3), repeat=k):
        logp = torch.log_softmax(theta, -1)[list(arms)][:, None]
        ref_logp = torch.log_softmax(ref, -1)[list(arms)][:, None]
        r = [float(x) for i in range(0, k, 2) for x in pairwise_rewards(pref[arms[i], arms[i + 1]])]
        out = rl.surrogate(logp, ref_logp, logp.detach(), torch.tensor(r), torch.ones(k, 1), group_ids=["p"] * k,
                           pair_ids=[i // 2 for i in range(k)] if pairs else None, beta=beta, baseline=baseline,
                           how="sequence_sum", num_tokens=k, num_seqs=k)
        total = total + logp.detach().sum().exp() * out["loss"]
    return torch.autograd.grad(total, theta)[0]


@pytest.mark.parametrize("k", [2, 4])
def test_pairwise_rewards_with_the_group_baseline_keep_the_exact_expected_gradient(k):
    """Pairwise rewards are zero-sum within a pair, so a sample's leave-one-out baseline holds
    its own reward through its partner's. Leaving the pair out (what the learner does,
    rl.learner.pair_ids) gives the expected gradient of no baseline, KL term included;
    leaving only the sample out scales the reward's part by k/(k-1): 2x at k = 2, 4/3 at 4."""
    exact = _pairwise_expected_grad(k, "none", pairs=True, beta=BETA)
    fixed = _pairwise_expected_grad(k, "group_mean", pairs=True, beta=BETA)
    torch.testing.assert_close(fixed, exact, atol=1e-6, rtol=1e-5)
    biased = _pairwise_expected_grad(k, "group_mean", pairs=False, beta=0.0)
    torch.testing.assert_close(biased, k / (k - 1) * _pairwise_expected_grad(k, "none", pairs=False, beta=0.0),
                               atol=1e-6, rtol=1e-5)


def test_the_learner_pairs_pairwise_rows_and_leaves_direct_rows_alone():
    from rlaif_ray.rl.learner import pair_ids

    rows = [{"rollout_id": f"b0:p{p}:{s}", "sample_index": s,
             "reward_meta": '{"mode": "pairwise", "vs": 1}' if p == 0 else '{"mode": "direct"}'}
            for p in range(2) for s in range(4)]
    ids = pair_ids(rows)
    assert ids[0] == ids[1] != ids[2] == ids[3] and len(set(ids[4:])) == 4
