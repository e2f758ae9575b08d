"""Sampler/trainer mismatch correction: per-token weights on the policy loss (docs/engines.md §5).

An inference engine's log-probs of the tokens it sampled differ from the trainer's recomputation of
the same tokens (other kernels, other precision), so the rollouts come from a slightly different
policy μ than the π_old the PPO ratio is taken against. Truncated importance sampling (TIS) reweights
each token's policy loss by min(π_old / μ, C), detached: unbiased up to the cap, bounded variance.

A correction maps (old_logp, sample_logp, mask, cap) (B, T) each to (weights (B, T), detached scalar
statistics); the objective multiplies the policy loss's per-token values by the weights before its
aggregation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tracerl.registry import Registry

CorrectionFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
SAMPLER_CORRECTIONS: Registry[CorrectionFn] = Registry("sampler correction")


def _stats(w: Tensor, mask: Tensor, capped: Tensor) -> dict[str, Tensor]:
    m = mask.to(w.dtype)
    n = m.sum().clamp(min=1)
    return {"is_weight_mean": (w * m).sum() / n, "is_capped_frac": (capped.to(w.dtype) * m).sum() / n}


@SAMPLER_CORRECTIONS.register("none")
def no_correction(old_logp: Tensor, sample_logp: Tensor, mask: Tensor, *, cap: float = 2.0):
    """Weights 1: the rollouts are treated as samples of π_old (exact for the in-process HF backend)."""
    w = torch.ones_like(old_logp)
    return w, _stats(w, mask, torch.zeros_like(mask, dtype=torch.bool))


@SAMPLER_CORRECTIONS.register("tis")
def truncated_is(old_logp: Tensor, sample_logp: Tensor, mask: Tensor, *, cap: float = 2.0):
    """Truncated importance sampling: w = min(exp(old_logp − sample_logp), cap), 0 off the mask."""
    if cap <= 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    with torch.no_grad():
        ratio = torch.exp(torch.clamp(old_logp - sample_logp, max=20.0))
        capped = ratio > cap
        w = torch.where(mask.bool(), ratio.clamp(max=cap), torch.zeros_like(ratio))
    return w, _stats(w, mask, capped)
