"""Pure tensor functions behind name registries: advantages, policy losses, aggregation, KL, sampler
correction."""

from tracerl.algos.advantages import ADVANTAGES, broadcast_to_tokens
from tracerl.algos.correction import SAMPLER_CORRECTIONS
from tracerl.algos.kl import KL_ESTIMATORS
from tracerl.algos.losses import AGGREGATIONS, POLICY_LOSSES, entropy_from_logits, token_logprobs
from tracerl.algos.metrics import effective_ratio, zero_advantage_fraction

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "SAMPLER_CORRECTIONS",
    "broadcast_to_tokens",
    "effective_ratio",
    "entropy_from_logits",
    "token_logprobs",
    "zero_advantage_fraction",
]
