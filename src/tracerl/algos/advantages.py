"""Group-relative advantage estimators (METHODS.md §2).

Every estimator has the same signature so the trainer can look it up by name:

    fn(rewards (N,), group_ids (N,), *, eps=1e-6, singleton="zero") -> advantages (N,)

One value per trajectory (leaf); `broadcast_to_tokens` spreads it over the leaf's loss-mask tokens.
Group ids are arbitrary integers (not necessarily contiguous or sorted).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tracerl.registry import Registry

AdvantageFn = Callable[..., Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")

SINGLETON_MODES = ("zero", "raw")


def _group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-trajectory (mean, unbiased std, size, all_equal) of its group; each (N,)."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both have shape (N,); got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    r = rewards.to(torch.float64)
    size = counts.to(torch.float64)[inverse]
    mean = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inverse, r)[inverse] / size
    sq_dev = (r - mean) ** 2
    var = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inverse, sq_dev)[inverse]
    std = torch.sqrt(var / (size - 1).clamp(min=1))
    # Equality is tested on the raw rewards: mean arithmetic can leave a residue like 1e-17
    # that the std division would blow up into a spurious advantage.
    gmax = torch.full((n_groups,), -torch.inf, dtype=r.dtype).scatter_reduce(0, inverse, r, "amax")
    gmin = torch.full((n_groups,), torch.inf, dtype=r.dtype).scatter_reduce(0, inverse, r, "amin")
    all_equal = (gmax == gmin)[inverse]
    return mean, std, size, all_equal


def _finish(adv: Tensor, rewards: Tensor, size: Tensor, all_equal: Tensor, singleton: str) -> Tensor:
    if singleton not in SINGLETON_MODES:
        raise ValueError(f"unknown singleton mode {singleton!r}; valid: {', '.join(SINGLETON_MODES)}")
    adv = torch.where(all_equal, torch.zeros_like(adv), adv)
    if singleton == "raw":
        adv = torch.where(size == 1, rewards.to(adv.dtype), adv)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    return adv.to(out_dtype)


@ADVANTAGES.register("grpo")
def grpo(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6, singleton: str = "zero") -> Tensor:
    """GRPO advantage `(r − mean_g) / (std_g + eps)`, std unbiased (DeepSeekMath, arXiv 2402.03300).

    rewards (N,), group_ids (N,) -> (N,). A group whose rewards are all equal gets exactly 0;
    a singleton group gets 0, or its raw reward with `singleton="raw"` (Tree-GRPO's convention).
    """
    mean, std, size, all_equal = _group_stats(rewards, group_ids)
    adv = (rewards.to(mean.dtype) - mean) / (std + eps)
    return _finish(adv, rewards, size, all_equal, singleton)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6, singleton: str = "zero") -> Tensor:
    """Dr.GRPO advantage `r − mean_g`, no std division (arXiv 2503.20783).

    rewards (N,), group_ids (N,) -> (N,). `eps` is accepted for a uniform signature and unused.
    All-equal and singleton groups are handled as in `grpo`.
    """
    mean, _, size, all_equal = _group_stats(rewards, group_ids)
    adv = rewards.to(mean.dtype) - mean
    return _finish(adv, rewards, size, all_equal, singleton)


def broadcast_to_tokens(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Spread per-trajectory advantages over loss-mask tokens: (N,), (N, T) -> (N, T), 0 off-mask."""
    if advantages.dim() != 1 or loss_mask.dim() != 2 or loss_mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"expected advantages (N,) and loss_mask (N, T); got {tuple(advantages.shape)} "
            f"and {tuple(loss_mask.shape)}"
        )
    return advantages[:, None] * loss_mask.to(advantages.dtype)
