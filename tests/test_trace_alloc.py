"""TRACE allocation on a real (tiny) policy: hidden-state features, the success predictor and its
calibration metrics, and the dapo / pcl / knapsack / trace allocators' budgets and cost accounting."""

from __future__ import annotations

import random

import pytest
import torch

from tracerl.allocate import ALLOCATORS, AllocationContext
from tracerl.allocate.budgeted import stage1_counts
from tracerl.allocate.predictor import NodeRef, SuccessPredictor, auroc, brier, ece, training_nodes
from tracerl.backends.hf import SamplingParams
from tracerl.config import AllocConfig, PredictorConfig, RolloutConfig, root_rollouts
from tracerl.envs.base import Task
from tracerl.rollout import RolloutEngine, encode_prompt
from tracerl.tree import RolloutTree, TurnRecord


def _fresh_hidden(policy, prefix):
    with torch.no_grad():
        return policy.model.model(input_ids=torch.tensor([prefix])).last_hidden_state[0, -1].float()


def test_generate_captures_the_last_layer_state_of_the_prefix_at_no_cost(tiny_policy, small_env):
    tok = tiny_policy.tokenizer
    a, b, c = (encode_prompt(tok, small_env, t) for t in small_env.tasks("train")[:3])
    prompts = [a, b, a, c]  # shared rows and left padding
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    plain, plain_stats = tiny_policy.generate(prompts, params)
    gens, stats = tiny_policy.generate(prompts, params, return_hidden=True)
    assert [g.token_ids for g in gens] == [g.token_ids for g in plain] and stats == plain_stats
    assert all(g.prefix_hidden is None for g in plain)
    for p, g in zip(prompts, gens):
        assert g.prefix_hidden.dtype == torch.float32 and not g.prefix_hidden.requires_grad
        torch.testing.assert_close(g.prefix_hidden, _fresh_hidden(tiny_policy, p), atol=1e-4, rtol=1e-4)
    only, pre = tiny_policy.prefix_hidden(prompts, batch_size=2)
    assert pre.computed == len(a) + len(b) + len(c) and pre.saved == len(a)
    for h, g in zip(only, gens):
        torch.testing.assert_close(h, g.prefix_hidden, atol=1e-4, rtol=1e-4)


def test_engine_stores_each_anchor_state_on_its_node(tiny_policy, small_env):
    eng = RolloutEngine(tiny_policy, small_env, SamplingParams(12), torch.Generator().manual_seed(0), capture_hidden=True)
    trees = eng.plant(small_env.tasks("train")[:2], 1)
    eng.grow([(t, 0) for t in trees for _ in range(2)])
    eng.grow([(t, a) for t in trees for a in t.anchors()], continuation=True)
    assert any(len(t.hidden) > 1 for t in trees), "need intermediate nodes"
    for t in trees:
        assert 0 in t.hidden and all(not t.nodes[i].done for i in t.hidden)
        assert set(t.hidden) == set(t.anchors())  # every node generation started from, no leaf
        for i in list(t.hidden)[:3]:
            torch.testing.assert_close(t.hidden[i], _fresh_hidden(tiny_policy, t.prefix(i)[0]), atol=1e-4, rtol=1e-4)
    assert "hidden" not in trees[0].to_dict()


def test_calibration_metrics_by_hand():
    p, s, f = [0.2, 0.8, 0.5], [1, 3, 0], [3, 1, 2]
    # 10 pairs: (0.2,1) (0.2,0)x3 (0.8,1)x3 (0.8,0) (0.5,0)x2
    assert brier(p, s, f) == pytest.approx((0.64 + 3 * 0.04 + 3 * 0.04 + 0.64 + 2 * 0.25) / 10)
    # bins: 0.2 -> acc 1/4 conf 0.2; 0.8 -> acc 3/4 conf 0.8; 0.5 -> acc 0 conf 0.5
    assert ece(p, s, f) == pytest.approx((4 * 0.05 + 4 * 0.05 + 2 * 0.5) / 10)
    # positives 0.2 x1, 0.8 x3; negatives 0.2 x3, 0.8 x1, 0.5 x2 -> wins 1·(1.5) + 3·(5 + 0.5) = 18 of 24
    assert auroc(p, s, f) == pytest.approx(18 / 24)
    assert auroc([0.3], [2], [0]) is None and brier([], [], []) == 0.0
    assert ece([1.0], [1], [0]) == pytest.approx(0.0)


def _toy_trees(rng: random.Random, n: int, dim: int) -> list[RolloutTree]:
    """Roots with random hidden states whose success depends on the sign of the first coordinate."""
    out = []
    for g in range(n):
        t = RolloutTree(Task(f"t{g}", "q", ("a",)), g, 0, [1, 2], {})
        h = torch.tensor([rng.gauss(0, 1) for _ in range(dim)])
        t.hidden[0] = h
        for k in range(4):
            win = h[0] > 0 if k else h[0] > 0.8  # mostly separable, with some mixed roots
            t.attach(0, [TurnRecord([5], [0.0], [], {}, {})], True, float(win))
        t.update_stats()
        out.append(t)
    return out


@pytest.mark.parametrize("head", ["logistic", "mlp"])
def test_predictor_learns_a_separable_toy_set_and_restores_exactly(head):
    rng = random.Random(0)
    cfg = PredictorConfig(head=head, hidden=16, warmup=2, lr=3e-2, passes=2, batch_size=32, buffer_steps=4)
    pred = SuccessPredictor(cfg, hidden_size=6, max_turns=4, seed=0)
    losses, aucs = [], []
    for step in range(12):
        m = pred.observe(_toy_trees(rng, 24, 6), step)
        losses.append(m["predictor_loss"])
        aucs.append(m.get("predictor_auroc", 0.5))
        assert m["predictor_warm"] == float(step >= 2)
    assert pred.warm and losses[-1] < 0.6 * losses[0] and aucs[-1] > 0.9
    assert len(pred.buffer) == 4
    tensors, meta = pred.state()
    twin = SuccessPredictor(cfg, hidden_size=6, max_turns=4, seed=0)
    twin.load_state(tensors, meta)
    batch = _toy_trees(random.Random(5), 10, 6)
    refs = [NodeRef(t, 0) for t in batch]
    assert twin.predict(refs) == pred.predict(refs)
    assert twin.observe(batch, 12) == pred.observe(batch, 12)  # same buffer, moments, optimizer, dropout
    assert twin.predict(refs) == pred.predict(refs)


def test_training_nodes_pool_a_prompts_trees_at_the_root():
    trees = _toy_trees(random.Random(1), 2, 3)
    extra = RolloutTree(trees[0].task, 0, 1, [1, 2], {})
    extra.hidden[0] = trees[0].hidden[0]
    extra.attach(0, [TurnRecord([5], [0.0], [], {}, {})], True, 1.0)
    extra.update_stats()
    refs = training_nodes([trees[0], extra, trees[1]])
    assert [(r.node, r.leaves) for r in refs] == [(0, 5), (0, 4)]
    assert refs[0].successes == trees[0].root.successes + 1


def test_stage1_counts_spend_the_budget_in_allowed_counts():
    rng = random.Random(0)
    v = [0.05, 0.5, 0.9, 0.45, 0.99, 0.3, 0.6, 0.0]
    for values, budget, eps in ((None, 12, 0.1), (v, 12, 0.0), (v, 13, 0.3), (v, 2, 0.5)):
        counts = stage1_counts(values, len(v), budget, 4, eps, "dp", 4, rng)
        assert sum(counts) == budget and all(m == 0 or 2 <= m <= 4 for m in counts), (values, budget, counts)
    assert sum(1 for m in stage1_counts(None, 8, 12, 16, 0.1, "dp", 4, rng) if m) == 3  # cold: 12 / G prompts
    warm = stage1_counts(v, len(v), 8, 16, 0.0, "dp", 4, rng)
    assert warm[1] > 0 and warm[3] > 0 and warm[4] == 0 and warm[7] == 0  # rollouts go to prompts near 0.5


def _ctx(policy, env, tasks_pool, allocator, predictor=None, stats=None, **rollout):
    r = RolloutConfig(allocator=allocator, prompts_per_step=2, group_size=4, max_turn_tokens=12, **rollout)
    eng = RolloutEngine(policy, env, SamplingParams(12), torch.Generator().manual_seed(3),
                        capture_hidden=predictor is not None)
    extra = list(tasks_pool)

    def draw(n):
        out, extra[:] = extra[:n], extra[n:]
        return out

    return AllocationContext(eng, r, random.Random(0), AllocConfig(cap_root=8), predictor, stats or {}, draw)


def _tokens(trees):
    return sum(len(n.gen_ids) for t in trees for n in t.nodes.values())


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_budgeted_allocators_charge_what_they_generate(tiny_policy, small_env, warm):
    tasks, pool = small_env.tasks("train")[:2], small_env.tasks("train")[2:12]
    predictor = SuccessPredictor(PredictorConfig(warmup=0 if warm else 5, hidden=8), tiny_policy.model.config.hidden_size,
                                 small_env.max_turns)
    for name in ("dapo", "pcl", "knapsack", "trace"):
        uses = ALLOCATORS.trait(name, "uses_predictor")
        ctx = _ctx(tiny_policy, small_env, pool, name, predictor if uses else None, {tasks[0].id: 1.0})
        trees = ALLOCATORS.get(name)(ctx, tasks)
        c = ctx.engine.cost
        leaves = sum(len(t.leaf_ids()) for t in trees)
        assert trees and sorted({t.group for t in trees}) == list(range(len({t.group for t in trees})))
        if name == "dapo":  # dropped groups stay charged
            assert c.gen_tokens >= _tokens(trees) and c.trajectories == 4 * ctx.metrics["dapo_groups_generated"]
            assert ctx.metrics["dapo_rounds"] <= 3
        else:
            assert c.gen_tokens == _tokens(trees) and c.trajectories == leaves
        if name == "pcl":
            assert len(trees) == 2 and all(len(t.root.children) == 4 for t in trees)
            if not warm:  # every v is 0.5: the batch itself, and no scoring pass over the pool
                assert [t.task for t in trees] == tasks
        if name == "knapsack":  # the solved prompt (rate 1.0) gets no rollouts, the unseen one all 8
            assert [t.task.id for t in trees] == [tasks[1].id] and len(trees[0].root.children) == 8
        if name == "trace":
            M = root_rollouts(ctx.rollout, ctx.alloc)  # sized with the prior f: nothing measured before
            left, restarts = ctx.metrics["stage2_leftover"], ctx.metrics["stage2_restarts"]
            assert ctx.metrics["stage1_rollouts"] == M and ctx.metrics["f_planned"] == ctx.alloc.continuation_fraction
            assert c.trajectories - c.continuations == M + left + restarts  # bare: Stage 1, root restarts, leftover
            if c.continuations:  # the step's measured f moved the running estimate the predictor carries
                assert predictor.costs.f == pytest.approx(0.7 * 0.5 + 0.3 * c.continuation_fraction)
            assert all(len(t.root.children) == 1 for t in trees)  # one bare rollout per tree
            for t in trees:  # at most cap_anchor continuations per prefix
                assert all(len(n.children) <= 1 + ctx.alloc.cap_anchor for n in t.nodes.values() if n.id)
            assert predictor is not None and all(0 in t.hidden for t in trees)


def test_trace_and_knapsack_spend_a_token_budget(tiny_policy, small_env):
    tasks, pool = small_env.tasks("train")[:2], small_env.tasks("train")[2:12]
    predictor = SuccessPredictor(PredictorConfig(hidden=8), tiny_policy.model.config.hidden_size, small_env.max_turns)
    for name in ("trace", "knapsack", "pcl"):
        ctx = _ctx(tiny_policy, small_env, pool, name, predictor if name != "knapsack" else None, token_budget=120)
        trees = ALLOCATORS.get(name)(ctx, tasks)
        assert ctx.engine.cost.gen_tokens == _tokens(trees)
        assert ctx.engine.cost.gen_tokens >= 240, (name, ctx.engine.cost.gen_tokens)


def _set_rewards(tree: RolloutTree, rewards: dict[int, float]) -> None:
    for leaf, r in rewards.items():
        tree.nodes[leaf].reward = r
    tree.update_stats()


def test_stage2_rounds_skip_mixed_prefixes_and_restart_agreeing_prompts_from_the_root(tiny_policy, small_env):
    from tracerl.allocate.budgeted import _stage2

    tasks = small_env.tasks("train")[:2]
    for rounds, root, cap in ((1, False, 8), (1, True, 1), (2, True, 8)):
        ctx = _ctx(tiny_policy, small_env, [], "trace")
        ctx.alloc = AllocConfig(rounds=rounds, stage2_root=root, cap_anchor=cap)
        eng = ctx.engine
        trees = eng.plant(tasks, [2, 1])
        eng.grow([(t, 0) for t in trees])
        a, b, c = trees  # prompt 0: trees a, b; prompt 1: tree c
        mid = [n.id for n in a.nodes.values() if n.id and not n.done]
        assert mid, "the tiny policy's chain should have at least one non-leaf turn"
        # make a's first prefix mixed: one more leaf below it, rewards 1 and 0; prompt 1 fails everywhere
        eng.grow([(a, mid[0])], continuation=True)
        _set_rewards(a, dict(zip(a.leaf_ids(), (1.0, 0.0))))
        _set_rewards(b, {leaf: 0.0 for leaf in b.leaf_ids()})
        _set_rewards(c, {leaf: 0.0 for leaf in c.leaf_ids()})
        assert a.nodes[mid[0]].mixed
        children_before = len(a.nodes[mid[0]].children)
        leaves_before = sum(len(t.leaf_ids()) for t in trees)
        by_prompt = [[a, b], [c]]
        c_prefixes = sum(1 for n in c.nodes.values() if n.id and not n.done)
        meter = ctx.meter(2)  # no token budget: Stage 2 spends the prompts' own budgets
        budgets = [6 * meter.f * 20.0, 8 * meter.f * 20.0]  # 6 and 8 continuations of f · 20 tokens
        spent_before = eng.cost.gen_tokens
        left, restarted, top_up = _stage2(ctx, meter, by_prompt, budgets, [0.5, 0.5], [20.0, 20.0])
        assert top_up is None  # no budget: no top-up
        assert len(a.nodes[mid[0]].children) == children_before  # the mixed prefix got nothing
        assert sum(len(t.leaf_ids()) for ts in by_prompt for t in ts) > leaves_before
        assert eng.cost.gen_tokens - spent_before == pytest.approx(sum(budgets) - sum(left))  # charged as generated
        assert restarted == len(by_prompt[0]) + len(by_prompt[1]) - 3  # root continuations = new bare trees
        assert all(t.group == c.group for t in by_prompt[1][1:]) and all(t.group == a.group for t in by_prompt[0])
        if not root:
            assert restarted == 0
        if cap == 1:  # one round, one continuation per anchor: c's prefixes and its root (prompt 1 only failed),
            assert restarted == 1 and len(c.leaf_ids()) == 1 + c_prefixes  # a restart costing 1/f = 2 units


def test_trace_config_is_validated_and_the_shipped_preset_loads():
    from tracerl.config import ConfigError, load_config, pool_size
    from tracerl.methods import check_methods

    assert ALLOCATORS.trait("trace", "uses_predictor") and ALLOCATORS.trait("trace", "makes_trees")
    assert ALLOCATORS.trait("trace", "check") is not None
    # the allocator's own check (its `check` trait), run by check_methods (Trainer.setup calls it)
    with pytest.raises(ConfigError, match="cannot be split over a pool of 2"):
        check_methods(load_config(None, ["rollout.allocator=trace", "rollout.prompts_per_step=2",
                                         "alloc.pool_factor=1", "alloc.cap_root=2"]))
    with pytest.raises(ConfigError, match="algo.advantage=tree_grpo needs tree rollouts; set rollout.allocator to one "
                                          "of .*trace"):
        check_methods(load_config(None, ["rollout.allocator=knapsack", "algo.advantage=tree_grpo"]))
    check_methods(load_config(None, ["rollout.allocator=trace", "algo.advantage=tree_grpo"]))
    with pytest.raises(ConfigError, match="alloc.epsilon"):
        load_config(None, ["alloc.epsilon=2"])
    cfg = load_config("configs/trace.yaml")
    assert cfg.rollout.allocator == "trace" and root_rollouts(cfg.rollout, cfg.alloc) == 32
    assert pool_size(cfg.rollout, cfg.alloc) == 32 and cfg.alloc.rounds == 2 and cfg.alloc.stage2_root


def test_optional_text_embedding_features():
    # the package is installed by the set-up (`make setup`); a missing package fails here, loudly
    from tracerl.allocate.predictor import TEXT_DIM, TextEncoder, task_features_dim

    pred = SuccessPredictor(PredictorConfig(text_embedding=True, hidden=8), 6, 4, text_encoder=TextEncoder())
    trees = _toy_trees(random.Random(0), 3, 6)
    # hidden state, 3 scalars, the text embedding and the (default) task features
    assert pred.features([NodeRef(t, 0) for t in trees]).shape == (3, 6 + 3 + TEXT_DIM + task_features_dim(4))
    assert "predictor_loss" in pred.observe(trees, 0)
