"""The training objective: one function over one token batch, for every layout and every method.

    loss = policy_term + kl_coef · kl_term − entropy_coef · entropy_term + distill_term

Each term is computed on the leaf-major matrix (leaves, n_max) of a `MicroBatch` (packing.py) through
the registries: the policy loss (`POLICY_LOSSES`), the aggregation (`AGGREGATIONS`, which owns every
normaliser), the KL estimator (`KL_ESTIMATORS`) and, with routed self-distillation, the teacher KL
channels (algos/distill.py). Denominators are those of the whole mini-batch (`Denominators`), so the
micro-batches of one optimizer step add up to the loss of the mini-batch in one piece — and, summed
across ranks, to the loss of the global batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from tracerl.algos import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, SAMPLER_CORRECTIONS
from tracerl.algos.losses import entropy_from_logits, token_logprobs
from tracerl.packing import MicroBatch


@dataclass
class LossSpec:
    """What the objective needs besides the batch; resolved from the config once per run."""

    policy_loss: str = "ppo_clip"
    aggregation: str = "token-mean"
    kl_estimator: str = "k3"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    temperature: float = 1.0  # the trained policy is softmax(logits / T), the sampling distribution
    norm_length: int | None = None  # seq-mean-token-sum-norm: constant L (None: the longest response)
    bf16: bool = False
    head_at_positions: bool = True  # run the LM head at the scored positions only
    sampler_correction: str = "none"  # SAMPLER_CORRECTIONS: per-token weights π_old / μ on the policy loss
    tis_cap: float = 2.0

    @classmethod
    def from_config(cls, cfg, head_at_positions: bool = True) -> "LossSpec":
        a = cfg.algo
        return cls(a.policy_loss, a.aggregation, a.kl_estimator, a.kl_coef, a.entropy_coef, a.clip_low, a.clip_high,
                   a.dual_clip, cfg.rollout.temperature or 1.0, a.norm_length, cfg.trainer.bf16, head_at_positions,
                   a.sampler_correction, a.tis_cap)


@dataclass
class Denominators:
    """Normalisers of one mini-batch (leaf matrices (N, n_max) of its leaves), shared by its micro-batches."""

    policy: Tensor | float
    tokens: Tensor | float  # KL and entropy: the aggregation's normaliser over every sampled token
    max_len: int

    @classmethod
    def of(cls, spec: LossSpec, mask: Tensor, pg_mask: Tensor, max_response: int) -> "Denominators":
        denominator = AGGREGATIONS.trait(spec.aggregation, "denominator")
        return cls(denominator(pg_mask), denominator(mask), spec.norm_length or max(1, max_response))


@dataclass
class Scores:
    """One forward's values at the scored tokens (T,) of a micro-batch."""

    logp: Tensor  # (T,) log π(token) at temperature T
    logits: Tensor | None  # (T, V) tempered logits, when a term needs the distribution
    entropy: Tensor | None  # (T,)


class ForwardHook(Protocol):
    """Reads a micro-batch's forward (token credit taps the attention of the first one)."""

    def around(self, mb: MicroBatch) -> Any: ...

    def after(self, mb: MicroBatch) -> None: ...


class DistillTerm(Protocol):
    """The routed self-distillation channels of a step (distill/distiller.py)."""

    def pg_mask(self, leaves: list[int]) -> Tensor: ...

    def loss(self, model, mb: MicroBatch, logits: Tensor, den_leaves: list[int],
             stats: dict[str, list[float]]) -> Tensor: ...


def forward_scores(model, mb: MicroBatch, spec: LossSpec, want_logits: bool = False,
                   hook: ForwardHook | None = None) -> Scores:
    """Log-probs (and, if asked, logits / entropy) of the micro-batch's scored tokens under `model`.
    `hook` runs around and after the forward (token credit reads its attention there)."""
    with hook.around(mb) if hook is not None else contextlib.nullcontext():
        s = _forward(model, mb, spec, want_logits)
    if hook is not None:
        hook.after(mb)
    return s


def _forward(model, mb: MicroBatch, spec: LossSpec, want_logits: bool) -> Scores:
    dev = next(model.parameters()).device
    ids, pos = mb.input_ids.to(dev), mb.position_ids.to(dev)
    mask = mb.attention_mask.to(dev) if mb.attention_mask is not None else None
    src, tgt = mb.src.to(dev), mb.tgt.to(dev)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=spec.bf16):
        if spec.head_at_positions:  # logits = lm_head(last hidden state): only where a token is scored
            hidden = model.get_decoder()(input_ids=ids, position_ids=pos, attention_mask=mask).last_hidden_state
            logits = model.get_output_embeddings()(hidden.flatten(0, 1)[src])
        else:
            logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits.flatten(0, 1)[src]
    logits = logits.float() / spec.temperature
    logp = token_logprobs(logits[None], tgt[None])[0]
    need = want_logits or spec.entropy_coef > 0
    entropy = entropy_from_logits(logits[None])[0] if spec.entropy_coef > 0 else None
    return Scores(logp, logits if need else None, entropy)


@torch.no_grad()
def score_only(model, mb: MicroBatch, spec: LossSpec, hook: ForwardHook | None = None) -> Tensor:
    """log π(token) (T,) of the scored tokens, no gradient (π_old, the reference model)."""
    return forward_scores(model, mb, spec, hook=hook).logp


def objective(model, mb: MicroBatch, spec: LossSpec, den: Denominators, *, old_logp: Tensor | None = None,
              ref_logp: Tensor | None = None, distill: DistillTerm | None = None, den_leaves: list[int] | None = None,
              hook: ForwardHook | None = None) -> tuple[Tensor, dict[str, list[float]]]:
    """The micro-batch's share of the mini-batch loss, and its statistics.

    old_logp / ref_logp: π_old and reference log-probs of the scored tokens (T,) (None: π_old is the
    current policy, detached; no KL term). `den_leaves`: the mini-batch's leaves (distillation's
    denominators). `hook` runs around and after the forward (token weights are read there)."""
    s = forward_scores(model, mb, spec, want_logits=distill is not None, hook=hook)
    stats: dict[str, list[float]] = {}
    b = mb.batch
    mask = mb.rows(b.mask).to(s.logp.device)
    logp = mb.to_leaves(s.logp)
    old = logp.detach() if old_logp is None else mb.to_leaves(old_logp.to(logp.device))
    pg_mask = mask if distill is None else distill.pg_mask(mb.leaves).to(mask)
    sample = mb.rows(b.sample_logp).to(logp)
    is_w = None
    if spec.sampler_correction != "none":
        is_w, is_stats = SAMPLER_CORRECTIONS.get(spec.sampler_correction)(old, sample, mask, cap=spec.tis_cap)
        for k, v in is_stats.items():
            stats.setdefault(k, []).append(float(v))
    policy = policy_term(logp, old, mb.rows(b.coef).to(logp), pg_mask, spec, den, stats, is_w)
    kl = kl_term(logp, mb.to_leaves(ref_logp.to(logp.device)), mask, spec, den, stats) if ref_logp is not None else 0.0
    ent = entropy_term(mb.to_leaves(s.entropy), mask, spec, den, stats) if s.entropy is not None else 0.0
    dist = distill.loss(model, mb, mb.to_leaves(s.logits), den_leaves or mb.leaves, stats) if distill is not None else 0.0
    loss = policy + spec.kl_coef * kl - spec.entropy_coef * ent + dist
    drift = ((logp.detach() - sample).abs() * mask).sum() / mask.sum().clamp(min=1)
    stats["logp_drift"] = [drift.item()]
    return loss, stats


def policy_term(logp: Tensor, old: Tensor, coef: Tensor, pg_mask: Tensor, spec: LossSpec, den: Denominators,
                stats: dict[str, list[float]], is_weights: Tensor | None = None) -> Tensor:
    """agg(policy_loss(logp, old, A·w)) over the policy-gradient tokens: (n, n_max) each -> scalar.
    `is_weights` (detached, (n, n_max)): a sampler correction's per-token weights on the loss."""
    pg, pg_stats = POLICY_LOSSES.get(spec.policy_loss)(logp, old, coef, pg_mask, clip_low=spec.clip_low,
                                                       clip_high=spec.clip_high, dual_clip=spec.dual_clip)
    if is_weights is not None:
        pg = pg * is_weights
    for k, v in pg_stats.items():
        stats.setdefault(k, []).append(float(v))
    return AGGREGATIONS.get(spec.aggregation)(pg, pg_mask, denominator=den.policy, max_len=den.max_len)


def kl_term(logp: Tensor, ref: Tensor, mask: Tensor, spec: LossSpec, den: Denominators,
            stats: dict[str, list[float]]) -> Tensor:
    """agg(KL estimate to the frozen reference) over every sampled token."""
    kl = KL_ESTIMATORS.get(spec.kl_estimator)(logp, ref)
    stats.setdefault("kl", []).append(((kl * mask).sum() / mask.sum().clamp(min=1)).item())
    return AGGREGATIONS.get(spec.aggregation)(kl, mask, denominator=den.tokens, max_len=den.max_len)


def entropy_term(ent: Tensor, mask: Tensor, spec: LossSpec, den: Denominators,
                 stats: dict[str, list[float]]) -> Tensor:
    """agg(policy entropy) over every sampled token (a bonus: subtracted from the loss)."""
    stats.setdefault("entropy", []).append(((ent * mask).sum() / mask.sum().clamp(min=1)).item())
    return AGGREGATIONS.get(spec.aggregation)(ent, mask, denominator=den.tokens, max_len=den.max_len)

