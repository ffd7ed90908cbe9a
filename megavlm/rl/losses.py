"""PPO's advantages and per-token losses (REFERENCE 7), written from the formulas.

All tensors are ``[b, t]`` over response positions with a ``mask`` (1 = a generated token
the loss sees). Losses come back *per token* (zero where masked): the trainer sums them and
megatron-core's per-token mode divides by the global count of response tokens, which is
token-level aggregation over the global batch whatever the layout.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation; returns ``(advantages, returns)``.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, where the
    "next" position is the next *unmasked* one: a masked position passes the running value
    and advantage through unchanged (so masked tokens inside a response change nothing) and
    gets the advantage of the next real token. With gamma = lam = 1 and a terminal reward R,
    ``A_t = R - V_t`` (Monte-Carlo return minus value). Returns ``= A + V`` (value targets).
    """
    mask = mask.to(values.dtype)
    b, t = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(b)
    running = values.new_zeros(b)
    for i in reversed(range(t)):
        m = mask[:, i]
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        step = delta + gamma * lam * running
        running = m * step + (1 - m) * running
        next_value = m * values[:, i] + (1 - m) * next_value
        advantages[:, i] = running
    returns = advantages + values
    return advantages * mask, returns * mask


def terminal_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """``[b, t]`` token rewards: each row's scalar score on its last unmasked token."""
    mask = mask.float()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * mask).argmax(dim=1)  # index of the last response token
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0]), last] = scores.to(out.dtype)
    return out * mask


def grpo_advantages(scores: Tensor, groups: Tensor, mask: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Critic-free group-normalized advantage (GRPO): ``(r - mean_g) / (std_g + eps)`` over the
    rollouts of each prompt (``groups [b]`` prompt index), on every response token."""
    scores = scores.float()
    adv = torch.zeros_like(scores)
    for g in groups.unique():
        rows = groups == g
        group = scores[rows]
        std = group.std(unbiased=True) if group.numel() > 1 else group.new_zeros(())
        adv[rows] = (group - group.mean()) / (std + eps)
    return adv[:, None] * mask.float()


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    mask = mask.float()
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = ((x - mean) ** 2 * mask).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def tis_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, cap: float) -> tuple[Tensor, Tensor]:
    """Truncated importance weights ``min(exp(old_train - rollout), cap)``, detached, and the
    fraction of response tokens where the cap bit (the out-of-bound fraction)."""
    ratio = torch.exp((old_logp - rollout_logp).detach().float())
    mask = mask.float()
    out_of_bound = ((ratio > cap).float() * mask).sum() / mask.sum().clamp(min=1)
    return ratio.clamp(max=cap) * mask, out_of_bound


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
    clip_eps: float, clip_eps_high: float | None = None, dual_clip: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token clipped surrogate ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A)``; with
    ``dual_clip = c > 1`` tokens with A < 0 are bounded by ``-c A`` (dual clip). Returns the
    per-token loss (times ``is_weights`` if given; zero where masked) and a 0/1 per-token
    "clipped" indicator (the clip fraction's numerator)."""
    mask = mask.float()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped).float()
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = torch.minimum(loss, bound)
        was_clipped = torch.where((advantages < 0) & (loss > bound), torch.ones_like(was_clipped), was_clipped)
        loss = torch.where(advantages < 0, dual, loss)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    return loss * mask, was_clipped * mask


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_eps: float | None) -> Tensor:
    """Per-token ``0.5 max((v - R)^2, (clip(v, v_old +- eps) - R)^2)`` (unclipped without eps)."""
    loss = (values - returns) ** 2
    if clip_eps is not None:
        clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * loss * mask.float()


def kl_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    d = ref_logp - logp
    return (torch.exp(d) - d - 1) * mask.float()


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    mean = (returns * mask).sum() / n
    var = ((returns - mean) ** 2 * mask).sum() / n
    resid = returns - values
    rmean = (resid * mask).sum() / n
    rvar = ((resid - rmean) ** 2 * mask).sum() / n
    return float(1 - rvar / var) if var > 0 else float("nan")
