"""Routed self-distillation, tensor side: KL values against brute force, routing masks, the λ schedule,
and the routed loss (exactly the PG loss at λ = 0; micro-batches add up to the mini-batch)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tracerl.algos import AGGREGATIONS, POLICY_LOSSES
from tracerl.algos.distill import (DISTILL_ROUTES, forward_kl, kl_weight_at, reverse_kl, route_masks, routed_loss,
                                   token_kl, topk_tail)
from tracerl.config import ConfigError, load_config
from tracerl.distill.distiller import schedule_lengths
from tracerl.errors import OptionError


def _dist(values):
    return [v / sum(values) for v in values]


def _kl_brute(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


P = _dist([5.0, 1.0, 2.0, 0.5, 1.5])  # student
Q = _dist([1.0, 3.0, 2.0, 2.0, 0.25])  # teacher


def _logp(d):
    return torch.tensor([d], dtype=torch.float64).log()


def test_forward_and_reverse_kl_match_brute_force():
    assert forward_kl(_logp(P), _logp(Q)).item() == pytest.approx(_kl_brute(Q, P), rel=1e-12)
    assert reverse_kl(_logp(P), _logp(Q)).item() == pytest.approx(_kl_brute(P, Q), rel=1e-12)
    assert forward_kl(_logp(P), _logp(P)).item() == pytest.approx(0.0, abs=1e-15)
    # token_kl takes raw student logits (any shift) and the teacher's log-probs
    logits = _logp(P) + 3.0
    assert token_kl(logits, _logp(Q), "forward").item() == pytest.approx(_kl_brute(Q, P), rel=1e-6)
    assert token_kl(logits, _logp(Q), "reverse").item() == pytest.approx(_kl_brute(P, Q), rel=1e-6)
    with pytest.raises(ValueError, match="forward, reverse"):
        token_kl(logits, _logp(Q), "sideways")


def test_topk_tail_matches_brute_force_buckets():
    k = 2
    top = sorted(range(len(Q)), key=lambda v: -Q[v])[:k]  # teacher's top-2: tokens 1, then 2 or 3
    rest = [v for v in range(len(Q)) if v not in top]
    qb = [Q[v] for v in top] + [sum(Q[v] for v in rest)]
    pb = [P[v] for v in top] + [sum(P[v] for v in rest)]
    s, t = topk_tail(_logp(P), _logp(Q), k)
    assert torch.allclose(s.exp(), torch.tensor([pb], dtype=torch.float64))
    assert torch.allclose(t.exp(), torch.tensor([qb], dtype=torch.float64))
    assert token_kl(_logp(P), _logp(Q), "forward", topk=k).item() == pytest.approx(_kl_brute(qb, pb), rel=1e-6)
    assert token_kl(_logp(P), _logp(Q), "reverse", topk=k).item() == pytest.approx(_kl_brute(pb, qb), rel=1e-6)
    # bucketing can only lose information: KL on buckets <= full KL; k >= V is the full KL
    assert token_kl(_logp(P), _logp(Q), "forward", topk=k) <= token_kl(_logp(P), _logp(Q), "forward") + 1e-12
    assert token_kl(_logp(P), _logp(Q), "forward", topk=9).item() == pytest.approx(_kl_brute(Q, P), rel=1e-6)


def test_kl_with_zero_teacher_mass_has_finite_value_and_gradient():
    logits = torch.randn(3, 6, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(3, 6), -1)
    teacher[:, :2] = float("-inf")  # tokens the teacher rules out
    teacher = torch.log_softmax(teacher, -1)
    for topk in (None, 2, 6):
        kl = token_kl(logits, teacher, "forward", topk)
        kl.sum().backward()
        assert torch.isfinite(kl).all() and torch.isfinite(logits.grad).all()
        logits.grad = None


def _random_masks(g: torch.Generator, B=4, T=9):
    mask = (torch.rand(B, T, generator=g) < 0.7).float()
    mask[:, :2] = 0  # prompt
    key = (torch.rand(B, T, generator=g) < 0.3).float()
    error = (torch.rand(B, T, generator=g) < 0.3).float()
    return mask, key, error


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), reverse=st.booleans())
def test_routed_masks_partition_the_generated_tokens(seed, reverse):
    mask, key, error = _random_masks(torch.Generator().manual_seed(seed))
    pg, fkl, rkl = route_masks("routed", mask, key, error, weight=0.5, reverse_on_errors=reverse)
    assert torch.equal(pg + fkl + rkl, mask)  # every generated token in exactly one channel
    for m in (pg, fkl, rkl):
        assert set(m.unique().tolist()) <= {0.0, 1.0} and not (m * (1 - mask)).any()  # never prompt/observation
    assert torch.equal(fkl, key * mask)
    if reverse:
        assert torch.equal(rkl, error * mask * (1 - key))
    else:
        assert not rkl.any()  # error tokens stay in the PG channel
    # λ = 0: spans rejoin the PG channel
    pg0, fkl0, rkl0 = route_masks("routed", mask, key, error, weight=0.0, reverse_on_errors=reverse)
    assert torch.equal(pg0, mask) and not fkl0.any() and not rkl0.any()


def test_all_tokens_and_off_routes():
    mask, key, error = _random_masks(torch.Generator().manual_seed(1))
    pg, fkl, rkl = route_masks("all_tokens", mask, key, error, weight=1.0)
    assert torch.equal(pg, mask) and torch.equal(fkl, mask) and not rkl.any()
    pg, fkl, rkl = route_masks("all_tokens", mask, key, error, weight=1.0, pg_on_distilled=False)
    assert not pg.any() and torch.equal(fkl, mask)
    pg, fkl, rkl = route_masks("off", mask, key, error, weight=1.0)
    assert torch.equal(pg, mask) and not fkl.any() and not rkl.any()
    assert DISTILL_ROUTES.names() == ["all_tokens", "off", "routed"]
    with pytest.raises(OptionError, match="valid: all_tokens, off, routed"):
        route_masks("magic", mask, key, error, weight=1.0)


def _setup(seed=0, B=4, T=9, V=7):
    g = torch.Generator().manual_seed(seed)
    mask, key, error = _random_masks(g, B, T)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    old = torch.log_softmax(logits + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    old = old.gather(-1, tokens[..., None])[..., 0]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return mask, key, error, logits, teacher, tokens, old, adv


def _pg(logits, tokens, old, adv, mask):
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    return POLICY_LOSSES.get("ppo_clip")(logp, old, adv[:, None] * mask, mask)[0]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_routed_loss_at_weight_zero_is_the_pg_loss_values_and_gradients(agg):
    mask, key, error, logits, teacher, tokens, old, adv = _setup()
    agg_fn = AGGREGATIONS.get(agg)
    a = logits.clone().requires_grad_(True)
    ref = agg_fn(_pg(a, tokens, old, adv, mask), mask)
    ref.backward()
    b = logits.clone().requires_grad_(True)
    pg_m, fkl_m, rkl_m = route_masks("routed", mask, key, error, weight=0.0, reverse_on_errors=True)
    loss, stats = routed_loss(_pg(b, tokens, old, adv, pg_m), pg_m, fkl_m, rkl_m, b, teacher, weight=0.0, agg_fn=agg_fn)
    loss.backward()
    assert loss.item() == ref.item() and torch.equal(a.grad, b.grad) and stats == {}


def test_routed_loss_value_is_pg_on_the_rest_plus_weighted_kl_means():
    mask, key, error, logits, teacher, tokens, old, adv = _setup(seed=3)
    w = 0.7
    pg_m, fkl_m, rkl_m = route_masks("routed", mask, key, error, weight=w, reverse_on_errors=True)
    pg = _pg(logits, tokens, old, adv, pg_m)
    loss, stats = routed_loss(pg, pg_m, fkl_m, rkl_m, logits, teacher, weight=w, agg_fn=AGGREGATIONS.get("token-mean"))
    p = torch.softmax(logits, -1).tolist()
    q = teacher.exp().tolist()
    fkl = [_kl_brute(q[i][t], p[i][t]) for i, t in fkl_m.nonzero().tolist()]
    rkl = [_kl_brute(p[i][t], q[i][t]) for i, t in rkl_m.nonzero().tolist()]
    assert fkl and rkl
    expected = (pg * pg_m).sum().item() / pg_m.sum().item() + w * (sum(fkl) / len(fkl) + sum(rkl) / len(rkl))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert stats["kl_key"] == pytest.approx(sum(fkl) / len(fkl)) and stats["kl_error_tokens"] == len(rkl)


def test_routed_loss_micro_batches_add_up_to_the_mini_batch():
    mask, key, error, logits, teacher, tokens, old, adv = _setup(seed=5, B=6)
    agg_fn = AGGREGATIONS.get("token-mean")
    denominator = AGGREGATIONS.trait("token-mean", "denominator")  # the mini-batch's token count
    pg_m, fkl_m, rkl_m = route_masks("routed", mask, key, error, weight=1.0, reverse_on_errors=True)
    assert denominator(pg_m) == pg_m.sum()
    whole, _ = routed_loss(_pg(logits, tokens, old, adv, pg_m), pg_m, fkl_m, rkl_m, logits, teacher, weight=1.0,
                           agg_fn=agg_fn)
    parts = 0.0
    for rows in torch.arange(6).split(4):
        sub = (pg_m[rows], fkl_m[rows], rkl_m[rows])
        loss, _ = routed_loss(_pg(logits[rows], tokens[rows], old[rows], adv[rows], sub[0]), *sub, logits[rows],
                              teacher[rows], weight=1.0, agg_fn=agg_fn, pg_denominator=denominator(pg_m),
                              fkl_denominator=fkl_m.sum(), rkl_denominator=rkl_m.sum())
        parts += loss.item()
    assert parts == pytest.approx(whole.item(), rel=1e-12)


def test_routed_loss_needs_teacher_when_tokens_are_routed():
    mask, key, error, logits, teacher, tokens, old, adv = _setup()
    pg_m, fkl_m, rkl_m = route_masks("routed", mask, key, error, weight=1.0)
    with pytest.raises(ValueError, match="no student logits"):
        routed_loss(_pg(logits, tokens, old, adv, pg_m), pg_m, fkl_m, rkl_m, logits, None, weight=1.0,
                    agg_fn=AGGREGATIONS.get("token-mean"))


@pytest.mark.parametrize("step,expected", [(0, 0.0), (5, 1.0), (9, 1.8), (10, 2.0), (14, 2.0), (15, 2.0),
                                           (20, 1.0 + math.cos(math.pi / 4)), (25, 1.0), (34, 2.0 * 0.5 * (1 + math.cos(math.pi * 19 / 20))),
                                           (35, 0.0), (1000, 0.0)])
def test_schedule_values(step, expected):
    # warm-up 10, hold 5, anneal 20, λ_max 2
    assert kl_weight_at(step, 2.0, 10, 5, 20) == pytest.approx(expected, abs=1e-12)


def test_schedule_edges_and_config_defaults():
    assert kl_weight_at(0, 1.0, 0, 0, 4) == 1.0  # no warm-up: full weight at once
    assert kl_weight_at(3, 1.0, 0, 3, 0) == 0.0  # no anneal: 0 right after the hold
    assert kl_weight_at(10**6, 0.5, 2, 10**9, 1) == 0.5  # a long hold keeps the weight
    with pytest.raises(ValueError):
        kl_weight_at(0, 1.0, -1, 0, 0)
    # the defaults (docs/distillation.md §7): warm-up over 10% of the run, cosine down to 0 by 50%
    cfg = load_config(None, ["trainer.steps=100"])
    assert cfg.distill.mode == "off" and schedule_lengths(cfg) == (10, 0, 40)
    assert schedule_lengths(load_config(None, ["distill.warmup_steps=3", "distill.anneal_steps=7"])) == (3, 0, 7)


def test_config_distill_errors_are_one_line():
    # packed trees train distillation too (test_distill_train.py: the same step on both layouts)
    assert load_config(None, ["distill.mode=routed", "algo.dedup_prefix=true"]).algo.dedup_prefix
    with pytest.raises(ConfigError, match="distill.annotator_model"):
        load_config(None, ["distill.mode=routed", "distill.annotator=external"])
    with pytest.raises(ConfigError, match="distill.mode"):
        load_config(None, ["distill.mode=sometimes"])
    assert load_config(None, ["distill.mode=off"]).distill.mode == "off"  # YAML reads a bare off as false
