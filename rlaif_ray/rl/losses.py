"""RL math (docs/method.md, section 3), as small pure functions on padded [B, T] tensors.

REINFORCE with a baseline; terminal reward; gamma = 1; objective
    J = (1 - beta) E[r] - beta KL(pi || pi_ref),
with the KL of whole responses, KL(pi || pi_ref) = E_pi[sum_t kl_t]. Its gradient has two parts:

* the score-function part, E[sum_t grad log pi(a_t) * sum_{s >= t} kl_s]: the per-token KL
  estimate is folded into the return (Jaques et al.),
      Z_t = (1 - beta) r - beta * sum_{s >= t} kl_s   (detached);
* the pathwise part, E[sum_t grad kl_t], from the estimate's own dependence on the policy.
  For k1 = log pi - log pi_ref it is E[grad log pi] = 0, so the return alone is exact. For
  k3 it is not zero: k3 in the return alone follows grad KL(pi || ref) minus the token-level
  grad KL(ref || pi) (almost nothing near the reference), and k3 as a loss term alone
  (GRPO-style) follows the token-level grad KL(ref || pi), not grad KL(pi || ref). So k3 goes
  into both: the return and a loss term beta * k3_t with its gradient through log pi. Only
  the two together are the exact gradient (tests/test_rl_gradients.py checks every
  estimator and baseline against -grad J by enumerating a tiny policy's sequences).

`surrogate` composes these into the loss the learner differentiates.

beta is fixed (rl.kl_control: fixed) or steered between steps by `adaptive_kl_beta`
(rl.kl_control: adaptive), the proportional controller of Ziegler et al. 2019 (TRL's
AdaptiveKLController): after each step, with the step's measured KL per sequence,
    e = clip(KL / kl_target - 1, -0.2, 0.2),    c <- c * (1 + e * n / kl_horizon),
n the completions the KL was measured on. c is Ziegler's coefficient, the KL's weight
relative to the reward's: here c = beta / (1 - beta), since (1 - beta) r - beta KL =
(1 - beta) (r - c KL); so beta stays inside (0, 1), and its relative change is (1 - beta)
times c's (for beta = 0.05, 95% of the multiplicative update applied to beta itself).
"""
from __future__ import annotations

import math

import torch

BASELINES = ("none", "value", "group_mean")
KL_ERROR_CLIP = 0.2  # Ziegler et al. 2019: the proportional error is clipped to +-20%


def adaptive_kl_beta(beta: float, kl: float, target: float, horizon: float, n_steps: float,
                     lo: float = 0.0, hi: float = 1.0) -> float:
    """The next beta of the adaptive KL controller (Ziegler et al. 2019; TRL's
    AdaptiveKLController): `kl` the KL per sequence measured at `beta` on `n_steps`
    completions, `target` the KL per sequence to steer toward, `horizon` the completions
    over which a sustained error of +-20% changes the coefficient by a factor of e^(+-0.2).
    With e = clip(kl / target - 1, -0.2, 0.2) the coefficient c = beta / (1 - beta) (the
    KL's weight relative to the reward's, see the module docstring) becomes
    c * (1 + e * n_steps / horizon): KL above target raises beta, below lowers it, at target
    leaves it. Needs 0 < beta < 1 and n_steps <= horizon (RLConfig checks both). The result
    stays within [lo, hi] (rl.kl_beta_min, rl.kl_beta_max): a target the run never reaches
    would otherwise decay beta by up to 20% a step without end (0.05 to 0.0036 in 12 steps
    at a horizon of one step's completions)."""
    if not 0 < beta < 1:
        raise ValueError(f"adaptive KL control needs 0 < beta < 1 (got {beta})")
    if not (target > 0 and horizon > 0 and 0 <= n_steps <= horizon):
        raise ValueError(f"adaptive KL control needs target > 0 and 0 <= n_steps <= horizon "
                         f"(got target {target}, n_steps {n_steps}, horizon {horizon})")
    if kl != kl:  # NaN: no measurement, no move
        return beta
    error = min(max(kl / target - 1, -KL_ERROR_CLIP), KL_ERROR_CLIP)
    mult = 1 + error * n_steps / horizon
    if mult == 1:  # at target, or nothing measured: beta itself (not its round trip through c)
        return beta
    c = beta / (1 - beta) * mult
    # strictly inside (0, 1) even where c / (1 + c) rounds to an end, so the next update can run
    return min(max(c / (1 + c), lo, math.nextafter(0.0, 1.0)), hi, math.nextafter(1.0, 0.0))


def kl_per_token(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi: for a token drawn from pi
    given its prefix, its expectation is the KL of that prefix's next-token distributions.
    k1 = log pi - log pi_ref (can be negative);
    k3 = q - 1 - log q with q = pi_ref / pi (always >= 0, lower variance near the reference).
    Differentiable in `logp`; for the gradient each needs see the module docstring."""
    log_ratio = logp - logp_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"rl.kl_estimator: unknown estimator {estimator!r} (k1 or k3)")


def kl_needs_pathwise_term(estimator: str) -> bool:
    """Whether the estimator's own gradient has a nonzero expectation (k3), so that it must
    enter the loss as well as the return; for k1 it is E[grad log pi] = 0."""
    return estimator != "k1"


def returns_to_go(reward: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Z_t = (1 - beta) r - beta * sum_{s >= t} kl_s on the response tokens; 0 on padding."""
    kl = kl * mask
    kl_to_go = torch.flip(torch.cumsum(torch.flip(kl, [1]), 1), [1])
    return ((1 - beta) * reward[:, None] - beta * kl_to_go) * mask


def group_mean_baseline(values: torch.Tensor, group_ids: list, usable: torch.Tensor | None = None,
                        pair_ids: list | None = None) -> torch.Tensor:
    """For each sequence, the mean of the values of the *other usable* sequences of its
    group, 0 when there are none (leave-one-out keeps the baseline independent of the
    sample, so the gradient is unbiased). `usable` [B] (bool or 0/1): rows whose reward
    could not be read take no part in anyone's baseline. `pair_ids`: rows that share an id
    are left out of each other's baseline too. Pairwise rewards need it: they are zero-sum
    within a pair (r_b = -r_a), so a partner's reward carries the sample's own, and leaving
    only the sample out scales the expected gradient by k/(k-1) (2x at k = 2; docs/method.md §5)."""
    ok = torch.ones_like(values) if usable is None else usable.to(values.dtype)
    out = torch.zeros_like(values)
    units = list(range(len(group_ids))) if pair_ids is None else pair_ids
    groups: dict = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    for idx in groups.values():
        code = {u: n for n, u in enumerate(dict.fromkeys(units[i] for i in idx))}
        unit = torch.tensor([code[units[i]] for i in idx], device=values.device)
        others = (unit[:, None] != unit[None, :]).to(values.dtype) * ok[idx][None, :]  # [i, j]: j counts for i
        n = others.sum(1)
        out[idx] = torch.where(n > 0, (others * values[idx][None, :]).sum(1) / n.clamp(min=1), torch.zeros_like(n))
    return out


def truncated_ratio(logp: torch.Tensor, logp_behaviour: torch.Tensor, clip: float) -> torch.Tensor:
    """Importance ratio pi_theta / mu per token, truncated at `clip` and detached: corrects
    batches sampled by an older policy (max_staleness > 0). On-policy it is 1."""
    return torch.exp(logp.detach() - logp_behaviour).clamp(max=clip)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, num_tokens: float,
              num_seqs: float) -> torch.Tensor:
    """Sum over the local rows, normalised by the *global* batch size (usable tokens or
    usable rows, over every learner rank), so that gradients summed across learner workers
    equal the single-worker gradient. token_mean: over every token of the batch (long
    responses weigh more; DAPO); sequence_mean: each response's token mean, averaged over
    responses (the GRPO paper's); sequence_sum: each response's sum, averaged over responses."""
    if how == "sequence_mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    total = (per_token * mask).sum()
    return total / num_tokens if how == "token_mean" else total / num_seqs


def policy_loss(logp: torch.Tensor, advantages: torch.Tensor, ratio: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Per-token -ratio * stopgrad(A_t) * log pi(a_t | x_t)."""
    return -(ratio * advantages.detach() * logp) * mask


def kl_loss(kl: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token beta * ratio * kl_t with `kl` differentiable in log pi: the pathwise part of
    beta * grad KL (for k3; see the module docstring). `ratio` (detached) reweights a lagged
    batch's tokens to the current policy, as in `policy_loss`."""
    return beta * ratio * kl * mask


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token (Z_t - V(x_t))^2."""
    return (returns.detach() - values).pow(2) * mask


def advantages(returns: torch.Tensor, mask: torch.Tensor, baseline: str, values: torch.Tensor | None,
               group_ids: list | None, usable: torch.Tensor | None = None, pair_ids: list | None = None) -> torch.Tensor:
    """A_t = Z_t - b_t with b from the value model, the group's leave-one-out (leave-pair-out
    with `pair_ids`) mean return over its usable samples, or none (b = 0)."""
    if baseline == "none":
        return returns * mask
    if baseline == "value":
        if values is None:
            raise ValueError("rl.baseline=value needs value estimates")
        return (returns - values.detach()) * mask
    if baseline == "group_mean":
        b = group_mean_baseline(returns[:, 0], group_ids, usable, pair_ids)  # Z_0: the sequence's whole return
        return (returns - b[:, None]) * mask
    raise ValueError(f"rl.baseline: unknown baseline {baseline!r} (one of {', '.join(BASELINES)})")


def usable_mask(mask: torch.Tensor, usable: torch.Tensor | None) -> torch.Tensor:
    """The response mask with the rows whose reward could not be read zeroed."""
    return mask if usable is None else mask * usable.to(mask.dtype)[:, None]


def usable_reward(reward: torch.Tensor, usable: torch.Tensor | None) -> torch.Tensor:
    """Rewards with the unusable rows' set to 0 (theirs may be anything, NaN included)."""
    return reward if usable is None else torch.where(usable.bool(), reward, torch.zeros_like(reward))


def return_sums(logp: torch.Tensor, logp_ref: torch.Tensor, reward: torch.Tensor, mask: torch.Tensor,
                usable: torch.Tensor | None, beta: float, estimator: str) -> torch.Tensor:
    """[sum of Z_t over the usable tokens, their count]: what a value head's starting bias
    (their mean) is computed from; sums, so that learner ranks can add theirs."""
    mask, reward = usable_mask(mask, usable), usable_reward(reward, usable)
    z = returns_to_go(reward, kl_per_token(logp.detach(), logp_ref, estimator) * mask, mask, beta)
    return torch.stack([z.sum(), mask.sum()])


def surrogate(logp: torch.Tensor, logp_ref: torch.Tensor, logp_behaviour: torch.Tensor, reward: torch.Tensor,
              mask: torch.Tensor, *, usable: torch.Tensor | None = None, values: torch.Tensor | None = None,
              group_ids: list | None = None, pair_ids: list | None = None, beta: float, estimator: str = "k1",
              baseline: str = "group_mean",
              is_clip: float = 2.0, how: str = "token_mean", value_coef: float = 0.5, num_tokens: float,
              num_seqs: float) -> dict:
    """The loss of one REINFORCE update on a batch ([B, T] tensors; `logp` and `values`
    carry the gradient), as the learner differentiates it. Its expected gradient is
    -grad J (times 1 / tokens per sequence for token_mean with fixed lengths).

    `mask`: the response tokens; `usable` [B]: rows whose reward could be read (the others
    stay out of the loss, the baselines and the metrics). `pair_ids`: pairwise rewards' pairs,
    left out of each other's group baseline (group_mean_baseline). `num_tokens` / `num_seqs`: usable
    tokens / usable rows of the global batch (over every learner rank).

    Returns loss (pg + kl_loss + value_coef * value_loss), its parts, and the detached
    per-token mask, kl estimate, returns, advantages and ratio (for metrics)."""
    mask, reward = usable_mask(mask, usable), usable_reward(reward, usable)
    kl_live = kl_per_token(logp, logp_ref, estimator) * mask  # differentiable in logp
    kl = kl_live.detach()
    returns = returns_to_go(reward, kl, mask, beta)
    adv = advantages(returns, mask, baseline, values, group_ids, usable, pair_ids)
    ratio = truncated_ratio(logp, logp_behaviour, is_clip) * mask
    agg = dict(mask=mask, how=how, num_tokens=num_tokens, num_seqs=num_seqs)
    pg = aggregate(policy_loss(logp, adv, ratio, mask), **agg)
    kl_term = aggregate(kl_loss(kl_live, ratio, mask, beta), **agg) if kl_needs_pathwise_term(estimator) \
        else torch.zeros((), device=logp.device)
    vl = aggregate(value_loss(values, returns, mask), **agg) if values is not None \
        else torch.zeros((), device=logp.device)
    return {"loss": pg + kl_term + value_coef * vl, "pg_loss": pg, "kl_loss": kl_term, "value_loss": vl,
            "mask": mask, "kl": kl, "returns": returns, "advantages": adv.detach(), "ratio": ratio}
