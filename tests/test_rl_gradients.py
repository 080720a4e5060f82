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
