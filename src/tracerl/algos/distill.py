"""Token-routed self-distillation: per-token KL to a privileged teacher, routing masks, the λ schedule
and the routed loss (docs/distillation.md §5–§7; TRACE-OPD, arXiv 2605.10194, as reconstructed there).

Student `p_t = softmax(student logits)`, teacher `q_t = softmax(teacher logits)`, both at the same
temperature as the policy loss. Routing splits the trainable tokens of a batch into three channels:

    key tokens   (successful leaves)  -> forward KL(q ‖ p)
    error tokens (failed leaves)      -> reverse KL(p ‖ q)   (only with reverse_on_errors)
    all others                        -> the policy-gradient term (PPO / GRPO)

and `routed_loss` adds `λ(s) · (mean_K FKL + mean_E RKL)` to the aggregated PG term. At λ = 0 the
span tokens rejoin the PG channel, so the loss is exactly the plain PG loss.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from tracerl.registry import Registry

RouteFn = Callable[..., tuple[Tensor, Tensor, Tensor]]
DISTILL_ROUTES: Registry[RouteFn] = Registry("distillation route")


# ------------------------------------------------------------------------------------------ KL
def _kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """Σ_v a(v)·(log a(v) − log b(v)) over the last axis, with 0·log 0 = 0: (..., V) -> (...)."""
    a = logp_a.exp()
    # masking the difference (not the product) keeps gradients finite where a = 0 and log b = -inf
    diff = torch.where(a > 0, logp_a - logp_b, torch.zeros_like(logp_a))
    return (a * diff).sum(-1)


def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(teacher ‖ student) = Σ q·(log q − log p): log-probs (P, V) -> (P,). Gradient through p only
    (the teacher is a constant)."""
    return _kl(teacher_logp.detach(), student_logp)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(student ‖ teacher) = Σ p·(log p − log q): log-probs (P, V) -> (P,) (mode-seeking)."""
    return _kl(student_logp, teacher_logp.detach())


def topk_tail(student_logp: Tensor, teacher_logp: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Both distributions on the teacher's top-k tokens plus one tail bucket: (P, V) -> (P, k + 1) each.

    The tail bucket holds the mass outside the teacher's top-k, `logsumexp` of the complement (exact,
    no `log(1 − Σ)` cancellation). When k ≥ V the full distributions are returned unchanged.
    """
    if k >= teacher_logp.shape[-1]:
        return student_logp, teacher_logp
    idx = teacher_logp.topk(k, dim=-1).indices
    outside = torch.ones_like(teacher_logp, dtype=torch.bool).scatter(-1, idx, False)

    def bucket(logp: Tensor) -> Tensor:
        tail = logp.masked_fill(~outside, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([logp.gather(-1, idx), tail], dim=-1)

    return bucket(student_logp), bucket(teacher_logp)


def token_kl(student_logits: Tensor, teacher_logp: Tensor, direction: str = "forward", topk: int | None = None) -> Tensor:
    """Per-position KL between the student (raw logits, (P, V)) and the teacher (log-probs, (P, V)) -> (P,).

    `direction` is "forward" (KL(q‖p)) or "reverse" (KL(p‖q)); `topk` buckets both sides on the
    teacher's top-k tokens plus a tail (None: the full vocabulary). Computed in float32 at least."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = torch.log_softmax(student_logits.to(dtype), dim=-1)
    t = teacher_logp.to(dtype)
    if topk is not None:
        s, t = topk_tail(s, t, topk)
    if direction == "forward":
        return forward_kl(s, t)
    if direction == "reverse":
        return reverse_kl(s, t)
    raise ValueError(f"unknown KL direction {direction!r}; valid: forward, reverse")


# ------------------------------------------------------------------------------------------ schedule
def kl_weight_at(step: int, max_weight: float, warmup: int, hold: int, anneal: int) -> float:
    """λ(s) at 0-based optimizer step `s` (docs/distillation.md §7: warm-up, hold, decay):

        λ = λ_max · s / w                              0 ≤ s < w               (linear warm-up)
        λ = λ_max                                      w ≤ s < w + h           (hold)
        λ = λ_max · ½ (1 + cos(π (s − w − h) / a))     w + h ≤ s < w + h + a   (cosine anneal)
        λ = 0                                          s ≥ w + h + a

    with w = warmup, h = hold, a = anneal. Default: w = 0.1·S, h = 0, a = 0.4·S for S steps.
    """
    if min(warmup, hold, anneal) < 0:
        raise ValueError(f"schedule lengths must be >= 0, got warmup={warmup}, hold={hold}, anneal={anneal}")
    if step < warmup:
        return max_weight * step / warmup
    s = step - warmup - hold
    if s < 0:
        return max_weight
    if s < anneal:
        return max_weight * 0.5 * (1.0 + math.cos(math.pi * s / anneal))
    return 0.0


# ------------------------------------------------------------------------------------------ routing
def route_masks(route: str, mask: Tensor, key: Tensor, error: Tensor, *, weight: float,
                reverse_on_errors: bool = False, pg_on_distilled: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(pg_mask, fkl_mask, rkl_mask), each like `mask` (B, T), from the registered route.

    At `weight == 0` nothing is distilled: every trainable token is in the PG channel (spans rejoin it)."""
    fn = DISTILL_ROUTES.get(route)
    if weight == 0:
        zero = torch.zeros_like(mask)
        return mask.clone(), zero, zero.clone()
    return fn(mask, key, error, reverse_on_errors=reverse_on_errors, pg_on_distilled=pg_on_distilled)


@DISTILL_ROUTES.register("routed")
def routed(mask: Tensor, key: Tensor, error: Tensor, *, reverse_on_errors: bool = False,
           pg_on_distilled: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Key tokens -> FKL, error tokens -> RKL (when `reverse_on_errors`, else PG), the rest -> PG.

    mask, key, error (B, T) in {0, 1}; the three outputs partition `mask` (key wins over error).
    `pg_on_distilled` is unused (uniform signature)."""
    m = mask.bool()
    k = key.bool() & m
    e = (error.bool() & m & ~k) if reverse_on_errors else torch.zeros_like(m)
    dt = mask.dtype
    return (m & ~k & ~e).to(dt), k.to(dt), e.to(dt)


@DISTILL_ROUTES.register("all_tokens")
def all_tokens(mask: Tensor, key: Tensor, error: Tensor, *, reverse_on_errors: bool = False,
               pg_on_distilled: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """FKL on every trainable token (self-distillation à la SDPO, arXiv 2601.20802), plus the PG term on
    every token when `pg_on_distilled`. key, error, reverse_on_errors are unused."""
    zero = torch.zeros_like(mask)
    return (mask.clone() if pg_on_distilled else zero.clone()), mask.clone(), zero


@DISTILL_ROUTES.register("off")
def off(mask: Tensor, key: Tensor, error: Tensor, *, reverse_on_errors: bool = False,
        pg_on_distilled: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Plain PG on every trainable token (the GRPO baseline)."""
    zero = torch.zeros_like(mask)
    return mask.clone(), zero, zero.clone()


# ------------------------------------------------------------------------------------------ loss
def routed_kl(
    fkl_mask: Tensor,
    rkl_mask: Tensor,
    student_logits: Tensor | None,
    teacher_logp: Tensor | None,
    *,
    weight: float,
    topk: int | None = None,
    fkl_denominator: float | Tensor | None = None,
    rkl_denominator: float | Tensor | None = None,
) -> tuple[Tensor | float, dict[str, float]]:
    """`λ · (Σ_K FKL / n_K + Σ_E RKL / n_E)` -> (scalar, stats): the teacher channels of the routed loss.

    masks (B, T) from `route_masks`; student_logits (B, T, V) at the policy temperature; teacher_logp
    (B, T, V) aligned to the same positions (both may be None when nothing is distilled). The
    denominators default to this batch's own routed-token counts; the trainer passes mini-batch-wide
    ones so micro-batches add up. KL is evaluated at the routed positions only. Stats: kl_key /
    kl_error (mean over routed tokens) and their token counts."""
    loss: Tensor | float = 0.0
    stats: dict[str, float] = {}
    for name, mask, direction, denom in (("kl_key", fkl_mask, "forward", fkl_denominator),
                                         ("kl_error", rkl_mask, "reverse", rkl_denominator)):
        sel = mask.bool()
        n = int(sel.sum())
        if weight == 0 or n == 0:
            continue
        if student_logits is None or teacher_logp is None:
            raise ValueError(f"{n} tokens are routed to {direction} KL but no student logits / teacher log-probs were given")
        kl = token_kl(student_logits[sel], teacher_logp[sel], direction, topk)
        loss = loss + weight * kl.sum() / (n if denom is None else denom)
        stats[name] = kl.detach().mean().item()
        stats[name + "_tokens"] = float(n)
    return loss, stats


def routed_loss(
    pg: Tensor,
    pg_mask: Tensor,
    fkl_mask: Tensor,
    rkl_mask: Tensor,
    student_logits: Tensor | None,
    teacher_logp: Tensor | None,
    *,
    weight: float,
    agg_fn: Callable[..., Tensor],
    topk: int | None = None,
    pg_denominator: float | Tensor | None = None,
    fkl_denominator: float | Tensor | None = None,
    rkl_denominator: float | Tensor | None = None,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """`agg(pg, pg_mask) + routed_kl(...)` -> (scalar, stats): pg is the unreduced per-token PG loss
    (B, T) of a registered policy loss, aggregated over the PG channel; see `routed_kl`."""
    kl, stats = routed_kl(fkl_mask, rkl_mask, student_logits, teacher_logp, weight=weight, topk=topk,
                          fkl_denominator=fkl_denominator, rkl_denominator=rkl_denominator)
    return agg_fn(pg, pg_mask, denominator=pg_denominator, max_len=max_len) + kl, stats
