"""Token weights from a per-token score (docs/flowtracer.md §5), registered by name in `CREDIT`.

Every rule has the same signature, so the trainer can look it up by name and combine it with any
advantage estimator:

    fn(score (N,), eligible (N,) bool, *, fraction=0.4, boost=1.5, generator=None) -> weights (N,)

`eligible` marks the tokens that may be boosted (sampled tokens, EOS excluded); the chosen
⌈fraction·n⌉ of them get `boost`, every other token 1. Ties are broken by position (earlier first).
The weight multiplies the token's advantage with no gradient through it and no renormalisation
to mean 1. Registry traits: `needs_flow` (the rule reads `score`, so the attention pass must run) and
`identity` (the rule never changes a weight, so nothing needs computing at all).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from tracerl.registry import Registry

CreditFn = Callable[..., Tensor]
CREDIT: Registry[CreditFn] = Registry("token credit rule", traits={"needs_flow": False, "identity": False})


def _boost(order: Tensor, eligible: Tensor, fraction: float, boost: float, dtype) -> Tensor:
    """Weights with `boost` on the first ⌈fraction·n⌉ eligible tokens of `order` (positions)."""
    weights = torch.ones(eligible.shape, dtype=dtype)
    order = order[eligible[order]]
    k = math.ceil(fraction * len(order))
    weights[order[:k]] = boost
    return weights


def _ranked(score: Tensor, descending: bool) -> Tensor:
    return torch.sort(score, descending=descending, stable=True).indices  # stable: ties keep position order


@CREDIT.register("none", identity=True)
def no_credit(score: Tensor, eligible: Tensor, *, fraction: float = 0.4, boost: float = 1.5,
              generator: torch.Generator | None = None) -> Tensor:
    """Every token weight 1 (the default: plain outcome advantages)."""
    return torch.ones(eligible.shape, dtype=torch.float32)


@CREDIT.register("flowtracer", needs_flow=True)
def top_throughput(score: Tensor, eligible: Tensor, *, fraction: float = 0.4, boost: float = 1.5,
                   generator: torch.Generator | None = None) -> Tensor:
    """FlowTracer: the eligible tokens with the highest score (throughput φ) get `boost`."""
    return _boost(_ranked(score, True), eligible, fraction, boost, torch.float32)


@CREDIT.register("bottom", needs_flow=True)
def bottom_throughput(score: Tensor, eligible: Tensor, *, fraction: float = 0.4, boost: float = 1.5,
                      generator: torch.Generator | None = None) -> Tensor:
    """Ablation control: the eligible tokens with the lowest score get `boost`."""
    return _boost(_ranked(score, False), eligible, fraction, boost, torch.float32)


@CREDIT.register("random")
def random_tokens(score: Tensor, eligible: Tensor, *, fraction: float = 0.4, boost: float = 1.5,
                  generator: torch.Generator | None = None) -> Tensor:
    """Ablation control: a uniformly random `fraction` of the eligible tokens gets `boost`."""
    return _boost(torch.randperm(eligible.shape[0], generator=generator), eligible, fraction, boost, torch.float32)
