"""Per-token KL estimators between the trained policy and the frozen reference (docs/estimators.md §9).

All take log-probs of the sampled tokens, logp and ref_logp (B, T), and return (B, T); the caller
masks and aggregates. Estimators from J. Schulman, "Approximating KL Divergence" (2020), as used
for the KL penalty of GRPO (arXiv 2402.03300).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tracerl.registry import Registry

KLFn = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")

K3_CLAMP = 10.0


@KL_ESTIMATORS.register("k1")
def k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """`logp − ref_logp`: unbiased for KL(π_θ‖π_ref) under π_θ samples, can be negative. (B, T)."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """`½ (logp − ref_logp)²`: non-negative, biased, low variance. (B, T)."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """`exp(ref − logp) − (ref − logp) − 1` clamped to [−10, 10]; non-negative, unbiased. (B, T)."""
    # Clamping the log-ratio first keeps exp finite (so the clamp's zero gradient is not 0·inf);
    # for |d| ≥ 20 the value exceeds 10 either way, so the result is unchanged.
    d = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, -K3_CLAMP, K3_CLAMP)
