"""Contrast metrics of a batch (docs/cost.md §8): how much of it carries a learning signal."""

from __future__ import annotations

import torch
from torch import Tensor


def effective_ratio(rewards: Tensor, group_ids: Tensor) -> float:
    """Fraction of groups with ≥1 success (r > 0) and ≥1 failure (r ≤ 0); rewards, group_ids (N,).

    Rewards are expected binary (docs/README.md §2); an empty batch gives 0.0.
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_ids must both have shape (N,); got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    if rewards.numel() == 0:
        return 0.0
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    success = (rewards > 0).long()
    n_success = torch.zeros(n_groups, dtype=torch.long).index_add_(0, inverse, success)
    n_total = torch.bincount(inverse, minlength=n_groups)
    mixed = (n_success > 0) & (n_success < n_total)
    return mixed.float().mean().item()


def zero_advantage_fraction(token_adv: Tensor, mask: Tensor, tol: float = 1e-8, weights: Tensor | None = None) -> float:
    """Share of loss-mask tokens with |A| < tol: token_adv, mask (B, T). No mask tokens gives 0.0.

    `weights` (B,) counts row b's entries `weights[b]` times: with one column per trajectory holding
    its advantage and weights = its number of loss-mask tokens, this equals the padded-token form."""
    on = mask.bool()
    w = torch.ones(on.shape[0]) if weights is None else weights.to(torch.float64)
    w = w.to(torch.float64)[:, None].expand_as(on)
    n = float((w * on).sum())
    if n == 0:
        return 0.0
    return float((w * ((token_adv.abs() < tol) & on)).sum()) / n
