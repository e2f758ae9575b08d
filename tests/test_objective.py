"""One objective over one token batch: both layouts give the same loss and gradient for every registered
aggregation (and with KL, entropy, several PPO epochs and distillation), and Dr.GRPO divides by the
longest response, never by the padded sequence length."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from conftest import TINY_RUN
from tracerl.algos import AGGREGATIONS, POLICY_LOSSES
from tracerl.allocate import ALLOCATORS, AllocationContext
from tracerl.backends.hf import SamplingParams
from tracerl.config import RolloutConfig, load_config
from tracerl.envs.base import Task
from tracerl.objective import Denominators, LossSpec, forward_scores, objective
from tracerl.packing import build_batch
from tracerl.rollout import RolloutEngine
from tracerl.train import Trainer
from tracerl.tree import RolloutTree, TurnRecord


def _chain_tree(prompt_len: int, response_lens: list[int]) -> RolloutTree:
    tree = RolloutTree(Task("t", "q?", ("a",)), 0, 0, list(range(3, 3 + prompt_len)), {})
    for n in response_lens:
        leaf = tree.attach(0, [TurnRecord(list(range(10, 10 + n)), [-1.0] * n, [], {}, {})], done=True, reward=1.0)
        assert tree.nodes[leaf].done
    return tree


def test_dr_grpo_divides_by_the_longest_response_not_the_padded_sequence():
    """40-token prompt, responses of 5 and 10 tokens, unit per-token loss: Dr.GRPO gives
    (5/10 + 10/10) / 2 = 0.75 — dividing by the padded sequence length (49 targets) would give 0.153."""
    tree = _chain_tree(40, [5, 10])
    for layout in ("rows", "trees"):
        batch = build_batch([(tree, {1: 1.0, 2: 1.0})], layout)
        assert batch.max_response == 10 and batch.mask.shape == (2, 10)
        spec = LossSpec(aggregation="seq-mean-token-sum-norm")
        den = Denominators.of(spec, batch.mask, batch.mask, batch.max_response)
        agg = AGGREGATIONS.get("seq-mean-token-sum-norm")
        loss = agg(torch.ones_like(batch.mask), batch.mask, denominator=den.policy, max_len=den.max_len)
        assert float(loss) == pytest.approx(0.75, abs=1e-7)
        const = Denominators.of(LossSpec(aggregation="seq-mean-token-sum-norm", norm_length=20), batch.mask,
                                batch.mask, batch.max_response)
        assert float(agg(torch.ones_like(batch.mask), batch.mask, denominator=const.policy,
                         max_len=const.max_len)) == pytest.approx(0.375, abs=1e-7)


def test_dr_grpo_through_the_objective_with_a_unit_policy_loss(tiny_policy, monkeypatch):
    """The same 0.75 through `objective` (a registered unit loss in place of PPO)."""
    def unit(logp, old_logp, advantages, mask, **_):
        return mask.to(logp.dtype) + 0 * logp, {}

    monkeypatch.setitem(POLICY_LOSSES._items, "unit", unit)
    monkeypatch.setitem(POLICY_LOSSES._traits, "unit", {})
    tree = _chain_tree(40, [5, 10])
    spec = LossSpec(policy_loss="unit", aggregation="seq-mean-token-sum-norm")
    for layout in ("rows", "trees"):
        batch = build_batch([(tree, {1: 0.5, 2: -0.5})], layout)
        den = Denominators.of(spec, batch.mask, batch.mask, batch.max_response)
        total = 0.0
        for group in batch.micro_batches(list(range(len(batch.packs))), 1):
            loss, _ = objective(tiny_policy.model, batch.micro(group, 0), spec, den)
            total += loss.item()
        assert total == pytest.approx(0.75, abs=1e-6)


def _tree_rollout(policy, env):
    eng = RolloutEngine(policy, env, SamplingParams(max_new_tokens=12, temperature=1.0), torch.Generator().manual_seed(5))
    cfg = RolloutConfig(allocator="tree_grpo", trees_per_prompt=2, expansions=2, rounds=2)
    trees = ALLOCATORS.get("tree_grpo")(AllocationContext(eng, cfg, random.Random(1)), env.tasks("train")[:3])
    for t in trees:
        t.update_stats()
    gen = torch.Generator().manual_seed(0)
    return [(t, {leaf: float(torch.randn(1, generator=gen)) for leaf in t.leaf_ids()}) for t in trees]


def _loss_and_grad(model, batch, spec, old=None, ref=None, micro=4):
    model.zero_grad(set_to_none=True)
    den = Denominators.of(spec, batch.mask, batch.mask, batch.max_response)
    total = 0.0
    for group in batch.micro_batches(list(range(len(batch.packs))), micro):
        mb = batch.micro(group, 0)
        o = None if old is None else old(mb)
        r = None if ref is None else ref(mb)
        loss, _ = objective(model, mb, spec, den, old_logp=o, ref_logp=r)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
@pytest.mark.parametrize("terms", ["pg", "kl_entropy", "off_policy"])
def test_rows_and_packed_trees_give_the_same_loss_and_gradient(tiny_policy, small_env, aggregation, terms):
    model = tiny_policy.model
    trees = _tree_rollout(tiny_policy, small_env)
    assert any(len(t.nodes) > 1 + len(la) for t, la in trees), "some tree must share a node between leaves"
    spec = LossSpec(aggregation=aggregation, temperature=0.9,
                    kl_coef=0.1 if terms == "kl_entropy" else 0.0, entropy_coef=0.05 if terms == "kl_entropy" else 0.0)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term is not 0
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    out = {}
    for layout in ("rows", "trees"):
        batch = build_batch(trees, layout)
        # π_old away from the policy (ratio ≠ 1, so clipping is active) — same per-token values in both layouts
        old = (lambda mb: forward_scores(model, mb, spec).logp.detach()
               + 0.3 * torch.sin(mb.tgt.float() * 1.7)) if terms == "off_policy" else None
        ref = (lambda mb: forward_scores(ref_model, mb, spec).logp.detach()) if terms == "kl_entropy" else None
        out[layout] = _loss_and_grad(model, batch, spec, old, ref)
    (l_rows, g_rows), (l_trees, g_trees) = out["rows"], out["trees"]
    assert l_rows != 0 and l_trees == pytest.approx(l_rows, rel=1e-5, abs=1e-7)
    scale = max(float(g.abs().max()) for g in g_rows.values())
    assert scale > 0
    for k in g_rows:
        torch.testing.assert_close(g_trees[k], g_rows[k], atol=1e-5 * scale, rtol=1e-4)
    rows, trees_b = build_batch(trees, "rows"), build_batch(trees, "trees")
    assert sum(len(p) for p in trees_b.packs) < sum(len(p) for p in rows.packs)  # fewer tokens run


def test_layouts_agree_in_training_with_distillation(tmp_path):
    """A full update with the all-tokens distillation channel (teacher pass, forward KL) and an entropy
    term: the rows and trees layouts move the parameters identically."""
    cfg = load_config(None, [*TINY_RUN, f"run.dir={tmp_path / 'r'}", "trainer.warmup_steps=0",
                             "distill.mode=all_tokens", "distill.warmup_steps=0", "algo.entropy_coef=0.01",
                             "rollout.allocator=tree_grpo", "algo.advantage=tree_grpo", "rollout.trees_per_prompt=2",
                             "rollout.expansions=2", "rollout.rounds=1", "trainer.micro_batch_size=3"])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    trees, _ = tr.rollout(0)
    gen = torch.Generator().manual_seed(3)
    kept = [(t, {leaf: float(torch.randn(1, generator=gen)) for leaf in t.leaf_ids()}) for t in trees]
    start = copy.deepcopy(tr.model.state_dict())
    moved, stats = {}, {}
    for layout in ("rows", "trees"):
        tr.model.load_state_dict(start)
        tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=1.0)  # the step is the clipped gradient
        stats[layout] = tr.update(build_batch(kept, layout), 0)
        moved[layout] = {k: v - start[k] for k, v in tr.model.state_dict().items()}
    assert stats["rows"]["kl_key"] > 0 and stats["rows"]["teacher_rows"] > 0
    assert stats["trees"]["loss"] == pytest.approx(stats["rows"]["loss"], rel=1e-5)
    assert stats["trees"]["kl_key"] > 0  # a mean of micro-batch means: micro-batches differ by layout
    assert stats["trees"]["train_tokens"] < stats["rows"]["train_tokens"]
    scale = max(float(v.abs().max()) for v in moved["rows"].values())
    assert scale > 0
    for k in moved["rows"]:  # a parameter's float32 resolution bounds how exactly its step is seen
        resolution = 1e-7 * float(start[k].abs().max())
        torch.testing.assert_close(moved["trees"][k], moved["rows"][k], atol=1e-4 * scale + resolution, rtol=1e-3)


def test_head_at_scored_positions_equals_full_logits(tiny_policy, small_env):
    model = tiny_policy.model
    batch = build_batch(_tree_rollout(tiny_policy, small_env), "trees")
    out = {}
    for fast in (True, False):
        spec = LossSpec(head_at_positions=fast, entropy_coef=0.01)
        out[fast] = _loss_and_grad(model, batch, spec)
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    assert max(float(g.abs().max()) for g in out[False][1].values()) > 0  # a gradient to compare
    for k in out[False][1]:
        torch.testing.assert_close(out[True][1][k], out[False][1][k], atol=1e-6, rtol=1e-4)
