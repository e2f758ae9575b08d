"""Truncated importance sampling (algo.sampler_correction=tis): the weights, and their effect through the
objective — the policy loss of every token scaled by min(π_old / μ, C), μ the sampler's log-prob."""

from __future__ import annotations

import math

import pytest
import torch

from tracerl.algos import SAMPLER_CORRECTIONS
from tracerl.envs.base import Task
from tracerl.objective import Denominators, LossSpec, objective, score_only
from tracerl.packing import build_batch
from tracerl.tree import RolloutTree, TurnRecord


def test_tis_weights_are_the_capped_ratio_and_zero_off_the_mask():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    sample = torch.tensor([[-1.0, -1.0, -1.5, -3.5]])  # ratios e^0, e^-1, e^1, e^0.5
    mask = torch.tensor([[1, 1, 1, 0]])
    w, stats = SAMPLER_CORRECTIONS.get("tis")(old, sample, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, math.exp(-1), 2.0, 0.0]]))
    assert float(stats["is_capped_frac"]) == pytest.approx(1 / 3)
    assert float(stats["is_weight_mean"]) == pytest.approx((1 + math.exp(-1) + 2) / 3)
    ones, _ = SAMPLER_CORRECTIONS.get("none")(old, sample, mask)
    assert torch.equal(ones, torch.ones_like(old))
    with pytest.raises(ValueError, match="cap must be > 0"):
        SAMPLER_CORRECTIONS.get("tis")(old, sample, mask, cap=0.0)


def _tree(sample_logp: float) -> RolloutTree:
    tree = RolloutTree(Task("t", "q?", ("a",)), 0, 0, list(range(3, 13)), {})
    for n in (4, 6):
        tree.attach(0, [TurnRecord(list(range(20, 20 + n)), [sample_logp] * n, [], {}, {})], done=True, reward=1.0)
    return tree


@pytest.mark.parametrize("gap,weight", [(math.log(1.5), 1.5), (math.log(3.0), 2.0), (-math.log(4.0), 0.25)])
def test_the_objective_scales_the_policy_loss_by_the_weight(tiny_policy, gap, weight):
    """π_old fixed at the model's own log-probs; the sampler's log-probs shifted by `gap` below them: with
    TIS the loss (and its gradient) is the plain one times min(e^gap, 2)."""
    model = tiny_policy.model
    plain, tis = LossSpec(), LossSpec(sampler_correction="tis", tis_cap=2.0)
    batch = build_batch([(_tree(0.0), {1: 0.7, 2: -0.3})], "rows")
    den = Denominators.of(plain, batch.mask, batch.mask, batch.max_response)
    mb = batch.micro(list(range(len(batch.packs))), 0)
    own = score_only(model, mb, plain)  # π_old: the model's own log-probs
    # the sampler's log-prob of every scored token: the model's own minus gap
    b = mb.batch
    flat = mb.to_leaves(own) - gap
    b.sample_logp[mb.leaves] = flat.to(b.sample_logp.dtype) * b.mask[mb.leaves]
    grads = []
    for spec in (plain, tis):
        model.zero_grad(set_to_none=True)
        loss, stats = objective(model, mb, spec, den, old_logp=own)
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), stats))
    (l0, g0, _), (l1, g1, s1) = grads
    assert l1 == pytest.approx(weight * l0, rel=1e-5)
    assert torch.allclose(g1, weight * g0, atol=1e-7, rtol=1e-4)
    assert s1["is_weight_mean"][0] == pytest.approx(weight, rel=1e-5)
