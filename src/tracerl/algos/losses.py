"""Policy losses, loss aggregation and per-token log-prob / entropy helpers (docs/estimators.md §7–§10).

A policy loss returns an unreduced per-token loss (B, T), zero off the mask, plus detached scalar
statistics; an aggregation turns it into the scalar that is back-propagated. Keeping the two apart
lets every normalisation mode (token-mean, Dr.GRPO's constant length, ...) live in one place.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tracerl.registry import Registry

PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
AggregationFn = Callable[..., Tensor]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
# `denominator`: the aggregation's normaliser over a whole mini-batch mask (N, T) -> scalar; the trainer
# passes it as `denominator` to every micro-batch, so gradient accumulation (and ranks) add up to one batch.
AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation", traits={"denominator": None})


def _token_count(mask: Tensor) -> Tensor:
    return mask.sum().clamp(min=1)


def _row_count(mask: Tensor) -> Tensor:
    return (mask.sum(-1) > 0).sum().clamp(min=1)

LOG_RATIO_CLAMP = 20.0


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (PPO, arXiv 1707.06347) with dual clip (arXiv 1912.09729).

    logp, old_logp, mask (B, T); advantages (B, T) or (B,) (broadcast over T).
    Returns (per_token_loss (B, T), stats). `dual_clip=None` disables the dual clip; it must
    exceed 1 otherwise. Stats are detached scalars over mask tokens: clip_frac (tokens whose
    gradient is cut by either clip), clip_low_frac, clip_high_frac, dual_clip_frac, ratio_mean,
    ratio_max, approx_kl (k3 of old vs new).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.expand_as(logp)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable); got {dual_clip}")
    m = mask.to(logp.dtype)
    on = mask.bool()

    log_ratio = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    surr = ratio * advantages
    surr_clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(surr, surr_clipped)
    clipped = surr_clipped < surr  # the constant branch won: no gradient
    dual = torch.zeros_like(on)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    loss = torch.where(on, loss, torch.zeros_like(loss))

    with torch.no_grad():
        kl = torch.exp(-log_ratio) + log_ratio - 1.0
        stats = {
            "clip_frac": _masked_mean((clipped | dual).to(m.dtype), m),
            "clip_high_frac": _masked_mean((clipped & (advantages > 0)).to(m.dtype), m),
            "clip_low_frac": _masked_mean((clipped & (advantages < 0)).to(m.dtype), m),
            "dual_clip_frac": _masked_mean(dual.to(m.dtype), m),
            "ratio_mean": _masked_mean(ratio, m),
            "ratio_max": ratio.masked_fill(~on, 0.0).amax() if ratio.numel() else ratio.new_zeros(()),
            "approx_kl": _masked_mean(kl, m),
        }
    return loss, stats


@AGGREGATIONS.register("token-mean", denominator=_token_count)
def token_mean(
    loss: Tensor, mask: Tensor, *, denominator: float | Tensor | None = None, max_len: int | None = None
) -> Tensor:
    """`Σ m·l / Σ m`: loss, mask (B, T) -> scalar.

    `denominator` replaces `Σ m` so micro-batches of one mini-batch (or ranks) share the global
    token count. `max_len` is unused (uniform signature).
    """
    m = mask.to(loss.dtype)
    denom = m.sum().clamp(min=1) if denominator is None else denominator
    return (loss * m).sum() / denom


def _seq_mean(per_seq: Tensor, mask: Tensor, denominator: float | Tensor | None) -> Tensor:
    # B' counts rows with at least one loss token, so padding rows do not dilute the mean.
    denom = (mask.sum(-1) > 0).sum().clamp(min=1) if denominator is None else denominator
    return per_seq.sum() / denom


@AGGREGATIONS.register("seq-mean-token-mean", denominator=_row_count)
def seq_mean_token_mean(
    loss: Tensor, mask: Tensor, *, denominator: float | Tensor | None = None, max_len: int | None = None
) -> Tensor:
    """`(1/B') Σ_i Σ_t m·l / n_i`: loss, mask (B, T) -> scalar.

    `denominator` replaces B' (rows with ≥1 loss token) for micro-batching; `max_len` is unused.
    """
    m = mask.to(loss.dtype)
    per_seq = (loss * m).sum(-1) / m.sum(-1).clamp(min=1)
    return _seq_mean(per_seq, mask, denominator)


@AGGREGATIONS.register("seq-mean-token-sum-norm", denominator=_row_count)
def seq_mean_token_sum_norm(
    loss: Tensor, mask: Tensor, *, denominator: float | Tensor | None = None, max_len: int | None = None
) -> Tensor:
    """`(1/B') Σ_i Σ_t m·l / L_max`, Dr.GRPO's length-unbiased form (arXiv 2503.20783).

    loss, mask (B, T) -> scalar. `max_len` is L_max, a constant of the run or the longest *response*
    of the batch (tokens after the prompt) — never the padded sequence length, which counts the prompt
    and changes every step (default T: the loss matrix holds responses only); `denominator` replaces B'.
    """
    m = mask.to(loss.dtype)
    L = loss.shape[-1] if max_len is None else max_len
    per_seq = (loss * m).sum(-1) / L
    return _seq_mean(per_seq, mask, denominator)


def token_logprobs(logits: Tensor, targets: Tensor, chunk_tokens: int = 1 << 16) -> Tensor:
    """log π(target) per position: logits (B, T, V), targets (B, T) long -> (B, T) float32.

    In float32 over chunks of rows holding about `chunk_tokens` positions, so at most one extra
    chunk-sized (rows, T, V) tensor exists beyond the logits and bf16 logits are not summed in bf16.
    Chunks come from `split` (one backward that concatenates), not from indexing rows one by one:
    every indexed row's backward would allocate and add a zero gradient of the full logits.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(targets.shape, dtype=torch.float32)
    rows = max(1, chunk_tokens // max(1, logits.shape[1]))
    out = []
    for lf, tg in zip(logits.split(rows), targets.split(rows)):
        lf = lf.float()
        out.append(lf.gather(-1, tg.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lf, dim=-1))
    return torch.cat(out)


def entropy_from_logits(logits: Tensor, chunk_tokens: int = 1 << 16) -> Tensor:
    """Entropy of softmax(logits): (B, T, V) -> (B, T) float32, as `logsumexp(z) − Σ p·z`.

    In float32 over chunks of rows, like `token_logprobs`. Logits must be finite.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    rows = max(1, chunk_tokens // max(1, logits.shape[1]))
    out = []
    for lf in logits.split(rows):
        lf = lf.float()
        p = torch.softmax(lf, dim=-1)
        out.append(torch.logsumexp(lf, dim=-1) - (p * lf).sum(-1))
    return torch.cat(out)
