"""RL math (METHOD.md section 3), as small pure functions on padded [B, T] tensors.

REINFORCE with a baseline; terminal reward; gamma = 1; objective (1 - beta) r - beta KL.
The KL to the frozen initial policy is folded into the return per token (Jaques et al.):
    Z_t = (1 - beta) r - beta * sum_{s >= t} kl_s
"""
from __future__ import annotations

import torch


def kl_per_token(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.
    k1 = log pi - log pi_ref (unbiased, can be negative);
    k3 = r - 1 - log r with r = pi_ref / pi (unbiased, always >= 0, lower variance)."""
    log_ratio = logp - logp_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"rl.kl_estimator: unknown estimator {estimator!r} (k1 or k3)")


def returns_to_go(reward: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Z_t = (1 - beta) r - beta * sum_{s >= t} kl_s on the response tokens; 0 on padding."""
    kl = kl * mask
    kl_to_go = torch.flip(torch.cumsum(torch.flip(kl, [1]), 1), [1])
    return ((1 - beta) * reward[:, None] - beta * kl_to_go) * mask


def group_mean_baseline(values: torch.Tensor, group_ids: list) -> torch.Tensor:
    """For each sequence, the mean of the values of the *other* sequences of its group
    (leave-one-out keeps the baseline independent of the sample, so the gradient is unbiased)."""
    out = torch.empty_like(values)
    groups: dict = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    for idx in groups.values():
        vals = values[idx]
        if len(idx) == 1:
            out[idx] = 0.0
        else:
            out[idx] = (vals.sum() - vals) / (len(idx) - 1)
    return out


def truncated_ratio(logp: torch.Tensor, logp_behaviour: torch.Tensor, clip: float) -> torch.Tensor:
    """Importance ratio pi_theta / mu per token, truncated at `clip` and detached: corrects
    batches sampled by an older policy (max_staleness > 0). On-policy it is 1."""
    return torch.exp(logp.detach() - logp_behaviour).clamp(max=clip)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, num_tokens: float,
              num_seqs: float) -> torch.Tensor:
    """Sum over the local rows, normalised by the *global* batch size, so that gradients
    summed across learner workers equal the single-worker gradient."""
    total = (per_token * mask).sum()
    return total / num_tokens if how == "token_mean" else total / num_seqs


def policy_loss(logp: torch.Tensor, advantages: torch.Tensor, ratio: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """Per-token -ratio * stopgrad(A_t) * log pi(a_t | x_t)."""
    return -(ratio * advantages.detach() * logp) * mask


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token (Z_t - V(x_t))^2."""
    return (returns.detach() - values).pow(2) * mask


def advantages(returns: torch.Tensor, mask: torch.Tensor, baseline: str, values: torch.Tensor | None,
               group_ids: list | None) -> torch.Tensor:
    """A_t = Z_t - b_t with b from the value model or the group's leave-one-out mean return."""
    if baseline == "value":
        if values is None:
            raise ValueError("rl.baseline=value needs value estimates")
        return (returns - values.detach()) * mask
    if baseline == "group_mean":
        b = group_mean_baseline(returns[:, 0], group_ids)  # Z_0: the sequence's whole return
        return (returns - b[:, None]) * mask
    raise ValueError(f"rl.baseline: unknown baseline {baseline!r}")
