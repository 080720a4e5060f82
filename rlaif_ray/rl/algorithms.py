"""The losses of rl.algorithm other than REINFORCE (docs/method.md §3.1-§3.4), as small pure
functions on padded [B, T] tensors; REINFORCE and RLOO (REINFORCE with the leave-one-out
baseline) are rl/losses.py's `surrogate`.

* grpo (Shao et al. 2024, DeepSeekMath): the advantage of every token of a response is its
  reward normalised within its prompt's group, (r - mean) / (std + eps) (Dr. GRPO, Liu et al.
  2025: without the std); the PPO clipped ratio against the sampling policy; the KL to the
  reference as a loss term beta * k3 (the GRPO paper's estimator), several epochs of
  mini-batches over one batch.
* ppo (Schulman et al. 2017; RLHF as in Ziegler et al. 2019 / Ouyang et al. 2022): per-token
  rewards -beta * kl_t with (1 - beta) r added on the last token, advantages by GAE
  (Schulman et al. 2016) from a value head, whitened over the batch, the clipped ratio and
  a clipped value loss.
* online_dpo (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"):
  pairs sampled from the policy, labelled by the AI labeler's debiased soft preference
  p = P(a > b) (both orders, docs/method.md §1), trained with the DPO loss (Rafailov et al.
  2023) on soft labels, -[p log sigma(h) + (1 - p) log sigma(-h)], h = dpo_beta * the
  difference of the two responses' log-ratios to the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALGORITHMS = ("reinforce", "rloo", "grpo", "ppo", "online_dpo")


def group_normalised_advantages(reward: torch.Tensor, group_ids: list, usable: torch.Tensor | None = None,
                                scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage of each sequence [B]: its reward minus the mean of its group's usable
    rewards, divided by their (unbiased) standard deviation + eps when `scale_std`; 0 for an
    unusable row and for a group of one usable row (nothing to compare with)."""
    ok = torch.ones_like(reward, dtype=torch.bool) if usable is None else usable.bool()
    out = torch.zeros_like(reward)
    groups: dict = {}
    for i, g in enumerate(group_ids):
        if ok[i]:
            groups.setdefault(g, []).append(i)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        r = reward[idx]
        a = r - r.mean()
        out[idx] = a / (r.std() + eps) if scale_std else a
    return out


def clipped_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                        clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token loss -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A), rho =
    pi / pi_old, and where the clip is active (bool: the clipped term is the smaller one and
    the ratio is outside the band, so that token has no gradient). `adv` [B, T] or [B]."""
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - logp_old)
    plain, clipped = ratio * adv.detach(), ratio.clamp(1 - clip_low, 1 + clip_high) * adv.detach()
    active = (clipped < plain) & (mask > 0)
    return -torch.minimum(plain, clipped) * mask, active


def token_rewards(reward: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """PPO-RLHF's per-token rewards: -beta * kl_t on every response token and (1 - beta) r
    added on the last one (the objective (1 - beta) r - beta KL of docs/method.md §3)."""
    last = mask.cumsum(1) == mask.sum(1, keepdim=True)
    last = last & (mask > 0)
    return (-beta * kl + (1 - beta) * reward[:, None] * last) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) on right-padded rows:
    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last token), A_t = sum_k (gamma
    lam)^k delta_{t+k}; returns (A, A + V), the value targets. With gamma = lam = 1 and
    V = 0, A_t is the return to go."""
    values = values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        nxt = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor | None = None,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; `moments` = [sum, sum of squares, count]
    when they come from more than these rows (every learner rank's, added up)."""
    if moments is None:
        moments = whiten_moments(x, mask)
    s, sq, n = (float(v) for v in moments)
    if n < 2:
        return x * mask
    mean = s / n
    var = max(sq / n - mean * mean, 0.0) * n / (n - 1)
    return (x - mean) / (var ** 0.5 + eps) * mask


def whiten_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares, count] of the masked entries (ranks add theirs before `whiten`)."""
    xm = x * mask
    return torch.stack([xm.sum(), (xm * x).sum(), mask.sum()]).double()


def clipped_value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-token 0.5 * max((V - R)^2, (V_clipped - R)^2) with V_clipped = V_old +
    clip(V - V_old, -clip, clip): the value head moves at most `clip` from where it stood
    when the batch was sampled (PPO2's value clipping)."""
    v_clip = values_old + (values - values_old).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns.detach()).pow(2), (v_clip - returns.detach()).pow(2)) * mask


def pair_index(pair_ids: list, usable: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """Rows (first, second) of every pair whose two rows are both usable, in order of first
    appearance; a pair id must name exactly two rows."""
    rows: dict = {}
    for i, p in enumerate(pair_ids):
        rows.setdefault(p, []).append(i)
    bad = [p for p, idx in rows.items() if len(idx) != 2]
    if bad:
        raise ValueError(f"online_dpo: pairs of other than two rows: {bad[:3]}")
    ok = [True] * len(pair_ids) if usable is None else [bool(u) for u in usable.tolist()]
    keep = [idx for idx in rows.values() if ok[idx[0]] and ok[idx[1]]]
    return [a for a, _ in keep], [b for _, b in keep]


def dpo_margins(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, first: list[int],
                second: list[int], beta: float) -> torch.Tensor:
    """h = beta * [(log pi(a) - log pi_ref(a)) - (log pi(b) - log pi_ref(b))] per pair, each
    log-probability summed over the response's tokens."""
    ratio = ((logp - logp_ref) * mask).sum(1)
    return beta * (ratio[first] - ratio[second])


def soft_dpo_loss(margin: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-pair DPO loss on a soft label p = P(a > b): the cross-entropy
    -[p log sigma(h) + (1 - p) log sigma(-h)] (p = 1 is the DPO loss of Rafailov et al.);
    minimised at h = logit(p), so a 50/50 label pulls the two log-ratios together."""
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin))


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, adv: torch.Tensor,
                      mask: torch.Tensor, *, algorithm: str, beta: float, estimator: str = "k1",
                      values: torch.Tensor | None = None, values_old: torch.Tensor | None = None,
                      returns: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                      value_clip: float = 0.2, value_coef: float = 0.5, how: str = "token_mean",
                      num_tokens: float, num_seqs: float) -> dict:
    """The loss of one grpo or ppo mini-batch ([B, T]; `mask` already without unusable rows;
    `adv` [B] (grpo) or [B, T] (ppo), computed before the batch's first update).
    grpo: the clipped policy loss + beta * k3 to the reference as a loss term. ppo: the
    clipped policy loss + value_coef * the clipped value loss (the KL is in `adv` through
    the per-token rewards; a k3 estimate also enters the loss, its pathwise part, as in
    rl/losses.py). Returns the loss, its parts and, detached, what the metrics read."""
    from rlaif_ray.rl.losses import aggregate, kl_loss, kl_needs_pathwise_term, kl_per_token

    agg = dict(mask=mask, how=how, num_tokens=num_tokens, num_seqs=num_seqs)
    pg_tok, active = clipped_policy_loss(logp, logp_old, adv, mask, clip_low, clip_high)
    pg = aggregate(pg_tok, **agg)
    zero = torch.zeros((), device=logp.device)
    kl_live = kl_per_token(logp, logp_ref, "k3" if algorithm == "grpo" else estimator) * mask
    if algorithm == "grpo" or kl_needs_pathwise_term(estimator):
        kl_term = aggregate(kl_loss(kl_live, torch.ones_like(mask), mask, beta), **agg)
    else:
        kl_term = zero
    vl = aggregate(clipped_value_loss(values, values_old, returns, mask, value_clip), **agg) \
        if algorithm == "ppo" else zero
    adv_t = (adv[:, None] if adv.dim() == 1 else adv) * mask
    return {"loss": pg + kl_term + value_coef * vl, "pg_loss": pg, "kl_loss": kl_term, "value_loss": vl,
            "mask": mask, "kl": kl_live.detach(), "advantages": adv_t.detach(),
            "returns": (returns if returns is not None else adv_t).detach() * mask,
            "ratio": torch.exp(logp.detach() - logp_old) * mask, "clipped": active.sum()}


def online_dpo_surrogate(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, pair_ids: list,
                         pref: torch.Tensor, *, usable: torch.Tensor | None = None, dpo_beta: float,
                         estimator: str = "k1", num_seqs: float) -> dict:
    """The soft-label DPO loss of the batch's pairs ([B, T]; `pref` [B] each row's P(it is
    preferred over its partner), the pairwise labeler's debiased preference), summed over
    the usable pairs and divided by the global batch's usable pairs (num_seqs / 2), so
    that ranks' gradients add up to the one-rank gradient."""
    from rlaif_ray.rl.losses import kl_per_token, usable_mask

    mask = usable_mask(mask, usable)
    first, second = pair_index(pair_ids, usable)
    margin = dpo_margins(logp, logp_ref, mask, first, second, dpo_beta)
    loss = soft_dpo_loss(margin, pref[first].to(margin.dtype)).sum() / max(num_seqs / 2, 1)
    zero = torch.zeros((), device=logp.device)
    flat = torch.zeros_like(mask)
    return {"loss": loss, "pg_loss": loss, "kl_loss": zero, "value_loss": zero, "mask": mask,
            "kl": kl_per_token(logp.detach(), logp_ref, estimator) * mask, "advantages": flat, "returns": flat,
            "ratio": mask.clone(), "margin_sum": margin.detach().sum(),
            "pref_agree": ((margin.detach() > 0) == (pref[first] > 0.5)).sum()}
